"""Time to predict one series on CPU (12 and 120 slices) with the run's default UNet; JSON out.

Each series is a simulated MR study (256 x 256 at 0.94 mm, 5 mm slices, the site-01 scanner).
Timed per series, median of ``--repeats``: ``read`` (DICOM decode), ``infer`` (orientation,
resampling to the model's spacing, sliding-window inference over whole slices, resampling back
onto the source grid), ``seg`` (building the DICOM SEG with highdicom) and ``total`` (the three).
The model is the default run config's network (UNet 16,32,64,128 at 64 px / 3.75 mm) with random
weights unless ``--model`` names a run folder: the time does not depend on the weights.

Usage::

    python benchmarks/predict.py --out benchmarks/results/predict.json [--threads 2] [--model RUN]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", default="12,120", help="comma-separated slice counts (default 12,120)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--model", type=Path, help="a run folder; default: the default config's UNet, random weights")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    warnings.filterwarnings("ignore")
    import torch

    from client.dicom_out import make_seg, source_datasets
    from client.discovery import read_series, scan_images
    from client.predict import LoadedModel, load_model, segment_series
    from common.config import RunConfig
    from common.model import build_model
    from simulations.synth import write_site

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        loaded = load_model(args.model)
    else:
        cfg = RunConfig()
        torch.manual_seed(0)
        loaded = LoadedModel(
            model=build_model(cfg.model, cfg.task).eval(), cfg=cfg, run_id="benchmark", source=Path(".")
        )
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsite-bench-") as tmp:
        for n in (int(s) for s in args.slices.split(",")):
            site = write_site(Path(tmp) / f"z{n}", 0, seed=5, patients=1, slices=n)
            series = scan_images(site, skip=("labels", "site.json")).series[0]
            times: dict[str, list[float]] = {"read": [], "infer": [], "seg": [], "total": []}
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                volume = read_series(series)
                t1 = time.perf_counter()
                mask = segment_series(loaded, series, volume)
                t2 = time.perf_counter()
                make_seg(series, mask, run_id=loaded.run_id, sources=source_datasets(series))
                t3 = time.perf_counter()
                for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                    times[k].append(v)
            rows.append(
                {
                    "slices": n,
                    "rows": series.rows,
                    "columns": series.columns,
                    **{f"{k}_s": round(statistics.median(v), 3) for k, v in times.items()},
                    "per_slice_s": round(statistics.median(times["total"]) / n, 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    doc = {
        "benchmark": "predict one series on CPU",
        "model": {
            "channels": loaded.cfg.model.channels,
            "image_size": loaded.cfg.data.image_size,
            "spacing_mm": loaded.cfg.data.spacing_mm,
        },
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "series": rows,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
