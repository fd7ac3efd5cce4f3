"""What the site's DP guarantee rests on: secret randomness, the site's own policy, what leaves the site."""

from __future__ import annotations

import copy

import torch

from client.dpsgd import train_private
from common.config import parse_run_config
from common.model import build_model
from common.task import Batchable

FAST = {"data.image-size": 32, "data.spacing-mm": 7.5, "model.channels": "8,16,32", "train.batch-size": 8}


def _update(model: torch.nn.Module, data: Batchable, seed: int) -> torch.Tensor:
    """The flattened weight change of one noisy DP-SGD call (SGD, lr 1: the update is the noisy mean gradient)."""
    trained = copy.deepcopy(model)
    train_private(
        trained,
        data,
        epochs=1,
        batch_size=16,
        lr=1.0,
        optimizer="sgd",
        noise_multiplier=50.0,
        max_grad_norm=1.0,
        seed=seed,
    )
    return torch.cat([(a - b).flatten() for a, b in zip(trained.parameters(), model.parameters())]).detach()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_replaying_the_published_seed_does_not_reproduce_the_dp_noise() -> None:
    torch.manual_seed(0)
    model = build_model(parse_run_config(FAST).model)
    data = Batchable(torch.rand(16, 1, 32, 32), (torch.rand(16, 1, 32, 32) > 0.7).long())
    first, second = _update(model, data, seed=7), _update(model, data, seed=7)
    # The noise (std 50 per coordinate, over a clipped mean gradient of norm <= 1) dominates the update:
    # two calls with the same seed and data would be identical if the seed drove the noise.
    assert abs(_corr(first, second)) < 0.1
    # Replaying the seed without the data: the noise a seeded generator draws does not match the update.
    for replay_gen in (torch.Generator().manual_seed(7), torch.manual_seed(7)):
        replay = torch.randn(first.shape, generator=replay_gen)
        assert abs(_corr(first, replay)) < 0.1
