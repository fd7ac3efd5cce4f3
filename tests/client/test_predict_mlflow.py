"""``fedsite predict`` with MODEL given as an MLflow URI: the run the coordinator tracked, fetched from its store."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from client.discovery import scan_images
from client.masks import read_mask
from fedsite.cli import main


@dataclass(frozen=True)
class TrackedRun:
    tracking_uri: str
    run_id: str
    folder: Path
    """The run folder as the coordinator wrote it (results.json names the MLflow run)."""
    bare_run_id: str
    """A run in the same store holding final_model.pt but no results.json."""


@pytest.fixture(scope="module")
def tracked_run(tiny_seg_run: Path, tmp_path_factory: pytest.TempPathFactory) -> TrackedRun:
    """The tiny model logged to a SQLite MLflow store by the coordinator's own tracker, as server/app.py does."""
    from server.tracking import Tracker

    root = tmp_path_factory.mktemp("mlflow-run")
    folder = root / "run"
    folder.mkdir()
    shutil.copy(tiny_seg_run / "final_model.pt", folder / "final_model.pt")
    tracker = Tracker(folder, run_name="run")
    tracker.start({"seed": 3}, background=False)
    run_id = tracker.wait()
    assert run_id
    doc = json.loads((tiny_seg_run / "results.json").read_text())
    doc["mlflow"] = {"tracking_uri": tracker.tracking_uri, "run_id": run_id}
    (folder / "results.json").write_text(json.dumps(doc))
    tracker.log_artifact(folder / "final_model.pt")
    tracker.log_artifact(folder / "results.json")
    tracker.finish()
    bare = Tracker(root / "bare", tracking_uri=tracker.tracking_uri, run_name="bare")
    bare.start({}, background=False)
    bare.log_artifact(folder / "final_model.pt")
    bare.finish()
    return TrackedRun(tracker.tracking_uri, run_id, folder, str(bare.wait()))


def _outputs(out: Path, folder: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    """predictions.json's entries without their timings, and each SEG's mask by series."""
    doc = json.loads((out / "predictions.json").read_text())
    entries = [{k: v for k, v in e.items() if k != "seconds"} for e in doc["series"]]
    masks = {}
    for series in scan_images(folder).series:
        shape = (len(series.slices), series.rows, series.columns)
        masks[series.series_hash] = read_mask(out / f"{series.series_hash}.seg.dcm", series, shape)
    return [doc["model"], *entries], masks


def test_a_runs_uri_predicts_what_the_run_folder_predicts(
    tracked_run: TrackedRun, small_sites: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """runs:/ID/final_model.pt (store from --tracking-uri, then from MLFLOW_TRACKING_URI) and models:/NAME/VERSION
    give the run folder's numbers and masks; the SEG names the MLflow run as the algorithm's version."""
    import pydicom

    series = scan_images(small_sites / "site-03", skip=("labels", "site.json")).series[0]
    folder = tmp_path / "series"
    folder.mkdir()
    for path in series.files:
        shutil.copy(path, folder / path.name)
    assert main(["predict", str(tracked_run.folder), str(folder), "--out", str(tmp_path / "folder")]) == 0
    expected = _outputs(tmp_path / "folder", folder)
    assert expected[0][0] == {"run_id": tracked_run.run_id, "task": "segmentation"}
    uri = f"runs:/{tracked_run.run_id}/final_model.pt"
    assert (
        main(["predict", uri, str(folder), "--out", str(tmp_path / "uri"), "--tracking-uri", tracked_run.tracking_uri])
        == 0
    )
    got = _outputs(tmp_path / "uri", folder)
    assert got[0] == expected[0]
    assert got[1].keys() == expected[1].keys() and all(np.array_equal(got[1][k], v) for k, v in expected[1].items())
    seg = pydicom.dcmread(next((tmp_path / "uri").glob("*.seg.dcm")), stop_before_pixels=True)
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == tracked_run.run_id

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked_run.tracking_uri, registry_uri=tracked_run.tracking_uri)
    client.create_registered_model("fedsite-seg")
    version = client.create_model_version(
        "fedsite-seg", source=f"runs:/{tracked_run.run_id}", run_id=tracked_run.run_id
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked_run.tracking_uri)
    capsys.readouterr()
    assert main(["predict", f"models:/fedsite-seg/{version.version}", str(folder), "--out", str(tmp_path / "m")]) == 0
    got = _outputs(tmp_path / "m", folder)
    assert got[0] == expected[0] and all(np.array_equal(got[1][k], v) for k, v in expected[1].items())


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_an_mlflow_uri_without_a_tracking_server_says_how_to_give_one(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["predict", "runs:/abc/final_model.pt", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    line = _one_line_error(capsys)
    assert "--tracking-uri URI" in line and "MLFLOW_TRACKING_URI" in line
    missing = tmp_path / "nowhere" / "mlflow.db"
    base = ["predict", "runs:/abc/final_model.pt", str(tmp_path), "--out", str(tmp_path / "o")]
    code = main([*base, "--tracking-uri", f"sqlite:///{missing}"])
    assert code == 2 and "no MLflow store at" in _one_line_error(capsys)
    assert not missing.parent.exists()


def test_an_unreachable_tracking_server_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    from tests.orthanc_helpers import free_port

    url = f"http://fedsite:s3cret@127.0.0.1:{free_port()}"
    base = ["predict", "runs:/abc/final_model.pt", str(tmp_path), "--out", str(tmp_path / "o")]
    code = main([*base, "--tracking-uri", url, "--timeout", "5"])
    line = _one_line_error(capsys)
    assert code == 2 and "is unreachable" in line and "s3cret" not in line
    assert not (tmp_path / "o").exists()


def test_an_unknown_run_a_missing_artifact_or_a_run_without_results_is_one_line_and_exit_2(
    tracked_run: TrackedRun, tmp_path: Path, capsys
) -> None:
    base = [str(tmp_path), "--out", str(tmp_path / "o"), "--tracking-uri", tracked_run.tracking_uri]
    unknown = "0123456789abcdef0123456789abcdef"
    assert main(["predict", f"runs:/{unknown}/final_model.pt", *base]) == 2
    line = _one_line_error(capsys)
    assert f"has no runs:/{unknown}/final_model.pt" in line and unknown in line
    assert main(["predict", f"runs:/{tracked_run.run_id}/best_model.pt", *base]) == 2
    assert "best_model.pt" in _one_line_error(capsys)
    assert main(["predict", f"runs:/{tracked_run.bare_run_id}/final_model.pt", *base]) == 2
    assert "has no results.json beside its weights" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()
