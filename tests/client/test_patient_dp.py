"""Patient-level DP: all of a patient's slices are sampled and clipped as one unit, and accounted over patients."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType

from client.dpsgd import (
    clipped_patient_sum,
    epsilon_spent,
    per_sample_loss,
    per_sample_module,
    train_private_patients,
)
from client.ledger import LedgerError, LedgerState, PrivacyLedger, open_ledger
from client.policy import Grant, PolicyError, SitePolicy, load_policy, write_policy
from common.config import parse_run_config
from common.model import build_model
from common.records import to_arrays
from common.task import Batchable, loss_function
from tests.flower_helpers import site_context, site_message

FAST = {"data.image-size": 32, "data.spacing-mm": 7.5, "model.channels": "8,16,32", "train.batch-size": 8}
TINY = {"data.image-size": 16, "data.spacing-mm": 15.0, "model.channels": "4,8"}
DP = {
    **FAST,
    "privacy.dp": True,
    "privacy.noise-multiplier": 1.0,
    "privacy.max-grad-norm": 1.0,
    "privacy.batch-size": 0,
}


def _data(sizes: list[int], side: int = 16) -> tuple[Batchable, torch.Tensor]:
    """Random slices with random masks; patient ``i`` holds ``sizes[i]`` slices."""
    n = sum(sizes)
    data = Batchable(torch.rand(n, 1, side, side), (torch.rand(n, 1, side, side) > 0.7).long())
    patients = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    return data, patients


def test_patient_level_epsilon_is_an_opacus_accountant_over_patients_at_the_steps_taken() -> None:
    from opacus.accountants import RDPAccountant

    torch.manual_seed(0)
    # 6 patients of 2 or 6 slices (24 slices, 4 per patient on average); 8 slices per step expected
    # = 2 patients per step, so each patient is drawn with q = 2/6 and an epoch is 3 steps.
    data, patients = _data([2, 6, 2, 6, 2, 6])
    before = [(2.0, 0.1, 10)]  # the site's ledger before this call
    out = train_private_patients(
        build_model(parse_run_config(TINY).model).eval(),  # e.g. after evaluation: training puts it in train mode
        data,
        patients,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        noise_multiplier=1.3,
        max_grad_norm=1.0,
        history=before,
    )
    q = 2 / 6
    assert out.steps == 6 and out.sample_rate == pytest.approx(q)
    independent = RDPAccountant()
    for _ in range(10):
        independent.step(noise_multiplier=2.0, sample_rate=0.1)
    for _ in range(6):
        independent.step(noise_multiplier=1.3, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = independent.get_epsilon(delta=1e-5)
    assert epsilon_spent(out.history, delta=1e-5) == pytest.approx(expected, rel=1e-9)
    assert out.history == [(2.0, 0.1, 10), (1.3, pytest.approx(q), 6)]


def _slice_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One slice's loss gradient by plain autograd (no Opacus), flattened."""
    model.zero_grad(set_to_none=True)
    loss_function("segmentation")(model(x[None]), y[None]).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_a_patients_slices_are_clipped_as_one_unit_so_removing_a_patient_moves_the_sum_by_at_most_c() -> None:
    torch.manual_seed(1)
    model = build_model(parse_run_config(TINY).model)
    data, patients = _data([8, 2, 3])  # patient 0 holds 8 slices
    c = 0.01  # well below every slice's gradient norm: clipping binds
    slice_grads = torch.stack([_slice_gradient(model, x, y) for x, y in zip(data.images, data.labels, strict=True)])
    assert (slice_grads.norm(dim=1) > 2 * c).all()

    def step(rows: torch.Tensor, groups: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        with per_sample_module(model) as gsm:
            sums, _ = clipped_patient_sum(
                gsm,
                data.images[rows],
                data.labels[rows],
                groups,
                loss_of=per_sample_loss("segmentation"),
                max_grad_norm=c,
                chunk=chunk,
            )
        return torch.cat([s.flatten() for s in sums])

    everyone = torch.arange(len(patients))
    full = step(everyone, patients)
    # what the step should be, from plain per-slice gradients: each patient's sum clipped to c
    expected = torch.zeros_like(full)
    for i in range(3):
        g = slice_grads[patients == i].sum(0)
        expected += g * min(1.0, c / float(g.norm()))
    assert torch.allclose(full, expected, atol=1e-6, rtol=1e-3)
    assert torch.allclose(step(everyone, patients, chunk=3), full, atol=1e-6, rtol=1e-3)  # chunking changes nothing
    # neighbouring steps: all slices of patient 0 removed
    rest = everyone[patients != 0]
    assert float((full - step(rest, patients[rest])).norm()) <= c * (1 + 1e-4)
    # patient 0 alone is one unit of norm <= c; clipped slice by slice, its 8 slices would weigh far more
    own = everyone[patients == 0]
    assert float(step(own, patients[own]).norm()) <= c * (1 + 1e-4)
    assert float(step(own, torch.arange(len(own))).norm()) > 3 * c


def test_augmentation_multiplicity_averages_a_slices_copies_before_the_patient_is_clipped() -> None:
    """K copies of each slice, scaled by 1/K: the patient's unit is the mean over copies, still clipped to C."""
    torch.manual_seed(2)
    model = build_model(parse_run_config(TINY).model)
    data, patients = _data([3, 2])
    copies = torch.cat([data.images, data.images + 0.05 * torch.randn_like(data.images)])

    def step(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, scale: float, c: float) -> torch.Tensor:
        with per_sample_module(model) as gsm:
            sums, _ = clipped_patient_sum(
                gsm, x, y, groups, loss_of=per_sample_loss("segmentation"), max_grad_norm=c, scale=scale
            )
        return torch.cat([s.flatten() for s in sums])

    labels, owners = data.labels.repeat(2, 1, 1, 1), patients.repeat(2)
    loose = 1e6  # no clipping: the scaled sum is the mean of the two copies' per-patient sums
    both = step(copies, labels, owners, 0.5, loose)
    first = step(data.images, data.labels, patients, 1.0, loose)
    second = step(copies[len(data) :], data.labels, patients, 1.0, loose)
    assert torch.allclose(both, (first + second) / 2, atol=1e-6, rtol=1e-4)
    # clipping binds: each patient's mean over copies has norm at most c, so a patient moves the sum by <= c
    c = 0.01
    own = patients.repeat(2) == 0
    assert float(step(copies[own], labels[own], owners[own], 0.5, c).norm()) <= c * (1 + 1e-4)


def test_patient_dp_with_augmentation_multiplicity_trains_and_takes_the_same_steps() -> None:
    torch.manual_seed(3)
    data, patients = _data([4, 4, 4, 4])
    common = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    plain = train_private_patients(build_model(parse_run_config(TINY).model), data, patients, **common)
    model = build_model(parse_run_config(TINY).model)
    before = [p.detach().clone() for p in model.parameters()]
    out = train_private_patients(model, data, patients, augment_multiplicity=3, **common)
    assert out.steps == plain.steps and out.sample_rate == plain.sample_rate  # the guarantee's inputs unchanged
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_policy_unit_is_patient_unless_the_site_says_slice(tmp_path: Path) -> None:
    assert SitePolicy().unit == "patient"
    (tmp_path / "privacy.json").write_text(json.dumps({"dp": True, "max_epsilon": 8}))
    assert load_policy(tmp_path).unit == "patient"
    (tmp_path / "privacy.json").write_text(json.dumps({"dp": True, "max_epsilon": 8, "unit": "series"}))
    with pytest.raises(PolicyError, match=r"unit = 'series'; use 'patient'"):
        load_policy(tmp_path)


def _grant(unit: str) -> Grant:
    return Grant(dp=True, budget=8.0, delta=1e-5, accountant="rdp", audit=False, unit=unit)


def test_a_ledger_spent_per_slice_refuses_to_continue_per_patient_and_says_how(tmp_path: Path) -> None:
    entry = {"run": 1, "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 8, "n_train": 24}
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.write(LedgerState(id="abc", delta=1e-5, accountant="rdp", entries=[entry], unit="slice"))
    policy = write_policy(tmp_path / "privacy.json", SitePolicy(dp=True, max_epsilon=8.0, ledger_id="abc"))
    with pytest.raises(LedgerError, match=r"created at slice level .* now asks patient level.*unit = 'slice'"):
        open_ledger(ledger, policy, _grant("patient"), n_train=24)
    assert ledger.read().entries == [entry] and ledger.read().unit == "slice"  # left as it was
    # the site that keeps slice level continues its ledger
    state, _ = open_ledger(ledger, policy, _grant("slice"), n_train=24)
    assert state.unit == "slice" and state.entries == [entry]
    # a ledger written before the unit was recorded was spent per slice
    body = json.loads(ledger.path.read_text())
    del body["unit"]
    ledger.path.write_text(json.dumps(body))
    with pytest.raises(LedgerError, match="created at slice level"):
        open_ledger(ledger, policy, _grant("patient"), n_train=24)
    # and the other way round
    ledger.write(LedgerState(id="abc", delta=1e-5, accountant="rdp", entries=[entry], unit="patient"))
    with pytest.raises(LedgerError, match=r"created at patient level .*unit = 'patient'"):
        open_ledger(ledger, policy, _grant("slice"), n_train=24)


def _train(site_dir: Path, policy: Path, server_round: int = 1, **extra: object):
    from client.app import train

    # 4 slices a step: q = 1/3 over 3 patients of 6 slices, 1/5 over 18 slices
    run = {**DP, "train.batch-size": 4, **extra}
    ctx = site_context(site_dir, run, node_id=3, node_config={"privacy-policy": str(policy)})
    arrays = to_arrays(build_model(parse_run_config(FAST).model))
    msg = site_message(arrays, MessageType.TRAIN, node_id=3, **{"server-round": server_round, "local-epochs": 1})
    return train(msg, ctx)


def test_a_site_trains_per_patient_by_default_and_its_ledger_and_reply_say_so(
    small_sites: Path, tmp_path: Path, task_identity: None
) -> None:
    from client.app import SiteError
    from client.runtime import loaded_site

    site = loaded_site(small_sites / "site-03", parse_run_config(DP))
    n_patients = len(set(site.train_patients.tolist()))
    assert n_patients == site.data.train_patients == 3  # 4 patients, one kept for validation
    policy = tmp_path / "site-03-privacy.json"
    policy.write_text(json.dumps({"ledger_dir": str(tmp_path)}))
    reply = _train(small_sites / "site-03", policy)
    assert reply.content["metrics"]["privacy-unit"] == 1.0  # per patient
    state = PrivacyLedger(tmp_path / "site-03.json").read()
    assert state.unit == "patient"
    (entry,) = state.entries
    # 6 slices per patient and 4 per step: one patient expected per step, q = 1/3, 3 steps an epoch
    # (at slice level it would be q = 4/18 -> 1/5 and 5 steps)
    assert entry["n_patients"] == 3 and entry["sample_rate"] == pytest.approx(1 / 3) and entry["steps"] == 3
    assert reply.content["metrics"]["epsilon"] == pytest.approx(epsilon_spent([(1.0, 1 / 3, 3)], delta=state.delta))
    # the site's operator now says slice: the patient-level ledger does not continue at slice level
    body = json.loads(policy.read_text())
    policy.write_text(json.dumps({**body, "unit": "slice"}))
    with pytest.raises(SiteError, match=r"LedgerError: privacy ledger .* created at patient level"):
        _train(small_sites / "site-03", policy, server_round=2)
    assert len(PrivacyLedger(tmp_path / "site-03.json").entries()) == 1  # nothing more was spent


def test_dp_sgd_takes_its_own_expected_batch_from_privacy_batch_size(
    small_sites: Path, tmp_path: Path, task_identity: None
) -> None:
    """privacy.batch-size (not train.batch-size) sets DP-SGD's expected batch: 12 slices = 2 patients of 6 a step."""
    policy = tmp_path / "site-03-privacy.json"
    policy.write_text(json.dumps({"ledger_dir": str(tmp_path)}))
    _train(small_sites / "site-03", policy, **{"privacy.batch-size": 12})
    (entry,) = PrivacyLedger(tmp_path / "site-03.json").read().entries
    assert entry["sample_rate"] == pytest.approx(1 / 2) and entry["steps"] == 2  # ceil(3 patients / 2 a step)
