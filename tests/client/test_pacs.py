"""fedsite against a real PACS: Orthanc with DICOMweb, started on loopback by the tests and stopped by them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from client.discovery import scan_images
from client.masks import index_masks, read_mask
from client.phi import hash_id
from client.predict import dice
from fedsite.cli import main
from tests.conftest import TINY_SEG
from tests.orthanc_helpers import orthanc, orthanc_missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.pacs,
    pytest.mark.skipif(orthanc_missing() is not None, reason=orthanc_missing() or ""),
]

#: The tiny model's Dice on site-03's unseen patients is 0.85-0.92 per series (tests/test_predict.py).
DICE_FLOOR = 0.7
SITES = ("site-01", "site-03")
#: The end-to-end federation: 2 sites (site-01 pulled from the PACS, site-02 generated), TINY_SEG, FedAvg, the
#: default learning rate. Rounds after the first cost about 1.5 s each; Ray's start (the first round) dominates.
E2E_ROUNDS, E2E_LOCAL_EPOCHS, E2E_LR = 8, 3, 0.003
#: Measured: Dice 0.790 of the SEG read back from the PACS (site-03 series 2; the run's validation Dice 0.824 on its two
#: sites). Other settings gave 0.803 (3 rounds x 4 epochs, lr 0.01) and 0.770 (6 x 3, lr 0.01): the floor keeps a
#: margin of about 0.17 below the lowest.
E2E_DICE_FLOOR = 0.6


def _series(folder: Path):
    return scan_images(folder, skip=("labels", "site.json")).series


@pytest.fixture(scope="module")
def pacs(small_sites: Path, tmp_path_factory: pytest.TempPathFactory):
    """Orthanc holding the MR studies of site-01 and site-03 and, for each series, a reference SEG (the annotator's)."""
    from client.dicom_out import make_seg, write

    tmp = tmp_path_factory.mktemp("orthanc")
    with orthanc(tmp) as server:
        for name in SITES:
            folder = small_sites / name
            masks = index_masks(folder / "labels")
            for series in _series(folder):
                for path in series.files:
                    server.upload(path)
                shape = (len(series.slices), series.rows, series.columns)
                reference = read_mask(masks.masks_for(series)[0], series, shape)
                seg = write(
                    make_seg(series, reference, run_id="", manual=True), tmp / "refs" / f"{series.series_hash}.dcm"
                )
                server.upload(seg)
        yield server


def _instances(server) -> int:
    return len(server.get("/instances"))


def test_site_pull_fills_a_site_folder_that_site_check_and_training_accept(
    pacs, small_sites: Path, tmp_path: Path, capsys
) -> None:
    """Images and reference SEGs pulled by query give the very samples the original site folders give."""
    from client.dataset import load_site
    from common.config import DataConfig

    site = tmp_path / "pulled-site"
    code = main(["site", "pull", "--pacs", pacs.dicomweb, "--query", "Modality=MR", "--out", str(site)])
    out = capsys.readouterr().out
    n_series = sum(len(_series(small_sites / s)) for s in SITES)
    assert code == 0
    assert f"pulled {n_series} series" in out and f"and {n_series} SEG masks" in out
    assert main(["site", "check", str(site)]) == 0
    assert f"{n_series}" in capsys.readouterr().out
    cfg = DataConfig(image_size=32, spacing_mm=7.5)
    pulled = load_site(site, cfg, seed=1, use_cache=False)
    originals = [load_site(small_sites / s, cfg, seed=1, use_cache=False) for s in SITES]

    def by_key(samples: list[dict]) -> dict[tuple[str, int], dict]:
        return {(s["series"], s["slice"]): s for s in samples}

    mine = by_key(pulled.train + pulled.val)
    theirs = by_key([s for o in originals for s in o.train + o.val])
    assert mine.keys() == theirs.keys()
    for key, sample in theirs.items():
        assert torch.equal(mine[key]["label"], sample["label"]), key
        assert torch.allclose(mine[key]["image"], sample["image"]), key


def _fedsite_segs(pacs, study: str) -> list[pydicom.Dataset]:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=pacs.dicomweb)
    out = []
    for item in client.search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"}):
        for ds in client.retrieve_series(study, item["0020000E"]["Value"][0]):
            if ds.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC":
                out.append(ds)
    return out


def test_predict_on_a_pacs_study_stores_a_seg_that_aligns_with_the_reference(
    pacs, tiny_seg_run: Path, small_sites: Path, tmp_path: Path, capsys
) -> None:
    """WADO-RS pull, predict, STOW-RS push: the SEG read back from Orthanc references the source instances and
    overlaps the reference mask above the floor; nothing printed names the study."""
    import highdicom as hd

    folder = small_sites / "site-03"
    series = _series(folder)[0]
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.files]
    study = source[0].StudyInstanceUID
    before = _instances(pacs)
    code = main(
        ["predict", str(tiny_seg_run), "--pacs", pacs.dicomweb, "--study", study, "--out", str(tmp_path / "out")]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert study not in captured.out + captured.err and hash_id(study) in captured.out
    assert _instances(pacs) == before + 1
    segs = _fedsite_segs(pacs, study)
    assert len(segs) == 1
    seg = hd.seg.Segmentation.from_dataset(segs[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in source
    }
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "tinyseg0001"
    path = tmp_path / "from-pacs.dcm"
    segs[0].save_as(path, enforce_file_format=True)
    shape = (len(series.slices), series.rows, series.columns)
    reference = read_mask(index_masks(folder / "labels").masks_for(series)[0], series, shape)
    predicted = read_mask(path, series, shape)
    score = dice(predicted, reference)
    assert score > DICE_FLOOR
    doc = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert doc["series"][0]["series"] == series.series_hash and doc["series"][0]["lesion_volume_ml"] > 0
    assert np.array_equal(predicted, read_mask(tmp_path / "out" / doc["series"][0]["output"], series, shape))


def test_an_unreachable_pacs_is_one_line_and_exit_2(tiny_seg_run: Path, capsys) -> None:
    from tests.orthanc_helpers import free_port

    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    code = main(["predict", str(tiny_seg_run), "--pacs", url, "--study", "1.2.3.4", "--timeout", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "is unreachable" in err[0] and url in err[0] and "1.2.3.4" not in err[0]
    code = main(
        [
            "site",
            "pull",
            "--pacs",
            url,
            "--query",
            "Modality=MR",
            "--out",
            "/nonexistent/never-written",
            "--timeout",
            "5",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is unreachable" in err[0]
    assert not Path("/nonexistent/never-written").exists()


def test_a_study_the_pacs_does_not_have_is_one_line_and_nothing_is_stored(pacs, tiny_seg_run: Path, capsys) -> None:
    before = _instances(pacs)
    code = main(["predict", str(tiny_seg_run), "--pacs", pacs.dicomweb, "--study", "1.2.826.0.1.999.1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "no such" in err[0] and "1.2.826.0.1.999.1" not in err[0]
    assert _instances(pacs) == before


def test_a_model_of_another_task_stores_nothing_in_the_pacs(pacs, small_sites: Path, tmp_path: Path, capsys) -> None:
    """A chest X-ray classifier on an MR study: each series refused with the reason, exit 1, the PACS unchanged."""
    from common.config import flatten, parse_run_config
    from common.model import build_model

    cfg = parse_run_config({"task.name": "classification", "model.channels": "4,8,8,8", "data.image-size": 32})
    run = tmp_path / "cls-run"
    run.mkdir()
    torch.save(build_model(cfg.model, cfg.task).state_dict(), run / "final_model.pt")
    (run / "results.json").write_text(json.dumps({"config": flatten(cfg)}))
    study = pydicom.dcmread(_series(small_sites / "site-03")[0].files[0], stop_before_pixels=True).StudyInstanceUID
    before = _instances(pacs)
    code = main(["predict", str(run), "--pacs", pacs.dicomweb, "--study", study])
    captured = capsys.readouterr()
    assert code == 1
    assert "classifies projection images (CR/DX) but this series is a MR cross-sectional series" in captured.out
    assert "nothing to store" in captured.out
    assert _instances(pacs) == before


def test_dimse_pull_predict_and_store_work_like_dicomweb(
    pacs, tiny_seg_run: Path, small_sites: Path, tmp_path: Path, capsys
) -> None:
    """dimse://AET@host:port: site pull by C-FIND/C-GET gives the files DICOMweb gives; predict C-STOREs one SEG."""
    site = tmp_path / "dimse-site"
    assert main(["site", "pull", "--pacs", pacs.dimse, "--query", "Modality=MR", "--out", str(site)]) == 0
    web = tmp_path / "web-site"
    assert main(["site", "pull", "--pacs", pacs.dicomweb, "--query", "Modality=MR", "--out", str(web)]) == 0
    names = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.dcm"))
    assert names and names == sorted(p.relative_to(web).as_posix() for p in web.rglob("*.dcm"))
    series = _series(small_sites / "site-03")[1]
    study = pydicom.dcmread(series.files[0], stop_before_pixels=True).StudyInstanceUID
    before = _instances(pacs)
    capsys.readouterr()
    assert main(["predict", str(tiny_seg_run), "--pacs", pacs.dimse, "--study", study]) == 0
    assert _instances(pacs) == before + 1
    assert len(_fedsite_segs(pacs, study)) == 1
    from tests.orthanc_helpers import free_port

    code = main(
        [
            "predict",
            str(tiny_seg_run),
            "--pacs",
            f"dimse://NOPACS@127.0.0.1:{free_port()}",
            "--study",
            study,
            "--timeout",
            "5",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unreachable" in err[0] and study not in err[0]


def test_a_site_pulled_from_the_pacs_trains_in_a_simulation_whose_seg_on_another_study_aligns(
    pacs, small_sites: Path, tmp_path: Path, capsys
) -> None:
    """End to end: pull site-01's series by query (its scanner's Manufacturer) into a site folder, federate it with a
    generated site in a small Flower simulation, predict a site-03 study (a third scanner) through the PACS with the
    run folder the simulation wrote, read the SEG back from Orthanc: it overlaps the reference above the floor.
    """
    import shutil

    import highdicom as hd

    sites = tmp_path / "sites"
    query = ["--query", "Modality=MR Manufacturer=SIEMENS"]
    assert main(["site", "pull", "--pacs", pacs.dicomweb, *query, "--out", str(sites / "site-01")]) == 0
    assert f"pulled {len(_series(small_sites / 'site-01'))} series" in capsys.readouterr().out
    # the hospital names its site (the optional site.json); the simulation takes a folder of named sites as it is
    (sites / "site-01" / "site.json").write_text(json.dumps({"name": "site-01"}))
    shutil.copytree(small_sites / "site-02", sites / "site-02")  # a generated site, never in the PACS
    run = tmp_path / "run"
    tiny = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in TINY_SEG.items() if k != "seed")
    rounds = ["--rounds", str(E2E_ROUNDS), "--local-epochs", str(E2E_LOCAL_EPOCHS), "--seed", str(TINY_SEG["seed"])]
    config = ["--run-config", f"{tiny} train.lr={E2E_LR}"]
    code = main(["simulate", "--sites", "2", *rounds, "--data-root", str(sites), "--out", str(run), *config])
    assert code == 0, capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert set(results["final"]["per_site"]) == {"site-01", "site-02"}
    val = results["final"]["mean"]["dice"]
    series = _series(small_sites / "site-03")[2]
    study = pydicom.dcmread(series.files[0], stop_before_pixels=True).StudyInstanceUID
    assert main(["predict", str(run), "--pacs", pacs.dicomweb, "--study", study]) == 0
    segs = _fedsite_segs(pacs, study)
    assert len(segs) == 1
    seg = hd.seg.Segmentation.from_dataset(segs[0])
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series.files
    }
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == results["mlflow"]["run_id"]
    path = tmp_path / "seg.dcm"
    segs[0].save_as(path, enforce_file_format=True)
    shape = (len(series.slices), series.rows, series.columns)
    reference = read_mask(index_masks(small_sites / "site-03" / "labels").masks_for(series)[0], series, shape)
    score = dice(read_mask(path, series, shape), reference)
    print(f"validation Dice of the simulation {val:.3f}; Dice of the SEG read back from the PACS {score:.3f}")
    assert score > E2E_DICE_FLOOR
