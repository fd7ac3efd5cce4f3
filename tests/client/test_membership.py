"""The calibrated membership attack and its bootstrap interval: the statistics, then a real over-fit model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from client.membership import auc_interval, balanced_indices, calibrated_attack, calibrated_scores, score_attack
from common.task import Batchable

# --- the statistics, on synthetic scores -------------------------------------------------------------


def test_interval_lies_above_half_when_members_score_clearly_higher() -> None:
    rng = np.random.default_rng(1)
    members, others = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 200)  # true AUC = Phi(1/sqrt 2) = 0.76
    result = score_attack(members, others, seed=0)
    assert 0.5 < result.low < 0.76 < result.high
    assert result.detects and result.members == result.non_members == 200


def test_interval_includes_half_when_members_and_non_members_score_alike() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(0.0, 1.0, 400)
    result = score_attack(scores[:200], scores[200:], seed=0)
    assert result.low < 0.5 < result.high and not result.detects
    # 200 vs 200: the AUC's standard error under no signal is sqrt(401 / (12 * 200 * 200)) = 0.029
    assert 0.08 < result.high - result.low < 0.15


def test_interval_narrows_as_the_samples_grow() -> None:
    rng = np.random.default_rng(3)
    small = auc_interval(rng.normal(0.5, 1, 40), rng.normal(0, 1, 40))
    large = auc_interval(rng.normal(0.5, 1, 1000), rng.normal(0, 1, 1000))
    assert (large[1] - large[0]) < 0.4 * (small[1] - small[0])


def test_bootstrap_is_reproducible_with_a_seed_and_varies_without_the_same_one() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.3, 1, 60), rng.normal(0, 1, 60)
    assert auc_interval(a, b, seed=5) == auc_interval(a, b, seed=5)
    assert auc_interval(a, b, seed=5) != auc_interval(a, b, seed=6)


def test_bootstrap_auc_counts_ties_as_half() -> None:
    """Every score equal: each resample's AUC is exactly 0.5."""
    assert auc_interval(np.ones(10), np.ones(30), resamples=50) == (0.5, 0.5)
    assert score_attack(np.ones(10), np.ones(30)).auc == 0.5


def test_calibrated_score_is_how_much_lower_the_target_loss_is_than_the_reference_loss() -> None:
    np.testing.assert_allclose(calibrated_scores(np.array([0.1, 2.0]), np.array([1.0, 2.0])), [0.9, 0.0])
    with pytest.raises(ValueError, match="2 target losses but 1 reference"):
        calibrated_scores(np.zeros(2), np.zeros(1))


def test_balanced_indices_keep_as_many_members_as_non_members() -> None:
    members, others = balanced_indices(50, 12, seed=0)
    assert len(members) == len(others) == 12 and len(set(members.tolist())) == 12
    assert others.tolist() == list(range(12))  # the smaller set is kept whole
    assert balanced_indices(50, 12, seed=0)[0].tolist() == members.tolist()


# --- a real model: over-fit without DP, then the same setup with DP-SGD --------------------------------

#: A two-level UNet at 32 pixels (as tests/conftest.py's TINY_SEG), trained with one recipe for all models.
TINY = {"model.channels": "8,16", "data.image-size": 32, "data.spacing-mm": 7.5, "seed": 3}
EPOCHS, BATCH, LR = 30, 8, 1e-2


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def attack_game(small_sites: Path) -> dict:
    """The 72 slices of the three small sites, shuffled into thirds: reference data, members, non-members.

    Each third is 24 slices of the same sites and patients (an exchangeable split), and a reference
    model is trained on the first third with the same recipe the target gets.
    """
    from client.dataset import load_site
    from common.config import parse_run_config
    from common.model import build_model
    from common.task import stack_samples, train

    cfg = parse_run_config(TINY)
    samples = []
    for name in ("site-01", "site-02", "site-03"):
        data = load_site(small_sites / name, cfg.data, seed=cfg.seed)
        samples += data.train + data.val
    pool = stack_samples(samples)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
    third = len(pool) // 3
    parts = [Batchable(pool.images[i], pool.labels[i]) for i in order[: 3 * third].split(third)]
    torch.manual_seed(0)
    reference = build_model(cfg.model, cfg.task)
    with _one_thread():
        train(reference, parts[0], epochs=EPOCHS, batch_size=BATCH, lr=LR)
    return {"cfg": cfg, "reference": reference, "members": parts[1], "non_members": parts[2]}


def test_calibrated_attack_detects_membership_in_a_model_over_fit_without_dp(attack_game: dict) -> None:
    """30 epochs on 24 slices, no DP: the model memorises its slices, and the whole interval is above 0.5."""
    from common.model import build_model
    from common.task import train

    g = attack_game
    torch.manual_seed(0)
    target = build_model(g["cfg"].model, g["cfg"].task)
    with _one_thread():
        train(target, g["members"], epochs=EPOCHS, batch_size=BATCH, lr=LR)
    result = calibrated_attack(target, g["reference"], g["members"], g["non_members"], seed=0)
    assert result.members == result.non_members == 24
    assert result.low > 0.5, result


def test_calibrated_attack_sees_nothing_in_the_same_model_trained_with_dp_sgd(
    attack_game: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same 24 slices and recipe under DP-SGD at epsilon 8 (per slice): the interval includes 0.5.

    DP-SGD's noise comes from OS entropy; here it is seeded so that the test gives the same answer
    every time (with fresh noise, a 95% interval would exclude 0.5 in about one run in twenty by chance).
    """
    import client.dpsgd
    from client.dpsgd import default_delta, noise_for_target, train_private
    from common.model import build_model

    g = attack_game
    members = g["members"]
    monkeypatch.setattr(client.dpsgd, "secret_generator", lambda: torch.Generator().manual_seed(11))
    rate = BATCH / len(members)
    sigma = noise_for_target(
        8.0, delta=default_delta(len(members)), sample_rate=rate, steps=EPOCHS * len(members) // BATCH
    )
    torch.manual_seed(0)
    target = build_model(g["cfg"].model, g["cfg"].task)
    with _one_thread():
        train_private(
            target, members, epochs=EPOCHS, batch_size=BATCH, lr=LR, noise_multiplier=sigma, max_grad_norm=1.0
        )
    result = calibrated_attack(target, g["reference"], members, g["non_members"], seed=0)
    assert result.low < 0.5 < result.high, result
