"""The coordinator's Flower ServerApp: read the config, run the strategy, keep what it learns.

Thin over plain modules: :mod:`server.strategies` (which aggregation), :mod:`server.recording`
(per-site results, reply checks), :mod:`server.results` (results.json and the table), :mod:`server.tracking` (MLflow).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, flatten, parse_run_config
from common.metrics import summarize_sites
from common.model import build_model, load_start_weights
from common.records import to_arrays
from server.checkpoint import load_checkpoint, restore_rng, restore_strategy, save_checkpoint
from server.recording import RoundRecord, StopFederation
from server.results import build_results, network_line, round_metrics, site_table, write_json
from server.strategies import make_strategy
from server.tracking import Tracker, library_versions, ui_hint

app = ServerApp()
log = logging.getLogger("fedsite.server")


def output_dir(cfg: RunConfig) -> Path:
    """The run's output folder: ``output.dir`` or ``./fedsite-runs/<UTC time>``."""
    if cfg.output.dir:
        return Path(cfg.output.dir).expanduser().resolve()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path("fedsite-runs", stamp).resolve()


def train_config(cfg: RunConfig) -> ConfigRecord:
    """What every site is asked to do each round."""
    return ConfigRecord(
        {
            "local-epochs": cfg.train.local_epochs,
            "batch-size": cfg.train.batch_size,
            "lr": cfg.train.lr,
            "optimizer": cfg.train.optimizer,
        }
    )


def _progress(rec: RoundRecord, total: int, metric: str = "dice") -> str:
    mean, worst = summarize_sites(rec.per_site)
    if metric not in mean:
        return (
            f"round {rec.round}/{total}: no site returned {metric} ({len(rec.per_site)} evaluated, "
            f"{len(rec.rejected)} rejected) in {rec.seconds:.1f}s"
        )
    worst_site = next(s for s, m in sorted(rec.per_site.items()) if m.get(metric) == worst[metric])
    line = (
        f"round {rec.round}/{total}: mean {metric} {mean[metric]:.3f}, worst {worst[metric]:.3f} ({worst_site}), "
        f"{len(rec.per_site)} sites, {len(rec.rejected)} rejected, {rec.seconds:.1f}s"
    )
    if rec.skipped:
        line += f"; not aggregated: {rec.skipped}"
    if rec.central_privacy:
        line += f"; central (site-level) epsilon {rec.central_privacy['epsilon']:.3g}"
    if rec.privacy:
        eps = [p["epsilon"] for p in rec.privacy.values()]
        shown = "unbounded (no noise)" if any(e is None for e in eps) else f"{max(e for e in eps if e is not None):.3g}"
        units = sorted({p["unit"] for p in rec.privacy.values() if p.get("unit")})
        line += f"; max site epsilon {shown}" + (f" (per {'/'.join(units)})" if units else "")
    return line


#: Flower's per-phase wait when ``strategy.round-timeout`` is 0.
DEFAULT_TIMEOUT_S = 3600.0


def run_federation(
    grid: Grid, cfg: RunConfig, *, after_round: Callable[[int, ArrayRecord], None] | None = None
) -> dict:
    """Run all rounds on ``grid`` and write the results; returns the results dict.

    After every round a checkpoint (:mod:`server.checkpoint`) is written to the output folder; with
    ``output.resume`` the run continues from it: the checkpoint's model, strategy state, random
    states and per-site results, from the round after the last complete one (rounds already done are
    not run again, so no site spends privacy budget on them twice).

    Args:
        grid: Flower's grid.
        cfg: The run config.
        after_round: Called with the round and the global model after each round's checkpoint.
    """
    started = time.perf_counter()
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    flat = flatten(cfg)
    ckpt = load_checkpoint(out, flat) if cfg.output.resume else None
    tracker = Tracker(
        out,
        tracking_uri=cfg.output.tracking_uri,
        experiment=cfg.output.experiment,
        run_name=out.name,
        resume_run_id=ckpt.mlflow_run_id if ckpt else None,
    )
    tracker.start(flat)
    log.info("fedsite: %s, %d rounds, results in %s", cfg.strategy.name, cfg.num_server_rounds, out)

    def on_round(rec: RoundRecord) -> None:
        log.info(_progress(rec, cfg.num_server_rounds, cfg.task.metric))
        tracker.log_metrics(round_metrics(rec), step=rec.round)
        # Partial results after every round: a crash later loses nothing already learnt.
        write_json(out / "results.json", build_results(flat, recorder.records, total_s=time.perf_counter() - started))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)  # Flower samples the sites of a round with Python's random (fraction-train < 1)
    np.random.seed(cfg.seed)  # central DP's noise
    model = build_model(cfg.model, cfg.task)
    if cfg.model.init:  # start weights checked against the configured model before any site works
        log.info("start weights: %s", load_start_weights(model, cfg.model.init, fetch=tracker.fetch))
    recorder = make_strategy(cfg, on_round=on_round)
    initial = to_arrays(model)
    first_round = 1
    if ckpt is not None:
        restore_strategy(recorder, ckpt)
        recorder.restore(ckpt.records)
        restore_rng(ckpt)
        initial, first_round = ckpt.arrays, ckpt.round + 1
        log.info("resuming %s after round %d of %d", out, ckpt.round, cfg.num_server_rounds)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        save_checkpoint(
            out,
            server_round=server_round,
            config=flat,
            arrays=arrays,
            records=recorder.records,
            strategy=recorder,
            mlflow_run_id=tracker.wait(),
        )
        if after_round is not None:
            after_round(server_round, arrays)

    status = "FAILED"
    stopped: dict | None = None
    try:
        try:
            result = recorder.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=cfg.num_server_rounds,
                timeout=cfg.strategy.round_timeout or DEFAULT_TIMEOUT_S,
                train_config=train_config(cfg),
                evaluate_config=ConfigRecord({}),
                first_round=first_round,
                after_round=checkpoint,
            )
            final_arrays: ArrayRecord = result.arrays if result.arrays is not None else to_arrays(model)
        except StopFederation as stop:
            log.warning("round %d: federation stopped: %s", stop.server_round, stop.reason)
            stopped = {"round": stop.server_round, "reason": stop.reason}
            on_round(recorder.records[-1])
            final_arrays = recorder.latest_arrays if recorder.latest_arrays is not None else to_arrays(model)
        model.load_state_dict(final_arrays.to_torch_state_dict())
        model_path = out / "final_model.pt"
        torch.save(model.state_dict(), model_path)
        status = "FINISHED"
    finally:
        total = time.perf_counter() - started
        results = build_results(
            flat,
            recorder.records,
            total_s=total,
            extra={
                "versions": library_versions(),
                "mlflow": {"tracking_uri": tracker.tracking_uri, "run_id": tracker.wait()},
                **({"stopped": stopped} if stopped else {}),
            },
        )
        write_json(out / "results.json", results)
        if status == "FINISHED":
            tracker.log_artifact(out / "final_model.pt")
        tracker.log_artifact(out / "results.json")
        tracker.log_metrics({"total-s": total}, step=cfg.num_server_rounds)
        tracker.finish(status)
    log.info("per-site results:\n%s", site_table(results, metric=cfg.task.metric))
    log.info(network_line(results))
    log.info("results: %s", out / "results.json")
    log.info("open the MLflow store with: %s", ui_hint(tracker.tracking_uri))
    return results


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point of the coordinator."""
    fed = logging.getLogger("fedsite")
    fed.setLevel(logging.INFO)
    if not fed.handlers and not logging.getLogger().handlers:
        # Deployed (flwr-serverapp): fedsite's lines once; the root logger stays quiet, so Flower's
        # own lines are not printed twice and httpx's request lines not at all.
        fed.addHandler(logging.StreamHandler(sys.stdout))
        fed.propagate = False
    cfg = parse_run_config(context.run_config)
    run_federation(grid, cfg)
