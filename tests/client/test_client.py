"""The site client: patient-level split, samples from DICOM, and its Flower handlers called directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, MessageType

from client.dataset import load_site, split_by_patient
from client.discovery import discover_series
from client.errors import DicomError
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

    monkeypatch.setattr(ds, "read_usable", no_decoding)
    second = load_site(site, cfg.data, seed=1)
    assert len(second.train) == len(first.train)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first.train, second.train, strict=True))


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


def _samples_by_slice(site: Path, cfg, **kwargs) -> dict[tuple[str, int], torch.Tensor]:
    """A site's sample images (train and validation) keyed by (series hash, slice index)."""
    data = load_site(site, cfg, seed=1, **kwargs)
    return {(x["series"], x["slice"]): x["image"] for x in data.train + data.val}


def test_site_cache_is_rebuilt_when_a_file_is_rewritten_with_its_size_and_mtime_kept(
    small_sites: Path, tmp_path: Path
) -> None:
    """A corrected slice copied over the old one with its timestamp kept (cp -p, rsync -a, unzip) is re-read."""
    import os
    import shutil

    import pydicom

    from client.phi import hash_id

    site = tmp_path / "site-01"
    shutil.copytree(small_sites / "site-01", site, ignore=shutil.ignore_patterns(".fedsite-cache"))
    cfg = parse_run_config(FAST).data
    before = _samples_by_slice(site, cfg)
    path = sorted((site / "dicom").rglob("*.dcm"))[len(before) // 4]
    ds = pydicom.dcmread(path)
    raw, pixels = path.read_bytes(), ds.PixelData
    assert not ds.file_meta.TransferSyntaxUID.is_compressed and raw.endswith(pixels)  # native pixels, last element
    stored = np.frombuffer(pixels, dtype=np.uint16 if ds.BitsAllocated == 16 else np.uint8)
    inverted = (int(stored.max()) + int(stored.min()) - stored.astype(np.int64)).astype(stored.dtype)
    st = path.stat()
    path.write_bytes(raw[: -len(pixels)] + inverted.tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    after = _samples_by_slice(site, cfg)
    fresh = _samples_by_slice(site, cfg, use_cache=False)
    assert after.keys() == fresh.keys() == before.keys()
    assert all(torch.equal(after[k], fresh[k]) for k in after)  # what the files now say, not the old entry
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == 1 and changed[0][0] == hash_id(str(ds.SeriesInstanceUID))  # one axial file, one sample
    old, new = before[changed[0]].flatten().double(), after[changed[0]].flatten().double()
    assert float(torch.corrcoef(torch.stack([old, new]))[0, 1]) < -0.5  # inverted stored values: inverted contrast


def test_site_cache_is_rebuilt_when_only_the_spacing_setting_changes(small_sites: Path, tmp_path: Path) -> None:
    """Same files, same image size, another data.spacing-mm: the samples are resampled, not taken from the cache."""
    import shutil

    site = tmp_path / "site-01"
    shutil.copytree(small_sites / "site-01", site, ignore=shutil.ignore_patterns(".fedsite-cache"))
    coarse = _samples_by_slice(site, parse_run_config(FAST).data)
    fine_cfg = parse_run_config({**FAST, "data.spacing-mm": 3.75}).data
    fine = _samples_by_slice(site, fine_cfg)
    fresh = _samples_by_slice(site, fine_cfg, use_cache=False)
    assert fine.keys() == fresh.keys() == coarse.keys()
    assert all(torch.equal(fine[k], fresh[k]) for k in fine)
    assert sum(not torch.equal(fine[k], coarse[k]) for k in fine) == len(fine)  # every slice is resampled anew


def test_writing_the_privacy_ledger_or_policy_keeps_the_sample_cache(
    small_sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger (every private round) and the policy (the operator's edits, its ledger id) live in the site
    folder; neither is an input of the samples."""
    import shutil

    import client.dataset as ds
    from client.layout import CACHE_DIR, LEDGER_DIR, POLICY_FILE

    site = tmp_path / "site-01"
    shutil.copytree(small_sites / "site-01", site, ignore=shutil.ignore_patterns(CACHE_DIR))
    cfg = parse_run_config(FAST).data
    load_site(site, cfg, seed=1)
    (site / LEDGER_DIR).mkdir()
    (site / LEDGER_DIR / "ledger.json").write_text('{"rounds": []}')
    (site / POLICY_FILE).write_text('{"dp": true, "max_epsilon": 8.0}')

    def no_decoding(*_a, **_k):
        raise AssertionError("DICOM decoded again because the privacy ledger or policy changed")

    monkeypatch.setattr(ds, "read_usable", no_decoding)
    load_site(site, cfg, seed=1)


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


_NORM_LAYERS = (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d, torch.nn.GroupNorm)


def _normalization_state(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's normalization layers, read off the network itself.

    Batch, instance and group norm layers: their weights and biases, and batch norm's running_mean,
    running_var and num_batches_tracked buffers.
    """
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS):
            keys |= {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
            keys |= {f"{name}.{b}" for b, v in module.named_buffers(recurse=False) if v is not None}
    return keys


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_fedbn_site_keeps_its_normalization_layers_across_rounds(
    small_sites: Path, task_identity: None, norm: str
) -> None:
    from flwr.app import ArrayRecord

    from client.app import evaluate, train

    ctx = _context(small_sites / "site-01", **{"model.norm": norm})
    model = build_model(parse_run_config({**FAST, "model.norm": norm}).model)
    keys = _normalization_state(model)
    layer = {"instance": torch.nn.InstanceNorm2d, "batch": torch.nn.BatchNorm2d, "group": torch.nn.GroupNorm}[norm]
    assert any(isinstance(m, layer) for m in model.modules())  # the network really uses this norm
    assert any(k.endswith(".weight") for k in keys) and any(k.endswith(".bias") for k in keys)
    if norm == "batch":
        assert {k.rsplit(".", 1)[1] for k in keys} >= {"running_mean", "running_var", "num_batches_tracked"}
    r1 = train(
        _message(to_arrays(model), MessageType.TRAIN, **{"server-round": 1, "local-epochs": 1, "fedbn": True}), ctx
    )
    kept = ctx.state.array_records["fedbn-local"].to_torch_state_dict()
    assert set(kept) == keys  # every normalization entry, and nothing else, stays at the site
    steps1 = r1.content["metrics"]["steps"]
    # the server sends norm layers it never averaged (here: deliberately wrong values)
    glob = r1.content["arrays"].to_torch_state_dict()
    poisoned = {k: (torch.full_like(v, 7) if k in keys else v) for k, v in glob.items()}
    r2 = train(
        _message(ArrayRecord(poisoned), MessageType.TRAIN, **{"server-round": 2, "local-epochs": 1, "fedbn": True}), ctx
    )
    sent = r2.content["arrays"].to_torch_state_dict()
    assert set(ctx.state.array_records["fedbn-local"].to_torch_state_dict()) == keys
    for k in keys:
        assert not torch.allclose(sent[k].float(), torch.full_like(sent[k].float(), 7.0)), k  # the site's own values
    if norm == "batch":
        # batch statistics go on counting this site's own steps, not from the server's value
        tracked = [k for k in keys if k.endswith("num_batches_tracked")]
        assert all(int(sent[k]) == steps1 + r2.content["metrics"]["steps"] for k in tracked)
    # evaluation uses the site's own layers too: same score with or without the poisoned globals
    e_poisoned = evaluate(_message(ArrayRecord(poisoned), MessageType.EVALUATE, fedbn=True), ctx).content["metrics"][
        "loss"
    ]
    e_clean = evaluate(_message(ArrayRecord(glob), MessageType.EVALUATE, fedbn=True), ctx).content["metrics"]["loss"]
    assert e_poisoned == pytest.approx(e_clean)


class _ThresholdModel(torch.nn.Module):
    """A 'segmentation network' whose prediction is the input image thresholded at 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1)


def test_segmentation_dice_is_twice_the_overlap_over_both_areas_pooled_over_slices() -> None:
    """Prediction A and truth B on two slices: |A| = 6, |B| = 5, |A and B| = 3, so Dice = 6/11 (IoU would be 3/8)."""
    from common.task import Batchable, evaluate

    pred = torch.zeros(2, 1, 4, 4)
    truth = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    pred[0, 0, 0, 0:4] = 1  # slice 1: A = 4 pixels
    truth[0, 0, 0, 2:4] = 1  # B = 3 pixels, 2 of them in A
    truth[0, 0, 1, 0] = 1
    pred[1, 0, 3, 0:2] = 1  # slice 2: A = 2 pixels
    truth[1, 0, 3, 1:3] = 1  # B = 2 pixels, 1 of them in A
    scores = evaluate(_ThresholdModel(), Batchable(pred, truth), batch_size=1, task="segmentation")
    assert scores["dice"] == pytest.approx(2 * 3 / (6 + 5))  # pooled, not the slices' mean (4/7 + 2/4) / 2
    assert scores["num-examples"] == 2
