"""The site's Flower ClientApp: thin handlers that translate records to plain function calls.

Replies carry the model weights (``arrays``), numbers only (``metrics``; ``num-examples`` is the
count of training or validation samples, not batches) and the site's public name (``site``), so
the server can keep results per site. A site that refuses a round (its privacy budget would be
exceeded) replies with a ``refusal`` record and the reason instead of weights. No patient value
is ever put in a reply. Under DP a training reply carries only what the accountant covers
(epsilon, delta, noise, and the unit epsilon protects: :data:`common.units.UNIT_KEY`) and what the
site's policy publishes (:func:`_train_metrics`).

The handlers only translate: the round itself is :func:`client.rounds.train_round` and
:func:`client.rounds.evaluate_round`, plain code without Flower.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.policy import SitePolicy, load_policy
from client.rounds import (
    Refusal,
    SiteMemory,
    TrainOutcome,
    TrainRequest,
    evaluate_round,
    restore_local_norms,
    train_round,
)
from client.runtime import LoadedSite, apply_threads, loaded_site, model_for, resolve_site_dir
from common.config import RunConfig, parse_run_config
from common.errors import FedsiteError
from common.model import pick_device
from common.records import load_arrays, to_arrays
from common.units import UNIT_KEY, unit_code

__all__ = ["SiteError", "app", "evaluate", "prewarm", "train"]

app = ClientApp()
log = logging.getLogger("fedsite.client")


class SiteError(RuntimeError):
    """What the server is told when a site cannot serve a round: a reason without patient data."""


def _guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Report a failure to the server without leaking what a library put in its message.

    A library's exception can carry a file path (folder names are often PatientIDs) or a header
    value; the full error stays in the site's own log, the server gets the exception type and,
    for fedsite's own errors (:class:`common.errors.FedsiteError`), their message.
    """

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedsiteError as exc:
            log.error("site cannot serve this round: %s", exc)
            raise SiteError(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            log.exception("site cannot serve this round")
            raise SiteError(f"{type(exc).__name__} at the site (details in the site's own log)") from None

    return wrapper


def prewarm() -> None:
    """Ray's ``worker_process_setup_hook`` in simulation: importing this module is the warm-up.

    Each virtual site's process then imports torch, MONAI and the handlers while the server is
    still starting, instead of inside round 1. With ``FEDSITE_SITE_LOG=1`` in its environment the
    site's own log lines (``fedsite.client``, INFO) go to the process' standard error, which Ray
    forwards to the simulation's output when it runs with ``--verbose``.
    """
    if os.environ.get("FEDSITE_SITE_LOG") == "1":
        site_log = logging.getLogger("fedsite")
        if not site_log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            site_log.addHandler(handler)
        site_log.setLevel(logging.INFO)


# Context.state keys: what a site keeps between rounds (never sent).
_STATE_KEY = "privacy"
_MIA_KEY = "mia-reference"
_FEDBN_KEY = "fedbn-local"


def _recall(context: Context) -> SiteMemory:
    """The site's memory of this run, from ``Context.state``."""
    memory = SiteMemory()
    rec = context.state.config_records.get(_STATE_KEY)
    if rec is not None and "entries" in rec:
        memory.privacy_entries = json.loads(str(rec["entries"]))
    ref = context.state.config_records.get(_MIA_KEY)
    if ref is not None:
        memory.mia_reference = (list(ref["train"]), list(ref["held-out"]))
    local = context.state.array_records.get(_FEDBN_KEY)
    if local is not None:
        memory.fedbn_local = local.to_torch_state_dict()
    return memory


def _remember(context: Context, memory: SiteMemory) -> None:
    """Store the site's memory back into ``Context.state``."""
    if memory.privacy_entries:
        context.state[_STATE_KEY] = ConfigRecord({"entries": json.dumps(memory.privacy_entries)})
    if memory.mia_reference is not None:
        train_losses, held_out = memory.mia_reference
        context.state[_MIA_KEY] = ConfigRecord({"train": train_losses, "held-out": held_out})
    if memory.fedbn_local is not None:
        context.state[_FEDBN_KEY] = ArrayRecord(memory.fedbn_local)


def _site(context: Context) -> tuple[RunConfig, Path, LoadedSite, SitePolicy]:
    cfg = parse_run_config(context.run_config)
    site_dir = resolve_site_dir(context.node_config, cfg)
    return cfg, site_dir, loaded_site(site_dir, cfg), load_policy(site_dir, context.node_config)


def _train_metrics(outcome: TrainOutcome, policy: SitePolicy, threads: int, start: float) -> MetricRecord:
    """The training reply's metrics; under DP only what the accountant covers or the policy publishes.

    Under DP the training loss, samples seen, steps and timings (all functions of the training data
    or its size, outside the accountant) are not sent, and ``num-examples`` is the policy's
    ``public_size`` (1 when withheld: the sites are then averaged uniformly).
    """
    result = outcome.result
    if outcome.epsilon is not None:
        return MetricRecord(
            {
                "num-examples": policy.public_size or 1,
                "threads": threads,
                "uniform-weight": 1.0,
                "epsilon": outcome.epsilon,
                "delta": outcome.delta,
                "noise-multiplier": outcome.noise_multiplier,
                UNIT_KEY: unit_code(outcome.unit or "slice"),
            }
        )
    return MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "steps": result.steps,
            "samples-seen": result.samples_seen,
            "compute-s": result.seconds,
            "handler-s": time.perf_counter() - start,
            "threads": threads,
            "uniform-weight": 1.0,  # central DP averages sites uniformly
        }
    )


def _global_model(cfg: RunConfig, msg: Message, memory: SiteMemory):
    """The process' model holding the received global weights (and, under FedBN, the site's own norms)."""
    model = model_for(cfg.model, cfg.task)
    load_arrays(model, msg.content["arrays"])
    if bool(msg.content["config"].get("fedbn", False)):
        restore_local_norms(model, memory)
    return model


def _site_record(site: LoadedSite) -> ConfigRecord:
    return ConfigRecord({"name": site.name})


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split (with DP-SGD if configured)."""
    start = time.perf_counter()
    cfg, site_dir, site, policy = _site(context)
    threads = apply_threads(cfg, context.node_config)
    memory = _recall(context)
    model = _global_model(cfg, msg, memory)
    rc = msg.content["config"]
    request = TrainRequest(
        server_round=int(rc.get("server-round", 0)),
        epochs=int(rc.get("local-epochs", cfg.train.local_epochs)),
        batch_size=int(rc.get("batch-size", cfg.train.batch_size)),
        lr=float(rc.get("lr", cfg.train.lr)),
        optimizer=str(rc.get("optimizer", cfg.train.optimizer)),
        proximal_mu=float(rc.get("proximal-mu", 0.0)),
        fedbn=bool(rc.get("fedbn", False)),
    )
    try:
        outcome = train_round(
            model,
            site,
            cfg,
            request,
            memory,
            site_dir=site_dir,
            run_id=context.run_id,
            device=pick_device(),
            policy=policy,
        )
    finally:
        _remember(context, memory)  # e.g. the audit's baseline, kept even if the round fails
    if isinstance(outcome, Refusal):
        refusal = ConfigRecord({"kind": outcome.kind, "reason": outcome.reason})
        content = RecordDict({"site": _site_record(site), "refusal": refusal})
        if math.isfinite(outcome.delta):  # a budget refusal says what was spent; a policy refusal has no ledger
            spent = {"epsilon": outcome.epsilon, "delta": outcome.delta}
            if outcome.unit is not None:
                spent[UNIT_KEY] = unit_code(outcome.unit)
            content["privacy"] = MetricRecord(spent)
        return Message(content=content, reply_to=msg)
    metrics = _train_metrics(outcome, policy, threads, start)
    content = RecordDict({"arrays": to_arrays(model), "metrics": metrics, "site": _site_record(site)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's validation split (and audit membership leakage)."""
    start = time.perf_counter()
    cfg, _, site, policy = _site(context)
    apply_threads(cfg, context.node_config)
    memory = _recall(context)
    model = _global_model(cfg, msg, memory)
    outcome = evaluate_round(model, site, cfg, memory, device=pick_device(), policy=policy)
    scores = dict(outcome.scores)
    scores["uniform-weight"] = 1.0
    scores["compute-s"] = outcome.seconds
    scores["handler-s"] = time.perf_counter() - start
    content = RecordDict({"metrics": MetricRecord(scores), "site": _site_record(site)})
    return Message(content=content, reply_to=msg)
