"""The site client: patient-level split, samples from DICOM, and its Flower handlers called directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, MessageType

from client.dataset import load_site, split_by_patient
from client.dicom import DicomError, discover_series
from common.config import parse_run_config
from common.model import build_model
from common.records import to_arrays
from tests.flower_helpers import site_context, site_message

FAST = {"data.image-size": 32, "data.spacing-mm": 7.5, "model.channels": "8,16,32", "train.batch-size": 8}


def test_split_keeps_every_patient_on_one_side_only() -> None:
    patients = [f"p{i}" for i in range(10)] * 3
    train, val = split_by_patient(patients, val_fraction=0.25, seed=1)
    assert train.isdisjoint(val)
    assert train | val == set(patients)
    assert len(val) == 3


def test_split_is_repeatable_and_depends_on_the_seed() -> None:
    patients = [f"p{i}" for i in range(20)]
    assert split_by_patient(patients, val_fraction=0.3, seed=5) == split_by_patient(patients, val_fraction=0.3, seed=5)
    assert split_by_patient(patients, val_fraction=0.3, seed=5) != split_by_patient(patients, val_fraction=0.3, seed=6)


def test_split_refuses_a_single_patient() -> None:
    with pytest.raises(DicomError, match="at least 2 are needed"):
        split_by_patient(["p1", "p1"], val_fraction=0.5, seed=0)


def test_site_samples_are_split_by_patient_with_no_overlap(small_sites: Path) -> None:
    cfg = parse_run_config(FAST)
    site = load_site(small_sites / "site-01", cfg.data, seed=cfg.seed)
    train_patients = {s["patient"] for s in site.train}
    val_patients = {s["patient"] for s in site.val}
    assert train_patients and val_patients and train_patients.isdisjoint(val_patients)
    assert len(site.train) + len(site.val) == 4 * 6
    sample = site.train[0]
    assert tuple(sample["image"].shape) == (1, 32, 32) and tuple(sample["label"].shape) == (1, 32, 32)
    assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0
    assert set(torch.unique(torch.stack([s["label"] for s in site.train])).tolist()) == {0, 1}


def test_slices_are_ordered_by_position_not_instance_number(small_sites: Path) -> None:
    series, _ = discover_series(small_sites / "site-01" / "dicom")
    for s in series:
        positions = [sl.position for sl in s.slices]
        assert positions == sorted(positions)
    instance_orders = [[sl.instance_number for sl in s.slices] for s in series]
    assert any(order != sorted(order) for order in instance_orders), (
        "generator should shuffle InstanceNumbers for one patient"
    )


def _context(site_dir: Path, **overrides: object) -> Context:
    return site_context(site_dir, {**FAST, **overrides})


_message = site_message


def test_train_handler_replies_weights_samples_and_site_name(small_sites: Path, task_identity: None) -> None:
    from client.app import train

    ctx = _context(small_sites / "site-02")
    model = build_model(parse_run_config(FAST).model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reply = train(_message(to_arrays(model), MessageType.TRAIN, **{"server-round": 1, "local-epochs": 1}), ctx)
    metrics = reply.content["metrics"]
    n_train = len(load_site(small_sites / "site-02", parse_run_config(FAST).data, seed=42).train)
    assert metrics["num-examples"] == n_train  # samples, not batches
    assert metrics["steps"] == -(-n_train // 8)
    assert reply.content["site"]["name"] == "site-02"
    after = reply.content["arrays"].to_torch_state_dict()
    assert set(after) == set(before)
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_train_handler_runs_the_local_epochs_the_server_asks(small_sites: Path, task_identity: None) -> None:
    from client.app import train

    ctx = _context(small_sites / "site-02")
    arrays = to_arrays(build_model(parse_run_config(FAST).model))
    one = train(_message(arrays, MessageType.TRAIN, **{"server-round": 1, "local-epochs": 1}), ctx).content["metrics"][
        "steps"
    ]
    three = train(_message(arrays, MessageType.TRAIN, **{"server-round": 1, "local-epochs": 3}), ctx).content[
        "metrics"
    ]["steps"]
    assert three == 3 * one


def test_fedprox_term_keeps_local_weights_closer_to_the_global_model(small_sites: Path, task_identity: None) -> None:
    from client.app import train

    ctx = _context(small_sites / "site-03")
    model = build_model(parse_run_config(FAST).model)
    start = {k: v.clone().float() for k, v in model.state_dict().items()}

    def drift(mu: float) -> float:
        cfg = {"server-round": 2, "local-epochs": 2, "proximal-mu": mu}
        out = train(_message(to_arrays(model), MessageType.TRAIN, **cfg), ctx).content["arrays"].to_torch_state_dict()
        return sum(float(((out[k].float() - start[k]) ** 2).sum()) for k in start)

    assert drift(10.0) < drift(0.0)


def test_evaluate_handler_reports_dice_loss_and_validation_samples(small_sites: Path, task_identity: None) -> None:
    from client.app import evaluate

    ctx = _context(small_sites / "site-01")
    reply = evaluate(_message(to_arrays(build_model(parse_run_config(FAST).model)), MessageType.EVALUATE), ctx)
    m = reply.content["metrics"]
    assert 0.0 <= m["dice"] <= 1.0 and np.isfinite(m["loss"])
    n_val = len(load_site(small_sites / "site-01", parse_run_config(FAST).data, seed=42).val)
    assert m["num-examples"] == n_val
    assert reply.content["site"]["name"] == "site-01"


def test_weights_for_another_model_are_refused_with_the_reason(small_sites: Path, task_identity: None) -> None:
    from client.app import train

    ctx = _context(small_sites / "site-01")
    other = build_model(parse_run_config({**FAST, "model.channels": "8,16,32,64"}).model)
    from client.app import SiteError

    with pytest.raises(SiteError, match="RecordError: weights do not match the model"):
        train(_message(to_arrays(other), MessageType.TRAIN, **{"server-round": 1}), ctx)


def test_a_node_without_a_data_folder_gets_an_actionable_error(small_sites: Path) -> None:
    from client.runtime import resolve_site_dir

    with pytest.raises(DicomError, match="data-dir="):
        resolve_site_dir({}, parse_run_config({}))
    with pytest.raises(DicomError, match="is not a folder"):
        resolve_site_dir({"data-dir": str(small_sites / "nope")}, parse_run_config({}))


def test_simulation_partition_maps_to_its_site_folder(small_sites: Path) -> None:
    from client.runtime import resolve_site_dir

    cfg = parse_run_config({"sim.root": str(small_sites)})
    assert resolve_site_dir({"partition-id": 2, "num-partitions": 3}, cfg) == small_sites / "site-03"


def test_second_read_of_a_site_comes_from_its_disk_cache(
    small_sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import client.dataset as ds

    site = tmp_path / "site-02"
    shutil.copytree(small_sites / "site-02", site, ignore=shutil.ignore_patterns(".fedsite-cache"))
    cfg = parse_run_config(FAST)
    first = load_site(site, cfg.data, seed=1)
    assert list((site / ".fedsite-cache").glob("samples-*.pt"))

    def no_decoding(*_a, **_k):
        raise AssertionError("DICOM decoded again despite a valid cache")

    monkeypatch.setattr(ds, "read_series", no_decoding)
    second = load_site(site, cfg.data, seed=1)
    assert len(second.train) == len(first.train)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first.train, second.train))


def test_site_cache_is_rebuilt_when_a_file_or_setting_changes(small_sites: Path, tmp_path: Path) -> None:
    import os
    import shutil

    site = tmp_path / "site-01"
    shutil.copytree(small_sites / "site-01", site, ignore=shutil.ignore_patterns(".fedsite-cache"))
    cfg = parse_run_config(FAST)
    load_site(site, cfg.data, seed=1)
    (entry,) = (site / ".fedsite-cache").glob("samples-*.pt")
    a_file = next((site / "dicom").rglob("*.dcm"))
    os.utime(a_file, ns=(a_file.stat().st_atime_ns, a_file.stat().st_mtime_ns + 10**9))
    load_site(site, cfg.data, seed=1)
    (entry2,) = (site / ".fedsite-cache").glob("samples-*.pt")
    assert entry2 != entry  # new key, old entry removed
    other = parse_run_config({**FAST, "data.image-size": 64, "data.spacing-mm": 3.75})
    assert tuple(load_site(site, other.data, seed=1).train[0]["image"].shape) == (1, 64, 64)


def test_a_simulated_site_uses_the_cores_ray_gave_it_not_every_core() -> None:
    """torch may be imported before Ray sets OMP_NUM_THREADS; the handler sets the threads itself."""
    from client.runtime import apply_threads

    before = torch.get_num_threads()
    try:
        cfg = parse_run_config({"sim.cpus-per-site": 1.0})
        assert apply_threads(cfg, {"partition-id": 0}) == 1
        assert apply_threads(parse_run_config({"train.threads": 2}), {"partition-id": 0}) == 2
    finally:
        torch.set_num_threads(before)


def test_a_library_error_reaches_the_server_without_its_message(
    small_sites: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Library errors can carry file paths (folder names are often PatientIDs): only the type goes out."""
    import client.app as capp

    def broken(*_a, **_k):
        raise FileNotFoundError("/archive/dicom/PHIID123456/IM0001.dcm")

    monkeypatch.setattr(capp, "loaded_site", broken)
    ctx = _context(small_sites / "site-01")
    with pytest.raises(capp.SiteError) as info:
        capp.train(
            _message(to_arrays(build_model(parse_run_config(FAST).model)), MessageType.TRAIN, **{"server-round": 1}),
            ctx,
        )
    assert "PHIID123456" not in str(info.value) and "FileNotFoundError" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_fedbn_site_keeps_its_normalization_layers_across_rounds(
    small_sites: Path, task_identity: None, norm: str
) -> None:
    from client.app import evaluate, train
    from common.model import norm_keys

    ctx = _context(small_sites / "site-01", **{"model.norm": norm})
    model = build_model(parse_run_config({**FAST, "model.norm": norm}).model)
    keys = norm_keys(model)
    r1 = train(
        _message(to_arrays(model), MessageType.TRAIN, **{"server-round": 1, "local-epochs": 1, "fedbn": True}), ctx
    )
    kept = ctx.state.array_records["fedbn-local"].to_torch_state_dict()
    assert set(kept) == set(keys)
    # the server sends norm layers it never averaged (here: deliberately wrong values)
    glob = r1.content["arrays"].to_torch_state_dict()
    poisoned = {k: (torch.full_like(v, 7.0) if k in keys else v) for k, v in glob.items()}
    from flwr.app import ArrayRecord

    r2 = train(
        _message(ArrayRecord(poisoned), MessageType.TRAIN, **{"server-round": 2, "local-epochs": 1, "fedbn": True}), ctx
    )
    sent = r2.content["arrays"].to_torch_state_dict()
    for k in keys:
        assert not torch.allclose(sent[k], torch.full_like(sent[k], 7.0)), k  # trained from the site's own values
    # evaluation uses the site's own layers too: same score with or without the poisoned globals
    e_poisoned = evaluate(_message(ArrayRecord(poisoned), MessageType.EVALUATE, fedbn=True), ctx).content["metrics"][
        "loss"
    ]
    e_clean = evaluate(_message(ArrayRecord(glob), MessageType.EVALUATE, fedbn=True), ctx).content["metrics"]["loss"]
    assert e_poisoned == pytest.approx(e_clean)
