"""``fedsite predict`` on folders: masks on the source grid, DICOM SEG / SR outputs, dciodvfy, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import ComputedRadiographyImageStorage

from client.discovery import scan_images
from client.masks import index_masks, read_mask
from client.phi import hash_id
from client.predict import LoadedModel, PredictError, dice, load_model, predict_series, segment_series
from client.predict_cli import predict_folder
from common.config import parse_run_config
from common.model import build_model
from fedsite.cli import main
from tests.dicom_fixtures import write_series

#: Measured (README, "Using the model at a hospital"): the tiny model (tests/conftest.py, TINY_SEG) reaches
#: 0.77-0.91 per series on the unseen patients of site-03 and 0.85-0.90 on the 2 mm scanner.
DICE_FLOOR = 0.7


class ThresholdNet(torch.nn.Module):
    """A "segmentation model" that marks pixels whose scaled intensity is above 0.5 (exact geometry checks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(0.5 - x) * 50, (x - 0.5) * 50], dim=1)


def _threshold_model(spacing: float = 2.0) -> LoadedModel:
    cfg = parse_run_config({"data.spacing-mm": spacing, "data.image-size": 32})
    return LoadedModel(model=ThresholdNet(), cfg=cfg, run_id="threshold", source=Path("."))


def _blob(shape: tuple[int, int, int]) -> np.ndarray:
    """An off-centre box, asymmetric in every axis, so that any flip or transposition moves it."""
    z, y, x = shape
    vol = np.zeros(shape, np.uint16)
    vol[1 : z - 1, 2 : y // 2, 3 : x // 3 + 3] = 1000
    vol[1, 2:5, 3:5] = 0  # a notch in one corner
    return vol


ORIENTATIONS = {
    "axial": (1, 0, 0, 0, 1, 0),
    "axial-flipped-rows": (-1, 0, 0, 0, 1, 0),
    "axial-flipped-columns": (1, 0, 0, 0, -1, 0),
    "coronal": (1, 0, 0, 0, 0, -1),
    "sagittal": (0, 1, 0, 0, 0, -1),
    "axial-transposed": (0, 1, 0, 1, 0, 0),
}


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_mask_lands_on_the_source_voxels_whatever_the_stored_orientation(tmp_path: Path, name: str) -> None:
    """At the model's own spacing no interpolation happens: the mask is the bright box, voxel for voxel."""
    volume = _blob((5, 24, 40))  # rows != columns: a swapped axis cannot go unnoticed
    write_series(tmp_path / "s", volume, iop=ORIENTATIONS[name], spacing=(2.0, 2.0), gap=2.0)
    series = scan_images(tmp_path / "s").series[0]
    mask = segment_series(_threshold_model(2.0), series)
    assert mask.shape == volume.shape
    np.testing.assert_array_equal(mask, (volume > 0).astype(np.uint8))


def test_mask_of_a_finer_series_is_resampled_back_onto_its_own_pixels(tmp_path: Path) -> None:
    """A 0.8 mm series seen by a 2 mm model: the mask is on the 0.8 mm grid and covers the box (Dice > 0.9)."""
    volume = _blob((4, 100, 120))
    write_series(tmp_path / "s", volume, iop=ORIENTATIONS["coronal"], spacing=(0.8, 0.8), gap=3.0)
    series = scan_images(tmp_path / "s").series[0]
    mask = segment_series(_threshold_model(2.0), series)
    assert mask.shape == volume.shape
    assert dice(mask, volume > 0) > 0.9


@pytest.fixture(scope="module")
def other_resolution_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three patients from a scanner unlike any training site: 128 x 128 at 2 mm, 3 mm slices, 10 slices."""
    from simulations.profiles import profile_for_site
    from simulations.synth import write_site

    profile = dataclasses.replace(
        profile_for_site(2), name="coarse-2mm", matrix=128, pixel_spacing_mm=2.0, slice_thickness_mm=3.0
    )
    return write_site(tmp_path_factory.mktemp("coarse"), 0, seed=11, patients=3, slices=10, profile=profile)


def _seg_checks(seg_path: Path, series, mask: np.ndarray, run_id: str) -> None:
    """The SEG references every source instance, shares their frame of reference, and holds ``mask``."""
    seg = pydicom.dcmread(seg_path)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.files]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert (seg.Rows, seg.Columns) == (series.rows, series.columns)
    assert int(seg.NumberOfFrames) == len(series.slices)
    frame_ipp = [
        [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    np.testing.assert_allclose(
        sorted(frame_ipp), sorted([[float(v) for v in s.ImagePositionPatient] for s in sources]), atol=1e-3
    )
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("fedsite", run_id)
    np.testing.assert_array_equal(read_mask(seg_path, series, mask.shape), mask)


def test_unseen_patients_and_another_resolution_get_seg_on_their_grid_above_the_dice_floor(
    tiny_seg_run: Path, small_sites: Path, other_resolution_site: Path, tmp_path: Path
) -> None:
    """Site-03 (not trained on) and a 2 mm / 3 mm-slice scanner: SEG on the source grid, Dice against the reference."""
    loaded = load_model(tiny_seg_run)
    lines: list[str] = []
    for folder in (small_sites / "site-03", other_resolution_site):
        out = tmp_path / folder.name
        result = predict_folder(loaded, folder, out, say=lines.append)
        assert not result.rejected
        masks = index_masks(folder / "labels")
        for series in scan_images(folder, skip=("labels", "site.json")).series:
            entry = next(e for e in result.predicted if e["series"] == series.series_hash)
            assert entry["dice"] > DICE_FLOOR, (folder.name, entry)
            reference = read_mask(masks.masks_for(series)[0], series, (len(series.slices), series.rows, series.columns))
            seg_path = out / entry["output"]
            predicted = read_mask(seg_path, series, reference.shape)
            assert dice(predicted, reference) == pytest.approx(entry["dice"], abs=1e-4)
            _seg_checks(seg_path, series, predicted, "tinyseg0001")
            row, col = series.pixel_spacing
            assert entry["lesion_volume_ml"] == pytest.approx(
                predicted.sum() * row * col * series.slice_spacing / 1000, abs=1e-3
            )
            assert entry["slices_with_findings"] == int(predicted.any(axis=(1, 2)).sum())
        doc = json.loads((out / "predictions.json").read_text())
        assert {e["series"] for e in doc["series"]} == {e["series"] for e in result.predicted}
    assert any("Dice" in line for line in lines)


def _cr_series(folder: Path) -> Path:
    image = (np.random.default_rng(0).random((1, 100, 90)) * 1000).astype(np.uint16)
    write_series(
        folder, image, modality="CR", sop_class=ComputedRadiographyImageStorage, spacing=(0.5, 0.5), patient_id="CRPAT7"
    )
    return folder


def _classifier() -> LoadedModel:
    cfg = parse_run_config({"task.name": "classification", "model.channels": "4,8,8,8", "data.image-size": 32})
    torch.manual_seed(0)
    return LoadedModel(model=build_model(cfg.model, cfg.task).eval(), cfg=cfg, run_id="cls-run-7", source=Path("."))


def test_classification_writes_an_sr_holding_the_finding_and_its_probability(tmp_path: Path) -> None:
    """The SR's coded content gives back the model's probabilities and the most probable class as the finding."""
    import highdicom as hd

    folder = _cr_series(tmp_path / "cr")
    loaded = _classifier()
    series = scan_images(folder).series[0]
    expected = predict_series(loaded, series).probabilities
    result = predict_folder(loaded, folder, tmp_path / "out", say=lambda _m: None)
    sr = hd.sr.srread(tmp_path / "out" / result.predicted[0]["output"])
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
    group = sr.content.get_planar_roi_measurement_groups() + sr.content.get_image_measurement_groups()
    values = {m.name.meaning.removeprefix("Probability of "): m.value for m in group[0].get_measurements()}
    assert values == pytest.approx(expected, abs=1e-6)
    finding = group[0].finding_type.meaning
    assert finding == max(expected, key=expected.__getitem__)


def test_a_model_whose_task_does_not_fit_the_series_is_refused_with_a_reason(
    tmp_path: Path, tiny_seg_run: Path, capsys
) -> None:
    """A segmentation model on a chest X-ray: one line naming the mismatch, exit 1, nothing written but the report."""
    folder = _cr_series(tmp_path / "cr")
    out = tmp_path / "out"
    code = main(["predict", str(tiny_seg_run), str(folder), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "segments cross-sectional series (MR/CT) but this series is a CR projection image" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["predictions.json"]
    with pytest.raises(PredictError, match="classifies projection images"):
        series = scan_images(_mr_folder(tmp_path)).series[0]
        predict_series(_classifier(), series)


def _mr_folder(tmp_path: Path) -> Path:
    write_series(tmp_path / "mr", _blob((3, 20, 20)), spacing=(2.0, 2.0))
    return tmp_path / "mr"


def test_a_damaged_series_is_skipped_with_its_reason_and_the_others_are_predicted(
    tmp_path: Path, small_sites: Path, tiny_seg_run: Path, capsys
) -> None:
    """One series' pixel data is cut short: it is named by hash with the reason, the others get their SEG, exit 1."""
    folder = tmp_path / "site"
    shutil.copytree(small_sites / "site-03", folder, ignore=shutil.ignore_patterns(".fedsite-cache"))
    series = scan_images(folder, skip=("labels", "site.json")).series
    broken = series[0]
    data = broken.files[1].read_bytes()
    broken.files[1].write_bytes(data[: len(data) - 4000])
    code = main(["predict", str(tiny_seg_run), str(folder), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 1
    assert f"skipped series {broken.series_hash}:" in out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.seg.dcm")) == sorted(
        f"{s.series_hash}.seg.dcm" for s in series[1:]
    )


def test_predict_prints_no_patient_values(tmp_path: Path, small_sites: Path, tiny_seg_run: Path, capsys) -> None:
    """No PatientID, name, or UID of the source appears in what the command prints or in predictions.json."""
    folder = small_sites / "site-03"
    code = main(["predict", str(tiny_seg_run), str(folder), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0
    text = captured.out + captured.err + (tmp_path / "out" / "predictions.json").read_text()
    values = set()
    for series in scan_images(folder, skip=("labels", "site.json")).series:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        values |= {str(ds.PatientID), str(ds.PatientName), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        assert hash_id(ds.SeriesInstanceUID) in text
    assert not [v for v in values if v and v in text]


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (Debian package dicom3tools)")
def test_every_object_fedsite_writes_passes_dciodvfy_without_errors(
    tmp_path: Path, small_sites: Path, tiny_seg_run: Path
) -> None:
    """The model's SEG, a reference SEG (manual) and the classification SR: dciodvfy reports no error."""
    from client.dicom_out import make_seg, write

    seg_out = predict_folder(
        load_model(tiny_seg_run), small_sites / "site-03", tmp_path / "seg", say=lambda _m: None
    ).outputs
    sr_out = predict_folder(_classifier(), _cr_series(tmp_path / "cr"), tmp_path / "sr", say=lambda _m: None).outputs
    series = scan_images(small_sites / "site-03", skip=("labels", "site.json")).series[0]
    manual = write(
        make_seg(series, np.ones((len(series.slices), series.rows, series.columns), np.uint8), run_id="", manual=True),
        tmp_path / "manual.seg.dcm",
    )
    written = [*seg_out, *sr_out, manual]
    assert len(written) == 4 + 1 + 1  # site-03: 4 patients
    for path in written:
        assert _dciodvfy_errors(path) == [], path.name


def test_only_seg_objects_drawn_by_a_person_count_as_reference_masks(small_sites: Path) -> None:
    """A site pulled from a PACS must not learn from model outputs: AUTOMATIC SEGs (fedsite's own) are not labels."""
    from client.dicom_out import make_seg
    from client.pacs import is_reference_seg

    series = scan_images(small_sites / "site-03", skip=("labels", "site.json")).series[0]
    mask = np.zeros((len(series.slices), series.rows, series.columns), np.uint8)
    assert is_reference_seg(make_seg(series, mask, run_id="", manual=True))
    assert not is_reference_seg(make_seg(series, mask, run_id="run-1"))
