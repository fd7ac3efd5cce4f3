"""The site's Flower ClientApp: thin handlers that translate records to plain function calls.

Replies carry the model weights (``arrays``), numbers only (``metrics``; ``num-examples`` is the
count of training or validation samples, not batches) and the site's public name (``site``), so
the server can keep results per site. A site that refuses a round (its privacy budget would be
exceeded) replies with a ``refusal`` record and the reason instead of weights. No patient value
is ever put in a reply.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.dicom import DicomError
from client.ledger import LedgerError, current_epsilon, ledger_for, private_round
from client.runtime import apply_threads, loaded_site, model_for, resolve_site_dir, site_seed
from common import task
from common.config import ConfigError, parse_run_config
from common.model import norm_keys, pick_device
from common.privacy import PrivacyBudgetExceeded, loss_attack_auc, membership_auc, per_sample_losses
from common.records import RecordError, load_arrays, to_arrays

app = ClientApp()
log = logging.getLogger("fedsite.client")


class SiteError(RuntimeError):
    """What the server is told when a site cannot serve a round: a reason without patient data."""


# Errors whose messages fedsite writes itself and keeps free of patient values.
_SAFE_ERRORS = (DicomError, RecordError, ConfigError, LedgerError)


def _guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Report a failure to the server without leaking what a library put in its message.

    A library's exception can carry a file path (folder names are often PatientIDs) or a header
    value; the full error stays in the site's own log, the server gets the exception type and,
    for fedsite's own errors, their message.
    """

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except _SAFE_ERRORS as exc:
            log.error("site cannot serve this round: %s", exc)
            raise SiteError(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            log.exception("site cannot serve this round")
            raise SiteError(f"{type(exc).__name__} at the site (details in the site's own log)") from None

    return wrapper


_STATE_KEY = "privacy"
_MIA_KEY = "mia-reference"
_FEDBN_KEY = "fedbn-local"


def _load_global(model: torch.nn.Module, msg: Message, context: Context) -> bool:
    """Load the global weights; under FedBN put this site's own normalization layers back.

    Returns:
        True when FedBN is on (the caller then saves the local layers after training).
    """
    load_arrays(model, msg.content["arrays"])
    if not bool(msg.content["config"].get("fedbn", False)):
        return False
    local = context.state.array_records.get(_FEDBN_KEY)
    if local is not None:  # first round: the site starts from the global initialization
        state = model.state_dict()
        state.update({k: v.to(state[k].dtype) for k, v in local.to_torch_state_dict().items()})
        model.load_state_dict(state)
    return True


def _save_local(model: torch.nn.Module, context: Context) -> None:
    keys = set(norm_keys(model))
    context.state[_FEDBN_KEY] = ArrayRecord(
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keys}
    )


def _site(context: Context):
    cfg = parse_run_config(context.run_config)
    site_dir = resolve_site_dir(context.node_config, cfg)
    return cfg, site_dir, loaded_site(site_dir, cfg)


def _class_weights(cfg, site) -> torch.Tensor | None:
    """Inverse-frequency weights from this site's own training labels (classification, if enabled)."""
    if cfg.task.name != "classification" or not cfg.task.class_weighted:
        return None
    return task.class_weights(site.train.labels, len(cfg.task.class_names))


def _state_entries(context: Context) -> list[dict]:
    rec = context.state.config_records.get(_STATE_KEY)
    return json.loads(str(rec["entries"])) if rec is not None and "entries" in rec else []


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split (with DP-SGD if configured)."""
    start = time.perf_counter()
    cfg, site_dir, site = _site(context)
    threads = apply_threads(cfg, context.node_config)
    model = model_for(cfg.model, cfg.task)
    fedbn = _load_global(model, msg, context)
    rc = msg.content["config"]
    server_round = int(rc.get("server-round", 0))
    kwargs = dict(
        epochs=int(rc.get("local-epochs", cfg.train.local_epochs)),
        batch_size=int(rc.get("batch-size", cfg.train.batch_size)),
        lr=float(rc.get("lr", cfg.train.lr)),
        optimizer=str(rc.get("optimizer", cfg.train.optimizer)),
        proximal_mu=float(rc.get("proximal-mu", 0.0)),
        seed=site_seed(cfg.seed, site.name, server_round),
        device=pick_device(),
        task=cfg.task.name,
        weights=_class_weights(cfg, site),
    )
    extra: dict[str, float] = {}
    if site.audit is not None and _MIA_KEY not in context.state.config_records:
        # Per-sample losses under the first global model this site sees: the attack's baseline.
        ref = ConfigRecord(
            {
                "train": per_sample_losses(model, site.train).tolist(),
                "held-out": per_sample_losses(model, site.audit).tolist(),
            }
        )
        context.state[_MIA_KEY] = ref
    if cfg.privacy.dp:
        ledger = ledger_for(site_dir, site.name, cfg)
        try:
            done = private_round(
                model,
                site.train,
                cfg,
                ledger=ledger,
                state_entries=_state_entries(context),
                run_id=context.run_id,
                server_round=server_round,
                **kwargs,
            )
        except PrivacyBudgetExceeded as exc:
            log.warning("site %s refuses round %d: %s", site.name, server_round, exc)
            eps, delta = current_epsilon(ledger.entries(), cfg, len(site.train))
            refusal = ConfigRecord({"kind": "privacy-budget", "reason": str(exc)})
            spent = MetricRecord({"epsilon": eps, "delta": delta})
            content = RecordDict({"site": ConfigRecord({"name": site.name}), "refusal": refusal, "privacy": spent})
            return Message(content=content, reply_to=msg)
        context.state[_STATE_KEY] = ConfigRecord({"entries": json.dumps(done.entries)})
        result = done.result
        extra = {"epsilon": done.epsilon, "delta": done.delta, "noise-multiplier": done.noise_multiplier}
    else:
        result = task.train(model, site.train, **kwargs)
    if fedbn:
        _save_local(model, context)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "steps": result.steps,
            "samples-seen": result.samples_seen,
            "compute-s": result.seconds,
            "handler-s": time.perf_counter() - start,
            "threads": threads,
            "uniform-weight": 1.0,  # central DP averages sites uniformly
            **extra,
        }
    )
    content = RecordDict({"arrays": to_arrays(model), "metrics": metrics, "site": ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's validation split (and audit membership leakage)."""
    start = time.perf_counter()
    cfg, _, site = _site(context)
    apply_threads(cfg, context.node_config)
    model = model_for(cfg.model, cfg.task)
    _load_global(model, msg, context)
    t0 = time.perf_counter()
    device = pick_device()
    scores = task.evaluate(model, site.val, batch_size=max(cfg.train.batch_size, 32), device=device, task=cfg.task.name)
    if site.audit is not None:
        # The site attacks its own model: can its training slices be told from held-out slices
        # of the same patients?
        scores["mia-auc"] = membership_auc(model, site.train, site.audit, device=device)
        ref = context.state.config_records.get(_MIA_KEY)
        if ref is not None:  # the same attack against the run's initial model (should be ~0.5)
            scores["mia-auc-initial"] = loss_attack_auc(np.asarray(ref["train"]), np.asarray(ref["held-out"]))
    scores["uniform-weight"] = 1.0
    scores["compute-s"] = time.perf_counter() - t0
    scores["handler-s"] = time.perf_counter() - start
    content = RecordDict({"metrics": MetricRecord(scores), "site": ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)
