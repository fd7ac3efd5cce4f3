"""``fedsite predict`` and ``fedsite site pull``: the model at the hospital, on folders and on its PACS.

* ``fedsite predict MODEL INPUT --out DIR``: MODEL is a run folder, its ``final_model.pt``, or an
  MLflow URI (``runs:/RUN_ID/final_model.pt`` with ``--tracking-uri URI``); every series under
  INPUT (a folder of DICOM, or a site folder whose ``labels/`` then gives reference masks) ->
  ``DIR/<series-hash>.seg.dcm`` (a
  segmentation model) or ``DIR/<series-hash>.sr.dcm`` (a classification model), and
  ``DIR/predictions.json`` with the per-series numbers (lesion volume ml, slices with findings,
  Dice against a reference mask; or the finding and its probability) and the rejected series
  with their reasons.
* ``fedsite predict MODEL --pacs URL --study UID [--out DIR]``: the study is pulled by WADO-RS
  into a temporary folder, predicted, and the outputs are stored back in one STOW-RS request once
  every series is done (nothing is stored when the model does not fit any series).
* ``fedsite site pull --pacs URL --query "Modality=MR StudyDate=2024..." --out SITE``: fills a
  site folder from the PACS (images in ``dicom/``, SEG objects of the same studies in ``labels/``).

Exit codes: 0 every series done; 1 some series were rejected (each with a one-line reason; the
others are done); 2 nothing could be done (model, input or PACS unusable). Nothing printed holds
a patient value: series and studies are named by salted hashes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FolderResult", "add_parser", "add_pull_parser", "predict_folder", "run", "run_pull"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedsite predict`` on the ``fedsite`` parser's subparsers."""
    p = subparsers.add_parser(
        "predict",
        help="apply a trained model to DICOM series (a folder or a PACS study): DICOM SEG / SR outputs",
        description="Apply a trained fedsite model to every series of INPUT (or of a PACS study) at its native grid.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a run folder (results.json, final_model.pt), its final_model.pt, or an MLflow URI "
        "(runs:/RUN_ID/final_model.pt, models:/NAME/VERSION)",
    )
    p.add_argument(
        "input", type=Path, nargs="?", metavar="INPUT", help="a folder of DICOM series (or a site folder with labels/)"
    )
    p.add_argument(
        "--out", type=Path, help="output folder (SEG/SR files and predictions.json); required without --pacs"
    )
    p.add_argument(
        "--pacs",
        metavar="URL",
        help="the PACS: DICOMweb root (http://pacs:8042/dicom-web) or DIMSE (dimse://AET@pacs:4242)",
    )
    p.add_argument("--study", metavar="UID", help="with --pacs: the StudyInstanceUID to predict")
    p.add_argument("--no-store", action="store_true", help="with --pacs: do not store the outputs back into the PACS")
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="with an MLflow MODEL: the tracking server or store (default: the MLFLOW_TRACKING_URI variable)",
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each PACS or MLflow request (default 60)"
    )


def add_pull_parser(site_subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedsite site pull`` on the ``fedsite site`` subparsers."""
    p = site_subparsers.add_parser(
        "pull",
        help="fill a site folder from the hospital's PACS: matching series as images, their studies' SEGs as masks",
    )
    p.add_argument(
        "--pacs",
        required=True,
        metavar="URL",
        help="the PACS: DICOMweb root (http://pacs:8042/dicom-web) or DIMSE (dimse://AET@pacs:4242)",
    )
    p.add_argument(
        "--query",
        default="",
        metavar="'KEY=VALUE ...'",
        help="series filters, e.g. 'Modality=MR StudyDate=20240101-20241231'",
    )
    p.add_argument("--out", type=Path, required=True, metavar="SITE", help="the site folder to fill (dicom/, labels/)")
    p.add_argument("--limit", type=int, default=0, help="at most this many series (0 = all)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each PACS request (default 60)")


@dataclass
class FolderResult:
    """What :func:`predict_folder` did."""

    predicted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)


def _say(line: str) -> None:
    print(line, flush=True)


def predict_folder(loaded, folder: Path, out: Path, *, say=_say) -> FolderResult:
    """Predict every series under ``folder`` and write the DICOM outputs and ``predictions.json`` to ``out``.

    Args:
        loaded: A :class:`client.predict.LoadedModel`.
        folder: DICOM series (any structure); a ``labels/`` folder in it gives reference masks.
        out: Output folder (created).
        say: Where the one-line progress messages go.

    Returns:
        The predicted series' numbers, the rejected series with reasons, the files written.

    Raises:
        client.errors.DicomError: If ``folder`` is not a folder.
    """
    from client.dicom_out import make_seg, make_sr, source_datasets, write
    from client.discovery import scan_images
    from client.errors import DicomError
    from client.layout import LABELS_DIR, RESERVED
    from client.masks import index_masks
    from client.predict import PredictError, predict_series

    folder = Path(folder)
    scan = scan_images(folder, skip=RESERVED)
    masks = index_masks(folder / LABELS_DIR) if (folder / LABELS_DIR).is_dir() else None
    result = FolderResult()
    out.mkdir(parents=True, exist_ok=True)
    if not scan.series:
        say(
            f"no readable image series under the input folder ({scan.files_total} files, {len(scan.rejected)} rejected)"
        )
    reasons: dict[str, int] = {}
    for r in scan.rejected:  # reasons name no patient value (client.dicom)
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        say(f"{count} file(s) not used: {reason}")
    for s in scan.series:
        refs = masks.masks_for(s) if masks is not None else []
        try:
            pred = predict_series(loaded, s, reference_mask=refs[0] if len(refs) == 1 else None)
            if s.kind == "file":
                path = None  # a NIfTI/NRRD volume: numbers only, no DICOM object to reference
            else:
                sources = source_datasets(s)
                if pred.mask is not None:
                    ds = make_seg(s, pred.mask, run_id=loaded.run_id, sources=sources)
                    path = write(ds, out / f"{s.series_hash}.seg.dcm")
                else:
                    names = loaded.cfg.task.class_names
                    ds = make_sr(s, pred.probabilities, positive=names[-1], run_id=loaded.run_id, sources=sources)
                    path = write(ds, out / f"{s.series_hash}.sr.dcm")
        except (PredictError, DicomError, ValueError) as exc:
            reason = str(exc) if str(exc).startswith("series ") else f"series {s.series_hash}: {exc}"
            result.rejected.append({"series": s.series_hash, "reason": reason})
            say(f"skipped {reason}")
            continue
        entry = {"series": s.series_hash, "modality": s.modality, **pred.numbers, "output": path.name if path else None}
        result.predicted.append(entry)
        if path is not None:
            result.outputs.append(path)
        say(_summary(entry))
    doc = {
        "model": {"run_id": loaded.run_id, "task": loaded.task},
        "series": result.predicted,
        "rejected": result.rejected,
        "files_rejected": [{"file": r.file, "reason": r.reason} for r in scan.rejected],
    }
    (out / "predictions.json").write_text(json.dumps(doc, indent=2) + "\n")
    return result


def _summary(e: dict) -> str:
    if "lesion_volume_ml" in e:
        line = (
            f"series {e['series']}: lesion {e['lesion_volume_ml']:.1f} ml "
            f"on {e['slices_with_findings']}/{e['slices']} slices"
        )
        if e.get("dice") is not None:
            line += f", Dice {e['dice']:.3f} against the reference mask"
    else:
        line = f"series {e['series']}: {e['finding']} (probability {e['probability']:.3f})"
    return line + (f" -> {e['output']}" if e.get("output") else "") + f" ({e['seconds']:.1f}s)"


def _predict(args: argparse.Namespace) -> int:
    from client.predict import load_model

    if args.pacs is None and (args.input is None or args.out is None):
        print("fedsite predict: error: give INPUT and --out DIR, or --pacs URL --study UID", file=sys.stderr)
        return 2
    if args.pacs is not None and not args.study:
        print("fedsite predict: error: --pacs needs --study UID (the study to predict)", file=sys.stderr)
        return 2
    if args.pacs is None and not args.input.is_dir():
        print(
            f"fedsite predict: error: input {args.input} is not a folder; give the folder holding the DICOM series",
            file=sys.stderr,
        )
        return 2
    loaded = load_model(args.model, tracking_uri=args.tracking_uri, timeout=args.timeout)
    started = time.perf_counter()
    if args.pacs is None:
        result = predict_folder(loaded, args.input, args.out)
        return _finish(result, args.out, started)
    return _predict_pacs(loaded, args, started)


def _predict_pacs(loaded, args: argparse.Namespace, started: float) -> int:
    from client.pacs import connect
    from client.phi import hash_id

    pacs = connect(args.pacs, timeout=args.timeout)
    study = hash_id(args.study)
    with tempfile.TemporaryDirectory(prefix="fedsite-study-") as tmp:
        work = Path(tmp)
        n = pacs.retrieve_study(args.study, work / "images")
        _say(f"study {study}: {n} instances pulled from the PACS")
        out = args.out if args.out is not None else work / "out"
        result = predict_folder(loaded, work / "images", out)
        if not result.outputs:
            _say(f"study {study}: nothing to store (no series predicted)")
        elif args.no_store:
            _say(f"study {study}: {len(result.outputs)} objects not stored (--no-store)")
        else:
            pacs.store(result.outputs)
            _say(f"study {study}: {len(result.outputs)} objects stored in the PACS")
        return _finish(result, args.out, started)


def _finish(result: FolderResult, out: Path | None, started: float) -> int:
    where = f" in {out}" if out is not None else ""
    _say(
        f"{len(result.predicted)} series predicted, {len(result.rejected)} rejected{where} "
        f"({time.perf_counter() - started:.1f}s)"
    )
    if not result.predicted:
        print("fedsite predict: error: no series could be predicted; see the reasons above", file=sys.stderr)
        return 1
    return 1 if result.rejected else 0


def run_pull(args: argparse.Namespace) -> int:
    """``fedsite site pull``: returns the exit code (errors are raised to the caller's handler)."""
    from client.pacs import connect, parse_query, pull_site

    pacs = connect(args.pacs, timeout=args.timeout)
    report = pull_site(pacs, parse_query(args.query), args.out, limit=args.limit or None, say=_say)
    _say(
        f"pulled {report['series']} series ({report['instances']} instances) "
        f"and {report['masks']} SEG masks into {args.out}; "
        f"next: fedsite site check {args.out}"
    )
    return 0 if report["series"] else 1


def run(args: argparse.Namespace) -> int:
    """Run ``fedsite predict``; returns the exit code and never shows a traceback."""
    from client.guard import run_guarded

    return run_guarded("fedsite predict", lambda: _predict(args), unexpected="nothing was stored in a PACS")
