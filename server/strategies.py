"""Strategies that keep results per site and reject misbehaving replies with a reason.

Flower's metric aggregation averages the sites' numbers and forgets who sent what. The strategies
here wrap Flower's FedAvg and FedProx with :class:`SiteRecording`: every reply names its site (a
``site`` ConfigRecord), each reply is checked before it is aggregated (a reply with wrong weights,
non-finite numbers or no samples is dropped, and the reason is logged and kept), and each round's
per-site results are handed to a callback as a :class:`RoundRecord`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from common.config import RunConfig
from common.metrics import summarize_sites
from common.records import RecordError, check_arrays

__all__ = [
    "CentralDP",
    "RoundRecord",
    "SiteFedAdam",
    "SiteFedAvg",
    "SiteFedBN",
    "SiteFedProx",
    "SiteFedYogi",
    "SiteRecording",
    "StopFederation",
    "make_strategy",
    "recorder_of",
    "summarize",
]

log = logging.getLogger("fedsite.server")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class RoundRecord:
    """What happened in one round, per site."""

    round: int
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_timing: dict[str, dict[str, float]] = field(default_factory=dict)
    privacy: dict[str, dict[str, float | None]] = field(default_factory=dict)
    central_privacy: dict[str, float] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def mean(self) -> dict[str, float]:
        """Unweighted mean over sites of each evaluation metric (every site counts the same)."""
        return summarize(self.per_site)[0]

    def worst(self) -> dict[str, float]:
        """The worst site's value of each metric (lowest Dice, highest loss)."""
        return summarize(self.per_site)[1]


#: Mean and worst over sites (every site counts the same): the shared rule of :mod:`common.metrics`.
summarize = summarize_sites


#: Scores a site may report; each must lie in [0, 1].
_UNIT_SCORES = (
    "dice",
    "auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "balanced-accuracy",
    "ece",
    "mia-auc",
    "mia-auc-initial",
)
_REPORTED_EVAL = (*_UNIT_SCORES, "loss", "num-examples")
_REPORTED_TRAIN = ("num-examples", "samples-seen", "train-loss", "steps", "compute-s", "handler-s", "threads")
#: The metric an evaluation reply must carry, per task (a classification site whose validation
#: split holds one class cannot compute AUC, so there accuracy is the minimum).
_REQUIRED_EVAL = {"dice": "dice", "auc": "accuracy"}
_TIMING = ("compute-s", "handler-s")


class StopFederation(RuntimeError):
    """Raised by a strategy to end the federation early (e.g. a site's privacy budget is spent)."""

    def __init__(self, server_round: int, reason: str) -> None:
        super().__init__(reason)
        self.server_round = server_round
        self.reason = reason


def _epsilon(value: object) -> float | None:
    """Epsilon for results: None when unbounded (clipping without noise gives no guarantee)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class SiteRecording:
    """Mixin for a Flower Message-API strategy: per-site results and reply checks.

    Args (keyword, via :meth:`init_recording`):
        on_round: Called with each finished :class:`RoundRecord`.
    """

    _records: dict[int, RoundRecord]
    _on_round: Callable[[RoundRecord], None] | None
    _round_start: float
    _global_ref: dict[str, np.ndarray]

    def init_recording(
        self,
        on_round: Callable[[RoundRecord], None] | None = None,
        *,
        stop_on_budget: bool = False,
        metric: str = "dice",
    ) -> None:
        self._records = {}
        self.metric = metric
        self._on_round = on_round
        self._round_start = time.perf_counter()
        self._global_ref = {}
        self._stop_on_budget = stop_on_budget
        self.latest_arrays: ArrayRecord | None = None

    @property
    def stop_on_budget(self) -> bool:
        """Whether a site's privacy-budget refusal ends the federation."""
        return self._stop_on_budget

    @property
    def records(self) -> list[RoundRecord]:
        """Finished and current rounds, in order."""
        return [self._records[r] for r in sorted(self._records)]

    def _record(self, server_round: int) -> RoundRecord:
        return self._records.setdefault(server_round, RoundRecord(round=server_round))

    # --- checks -------------------------------------------------------------------------------
    def _site_of(self, msg: Message) -> str | None:
        rec = msg.content.config_records.get("site")
        name = rec.get("name") if isinstance(rec, ConfigRecord) else None
        if isinstance(name, str) and _SAFE_NAME.match(name):
            return name
        return None

    def _check(self, msg: Message, *, is_train: bool, seen: set[str]) -> tuple[str, str | None]:
        """Return (site label, reason to reject or None)."""
        node = f"node-{msg.metadata.src_node_id}"
        if msg.has_error():
            return node, f"site reported an error: {msg.error.reason}"
        site = self._site_of(msg)
        if site is None:
            return node, "reply has no valid 'site' name (letters, digits, '.', '_', '-'; at most 64)"
        if site in seen:
            return f"{site}@{node}", f"a second node claims the site name '{site}'"
        refusal = msg.content.config_records.get("refusal")
        if isinstance(refusal, ConfigRecord):
            return site, f"refused ({refusal.get('kind', 'unspecified')}): {refusal.get('reason', 'no reason given')}"
        metrics = msg.content.metric_records.get("metrics")
        if not isinstance(metrics, MetricRecord):
            return site, "reply has no 'metrics' record"
        n = metrics.get("num-examples")
        if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            return site, f"num-examples must be a positive number, got {n!r}"
        for key, value in metrics.items():
            # epsilon is infinite, honestly, when a site clips without noise
            if key != "epsilon" and isinstance(value, (int, float)) and not math.isfinite(value):
                return site, f"metric '{key}' is not finite"
        if is_train:
            arrays = msg.content.array_records.get("arrays")
            if not isinstance(arrays, ArrayRecord):
                return site, "training reply has no 'arrays' record"
            try:
                check_arrays(arrays, self._global_ref, what="the global model")
            except RecordError as exc:
                return site, str(exc)
        else:
            required = _REQUIRED_EVAL.get(self.metric, self.metric)
            if required not in metrics:
                return site, f"evaluation reply has no '{required}'"
            for key in _UNIT_SCORES:
                value = metrics.get(key)
                if value is not None and (not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
                    return site, f"{key} must be in [0, 1], got {value!r}"
        return site, None

    def _filter(
        self, server_round: int, replies: Iterable[Message], *, is_train: bool
    ) -> tuple[list[Message], dict[str, Message]]:
        rec = self._record(server_round)
        good: list[Message] = []
        by_site: dict[str, Message] = {}
        for msg in replies:
            site, reason = self._check(msg, is_train=is_train, seen=set(by_site))
            if reason is None:
                good.append(msg)
                by_site[site] = msg
            else:
                phase = "train" if is_train else "evaluate"
                log.warning("round %d %s: rejected reply from %s: %s", server_round, phase, site, reason)
                rec.rejected.append({"site": site, "phase": phase, "reason": reason})
                spent = msg.content.metric_records.get("privacy") if not msg.has_error() else None
                if isinstance(spent, MetricRecord) and "epsilon" in spent:
                    rec.privacy[site] = {"epsilon": _epsilon(spent["epsilon"]), "delta": float(spent.get("delta", 0.0))}
        return good, by_site

    # --- strategy hooks -----------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        self._global_ref = {k: v.numpy() for k, v in arrays.items()}
        self.latest_arrays = arrays
        self._record(server_round)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good, by_site = self._filter(server_round, replies, is_train=True)
        rec = self._record(server_round)
        for site, msg in by_site.items():
            m = msg.content["metrics"]
            rec.train[site] = {k: float(m[k]) for k in _REPORTED_TRAIN if k in m}
            if "epsilon" in m:
                rec.privacy[site] = {"epsilon": _epsilon(m["epsilon"]), "delta": float(m.get("delta", 0.0))}
        refused = [
            r for r in rec.rejected if r["phase"] == "train" and r["reason"].startswith("refused (privacy-budget)")
        ]
        if refused and self._stop_on_budget:
            sites = ", ".join(r["site"] for r in refused)
            raise StopFederation(
                server_round, f"privacy budget spent at {sites}; privacy.on-budget = 'stop' ends the federation"
            )
        if not good:
            log.warning("round %d: no usable training replies; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, good)  # type: ignore[misc]
        if arrays is not None:
            self.latest_arrays = arrays
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good, by_site = self._filter(server_round, replies, is_train=False)
        rec = self._record(server_round)
        for site, msg in sorted(by_site.items()):
            m = msg.content["metrics"]
            rec.per_site[site] = {k: float(m[k]) for k in _REPORTED_EVAL if k in m}
            rec.eval_timing[site] = {k: float(m[k]) for k in _TIMING if k in m}
        rec.seconds = time.perf_counter() - self._round_start
        aggregated = super().aggregate_evaluate(server_round, good) if good else None  # type: ignore[misc]
        if self._on_round is not None:
            self._on_round(rec)
        return aggregated


class SiteFedAvg(SiteRecording, FedAvg):
    """FedAvg (weights averaged by training samples) with per-site results."""


class SiteFedProx(SiteRecording, FedProx):
    """FedProx: FedAvg on the server; each site adds ``mu/2 ||w - w_global||^2`` to its loss."""


class SiteFedAdam(SiteRecording, FedAdam):
    """FedAdam: the averaged update is a pseudo-gradient for a server-side Adam step."""


class SiteFedYogi(SiteRecording, FedYogi):
    """FedYogi: as FedAdam with Yogi's additive second-moment update."""


class SiteFedBN(SiteFedAvg):
    """FedBN: every layer is averaged except normalization layers, which stay at each site.

    Sites keep their own normalization weights and statistics between rounds (in Flower's
    ``Context.state``) and ignore the global ones; the server never averages them: after each
    aggregation the normalization entries of the global model are put back to what they were.

    Args:
        local_keys: State-dict keys of the normalization layers (:func:`common.model.norm_keys`).
    """

    def __init__(self, *, local_keys: list[str], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.local_keys = list(local_keys)
        self._previous: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._previous = arrays
        config["fedbn"] = True
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["fedbn"] = True
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self._previous is not None:
            for key in self.local_keys:
                arrays[key] = self._previous[key]
            self.latest_arrays = arrays
        return arrays, metrics


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Central (client-level) DP: Flower's server-side fixed-clipping wrapper plus accounting.

    Each site's update is clipped to ``clipping_norm``, the average (uniform over sites) gets
    Gaussian noise, and Flower's RDP accountant composes one release per round. The guarantee is
    per *site* (whether a whole hospital took part), not per patient, and the noise is divided
    by the number of sites, so a useful epsilon needs tens to hundreds of sites per round.

    Flower's own accounted mode insists on plain ``FedAvg.aggregate_train``; the per-site
    recording overrides it, so the accountant is composed here after each noisy aggregation.
    """

    def __init__(
        self, inner: SiteRecording, *, noise_multiplier: float, clipping_norm: float, num_sites: int, delta: float
    ) -> None:
        super().__init__(inner, noise_multiplier, clipping_norm, num_sites)  # type: ignore[arg-type]
        self.recorder = inner
        self._num_sites = num_sites
        self._accountant = RdpAccountant(
            FlowerPrivacyConfig(
                target_delta=delta,
                population_size=num_sites,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        rec = self.recorder._record(server_round)
        usable = []
        current = self.current_arrays.to_numpy_ndarrays()
        for msg in replies:
            if msg.has_error() or "arrays" not in msg.content.array_records:
                usable.append(msg)  # the recorder rejects it with its reason
                continue
            update = [a - b for a, b in zip(msg.content["arrays"].to_numpy_ndarrays(), current)]
            if not any(np.any(u) for u in update):
                # Flower's clipping divides by the update's norm; an all-zero update cannot be clipped.
                site = self.recorder._site_of(msg) or f"node-{msg.metadata.src_node_id}"
                rec.rejected.append(
                    {"site": site, "phase": "train", "reason": "update is exactly zero (nothing learnt)"}
                )
                continue
            usable.append(msg)
        with_arrays = [m for m in usable if not m.has_error() and "arrays" in m.content.array_records]
        if len(with_arrays) != self._num_sites:
            # The noise is scaled for num_sites updates; fewer would make each count more than accounted.
            log.warning(
                "round %d: central DP needs all %d sites' updates, got %d; the global model is unchanged",
                server_round,
                self._num_sites,
                len(with_arrays),
            )
            self.recorder.aggregate_train(server_round, [])  # record the round without aggregating
            return None, None
        arrays, metrics = super().aggregate_train(server_round, usable)
        if arrays is not None:
            self._accountant.compose(
                GaussianPrivacyEvent(
                    noise_multiplier=self.noise_multiplier, sample_size=self._num_sites, population_size=self._num_sites
                )
            )
            spent = self._accountant.get_privacy_spent()
            self.recorder._record(server_round).central_privacy = {
                "epsilon": float(spent.epsilon),
                "delta": float(spent.delta),
            }
            self.recorder.latest_arrays = arrays
        return arrays, metrics


def recorder_of(strategy: object) -> SiteRecording:
    """The per-site recorder inside a (possibly wrapped) strategy."""
    return getattr(strategy, "recorder", strategy)  # type: ignore[return-value]


def make_strategy(cfg: RunConfig, *, on_round: Callable[[RoundRecord], None] | None = None) -> SiteRecording:
    """Build the strategy named by ``strategy.name`` (wrapped for central DP if configured).

    Args:
        cfg: The run config.
        on_round: Called with each finished round's per-site record.

    Returns:
        A Flower strategy; :func:`recorder_of` gives its per-site records.
    """
    s = cfg.strategy
    common = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_sites,
        min_evaluate_nodes=s.min_sites,
        min_available_nodes=s.min_sites,
        # Central DP bounds one site's influence only if every site weighs the same.
        weighted_by_key="uniform-weight" if cfg.privacy.central_dp else "num-examples",
    )
    strategy: SiteRecording
    if s.name == "fedprox":
        strategy = SiteFedProx(proximal_mu=s.proximal_mu, **common)
    elif s.name == "fedbn":
        from common.model import build_model, norm_keys

        strategy = SiteFedBN(local_keys=norm_keys(build_model(cfg.model, cfg.task)), **common)
    elif s.name == "fedadam":
        strategy = SiteFedAdam(eta=s.effective_server_lr, eta_l=cfg.train.lr, tau=s.tau, **common)
    elif s.name == "fedyogi":
        strategy = SiteFedYogi(eta=s.effective_server_lr, eta_l=cfg.train.lr, tau=s.tau, **common)
    else:
        strategy = SiteFedAvg(**common)
    strategy.init_recording(
        on_round, stop_on_budget=cfg.privacy.dp and cfg.privacy.on_budget == "stop", metric=cfg.task.metric
    )
    if cfg.privacy.central_dp:
        return CentralDP(  # type: ignore[return-value]
            strategy,
            noise_multiplier=cfg.privacy.central_noise,
            clipping_norm=cfg.privacy.central_clip,
            num_sites=cfg.sim.sites if cfg.sim.sites >= s.min_sites else s.min_sites,
            delta=cfg.privacy.delta if cfg.privacy.delta > 0 else 1.0 / (10 * max(cfg.sim.sites, s.min_sites)),
        )
    return strategy
