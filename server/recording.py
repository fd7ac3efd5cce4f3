"""A strategy wrapper that keeps results per site and rejects misbehaving replies with a reason.

Flower's metric aggregation averages the sites' numbers and forgets who sent what.
:class:`RecordingStrategy` holds any Flower Message-API strategy (FedAvg, FedProx, FedAdam, ...,
or another wrapper such as :class:`server.fedbn.FedBN` or :class:`server.central_dp.CentralDP`)
and delegates the aggregation to it, the way Flower's own DP wrappers do. Before delegating it
checks every reply (a reply with wrong weights, non-finite numbers, an out-of-range score, no
samples or no valid site name is dropped, and the reason is logged and kept), and it hands each
round's per-site results to a callback as a :class:`RoundRecord`.

Two ways for a wrapped strategy to tell the recorder something, without touching its state:

* raise :class:`RoundNotAggregated` from ``aggregate_train`` (the round is recorded as skipped
  with that reason and the global model stays as it was);
* return the keys :data:`CENTRAL_EPSILON` and :data:`CENTRAL_DELTA` in its aggregated training
  metrics (recorded as the round's ``central_privacy``).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import MultiKrum, Result, Strategy
from flwr.serverapp.strategy.multikrum import select_multikrum

from common.metrics import summarize_sites
from common.records import RecordError, check_arrays
from common.units import UNIT_KEY, unit_name
from server.screening import screen_distances, update_distance
from server.wire import message_bytes, phase_of, reply_records, unexpected_content

__all__ = [
    "CENTRAL_DELTA",
    "CENTRAL_EPSILON",
    "QuorumLost",
    "RecordingStrategy",
    "ReplyCheck",
    "RoundNotAggregated",
    "RoundRecord",
    "StopFederation",
    "check_reply",
    "inner_of",
    "site_of",
]

log = logging.getLogger("fedsite.server")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: Aggregated training metrics a wrapped strategy returns to report central (site-level) privacy.
CENTRAL_EPSILON = "central-epsilon"
CENTRAL_DELTA = "central-delta"

#: Scores a site may report; each must lie in [0, 1].
UNIT_SCORES = (
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
_REPORTED_EVAL = (*UNIT_SCORES, "loss", "num-examples")
_REPORTED_TRAIN = ("num-examples", "samples-seen", "train-loss", "steps", "compute-s", "handler-s", "threads")
#: The metric an evaluation reply must carry, per task (a classification site whose validation
#: split holds one class cannot compute AUC, so there accuracy is the minimum).
_REQUIRED_EVAL = {"dice": "dice", "auc": "accuracy"}
_TIMING = ("compute-s", "handler-s")

#: An extra check of a training reply's weights against the global model: a reason to reject, or None.
ReplyCheck = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], "str | None"]


@dataclass
class RoundRecord:
    """What happened in one round, per site."""

    round: int
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_timing: dict[str, dict[str, float]] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per site: ``epsilon`` (None = unbounded), ``delta`` and, when the site names it, ``unit`` ("patient"/"slice")."""
    central_privacy: dict[str, float] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    #: Sites that did not contribute: late (no reply before the deadline), failed or refusing.
    missing: list[dict[str, str]] = field(default_factory=list)
    #: Why the round's first attempt failed and it was run again ("" when it was not).
    retried: str = ""
    #: Krum / MultiKrum: the sites whose updates were chosen and averaged (empty for other strategies).
    selected: list[str] = field(default_factory=list)
    #: Why the round's training was not aggregated ("" when it was, or when no reply was usable).
    skipped: str = ""
    seconds: float = 0.0
    #: What crossed the network, per site and phase: ``sent_bytes`` and ``received_bytes`` (Flower's serialised
    #: messages, :func:`server.wire.message_bytes`; a retried round adds both attempts) and the reply's
    #: ``reply_records`` (record names and keys, :func:`server.wire.reply_records`).
    network: dict[str, dict[str, dict]] = field(default_factory=dict)

    def mean(self) -> dict[str, float]:
        """Unweighted mean over sites of each evaluation metric (every site counts the same)."""
        return summarize_sites(self.per_site)[0]

    def worst(self) -> dict[str, float]:
        """The worst site's value of each metric (lowest Dice, highest loss)."""
        return summarize_sites(self.per_site)[1]


class StopFederation(RuntimeError):
    """Raised by a strategy to end the federation early (e.g. a site's privacy budget is spent)."""

    def __init__(self, server_round: int, reason: str) -> None:
        super().__init__(reason)
        self.server_round = server_round
        self.reason = reason


class RoundNotAggregated(RuntimeError):
    """Raised by a wrapped strategy's ``aggregate_train`` when the round must not change the model.

    Args:
        reason: Why, naming the setting that decides it; kept as the round's ``skipped``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class QuorumLost(RuntimeError):
    """Fewer than ``min_sites`` sites answered a round's training in time (errors and refusals do not count)."""

    def __init__(self, server_round: int, usable: int, needed: int) -> None:
        super().__init__(f"round {server_round}: {usable} sites answered in time, strategy.min-sites = {needed} needed")
        self.server_round = server_round
        self.usable = usable
        self.needed = needed


def _epsilon(value: object) -> float | None:
    """Epsilon for results: None when unbounded (clipping without noise gives no guarantee)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _spent(m: MetricRecord) -> dict[str, Any]:
    """A site's privacy account from its reply: epsilon, delta and, when the site names it, the unit."""
    out: dict[str, Any] = {"epsilon": _epsilon(m["epsilon"]), "delta": float(m.get("delta", 0.0))}
    unit = unit_name(m.get(UNIT_KEY))
    if unit is not None:
        out["unit"] = unit  # "patient" or "slice": what epsilon protects
    return out


def site_of(msg: Message) -> str | None:
    """The site name a reply carries in its ``site`` ConfigRecord, or None if absent or unsafe."""
    rec = msg.content.config_records.get("site")
    name = rec.get("name") if isinstance(rec, ConfigRecord) else None
    if isinstance(name, str) and _SAFE_NAME.match(name):
        return name
    return None


def check_reply(
    msg: Message,
    *,
    is_train: bool,
    seen: set[str],
    global_ref: Mapping[str, np.ndarray],
    metric: str = "dice",
    checks: Sequence[ReplyCheck] = (),
) -> tuple[str, str | None]:
    """Check one site's reply before it is aggregated.

    Args:
        msg: The reply.
        is_train: Whether it answers a training (else an evaluation) instruction.
        seen: Site names already accepted this round (a second node may not claim one).
        global_ref: The global model sent this round, by state-dict key.
        metric: The task's primary metric (``"dice"`` or ``"auc"``).
        checks: Extra checks of a training reply's weights (e.g. central DP's non-zero update).

    Returns:
        ``(site label, reason to reject or None)``; the label is ``node-<id>`` when the reply
        names no valid site. A reply holding a record, key or list beyond weights, counts, metrics and
        the site's name is rejected (:func:`server.wire.unexpected_content`).
    """
    node = f"node-{msg.metadata.src_node_id}"
    if msg.has_error():
        return node, f"site reported an error: {msg.error.reason}"
    site = site_of(msg)
    if site is None:
        return node, "reply has no valid 'site' name (letters, digits, '.', '_', '-'; at most 64)"
    if site in seen:
        return f"{site}@{node}", f"a second node claims the site name '{site}'"
    surplus = unexpected_content(msg, phase=phase_of(msg, is_train=is_train))
    if surplus is not None:
        return site, surplus
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
            check_arrays(arrays, global_ref, what="the global model")
        except RecordError as exc:
            return site, str(exc)
        if checks:
            local = {k: v.numpy() for k, v in arrays.items()}
            for check in checks:
                reason = check(local, global_ref)
                if reason is not None:
                    return site, reason
    else:
        required = _REQUIRED_EVAL.get(metric, metric)
        if required not in metrics:
            return site, f"evaluation reply has no '{required}'"
        for key in UNIT_SCORES:
            value = metrics.get(key)
            if value is not None and (not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
                return site, f"{key} must be in [0, 1], got {value!r}"
    return site, None


class RecordingStrategy(Strategy):
    """Wrap a Flower strategy: per-site results and reply checks; the aggregation is the inner one's.

    Args:
        strategy: The Flower Message-API strategy (or wrapper) that aggregates the accepted replies.
        on_round: Called with each finished :class:`RoundRecord` (after the round's evaluation).
        stop_on_budget: Whether a site's privacy-budget refusal ends the federation
            (:class:`StopFederation`).
        metric: The task's primary metric, ``"dice"`` or ``"auc"``.
        checks: Extra checks of each training reply's weights (see :data:`ReplyCheck`).
        screen_mad: Reject a training update whose distance to the global model is this many scaled
            MADs above the sites' median (:mod:`server.screening`); 0 = off.
        min_sites: The quorum: a round where fewer sites answered in time (errors and refusals do not count;
            replies rejected by the checks do) raises :class:`QuorumLost`
            (:meth:`start` retries it once, then stops the federation); 0 = no quorum.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
        stop_on_budget: bool = False,
        metric: str = "dice",
        checks: Sequence[ReplyCheck] = (),
        screen_mad: float = 0.0,
        min_sites: int = 0,
    ) -> None:
        self.strategy = strategy
        self.screen_mad = screen_mad
        self.min_sites = min_sites
        self._node_site: dict[int, str] = {}
        #: The node each sent instruction went to, by message id: an error reply the SuperLink writes
        #: for a node that stopped answering comes from the SuperLink, not from that node.
        self._sent_to: dict[str, int] = {}
        self.metric = metric
        self.stop_on_budget = stop_on_budget
        self.checks = tuple(checks)
        self._on_round = on_round
        self._records: dict[int, RoundRecord] = {}
        self._round_start = time.perf_counter()
        self._global_ref: dict[str, np.ndarray] = {}
        #: The latest global model (the last aggregation, else the last one sent).
        self.latest_arrays: ArrayRecord | None = None

    def __repr__(self) -> str:
        return f"RecordingStrategy({self.strategy!r})"

    @property
    def records(self) -> list[RoundRecord]:
        """Finished and current rounds, in order."""
        return [self._records[r] for r in sorted(self._records)]

    def record(self, server_round: int) -> RoundRecord:
        """The record of ``server_round`` (created empty on first use)."""
        return self._records.setdefault(server_round, RoundRecord(round=server_round))

    def _filter(
        self, server_round: int, replies: Iterable[Message], *, is_train: bool
    ) -> tuple[list[Message], dict[str, Message]]:
        rec = self.record(server_round)
        good: list[Message] = []
        by_site: dict[str, Message] = {}
        phase = "train" if is_train else "evaluate"
        for msg in replies:
            node = self._origin(msg)
            site, reason = check_reply(
                msg,
                is_train=is_train,
                seen=set(by_site),
                global_ref=self._global_ref,
                metric=self.metric,
                checks=self.checks if is_train else (),
            )
            if reason is None:
                good.append(msg)
                by_site[site] = msg
                self._learn_site(node, site)
                continue
            if node != msg.metadata.src_node_id:  # the SuperLink answered for the node
                site = self._node_site.get(node, f"node-{node}")
            log.warning("round %d %s: rejected reply from %s: %s", server_round, phase, site, reason)
            rec.rejected.append({"site": site, "phase": phase, "reason": reason})
            if reason.startswith(("site reported an error", "refused (")):
                known = site_of(msg) if not msg.has_error() else None
                if known is not None:
                    self._learn_site(node, known)
                name = self._node_site.get(node, site)
                rec.missing.append({"site": name, "phase": phase, "reason": reason})
            spent = msg.content.metric_records.get("privacy") if not msg.has_error() else None
            if isinstance(spent, MetricRecord) and "epsilon" in spent:
                rec.privacy[site] = _spent(spent)
        # In site-name order, not arrival order: a float32 sum depends on its order, and one ulp in
        # the global weights can change a later round's Dice (the same seed gave 0.000 and 0.566).
        return [by_site[site] for site in sorted(by_site)], by_site

    def _screen(
        self, server_round: int, good: list[Message], by_site: dict[str, Message]
    ) -> tuple[list[Message], dict[str, Message]]:
        """Drop the updates far outside the others' (``screen_mad``), recording each with its reason."""
        if self.screen_mad <= 0 or len(by_site) < 3:
            return good, by_site
        distances = {
            site: update_distance({k: v.numpy() for k, v in msg.content["arrays"].items()}, self._global_ref)
            for site, msg in by_site.items()
        }
        outliers = screen_distances(distances, self.screen_mad)
        rec = self.record(server_round)
        for site, reason in outliers.items():
            log.warning("round %d train: rejected reply from %s: %s", server_round, site, reason)
            rec.rejected.append({"site": site, "phase": "train", "reason": reason})
        dropped = {id(by_site[site]) for site in outliers}
        return [m for m in good if id(m) not in dropped], {s: m for s, m in by_site.items() if s not in outliers}

    # --- the Strategy interface, delegated ---------------------------------------------------
    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the replies are checked against; the inner strategy configures."""
        self._round_start = time.perf_counter()
        self._global_ref = {k: v.numpy() for k, v in arrays.items()}
        self.latest_arrays = arrays
        self.record(server_round)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check and record the replies; the inner strategy aggregates the accepted ones.

        Raises:
            StopFederation: If a site refused for its privacy budget and ``stop_on_budget`` is set.
        """
        replies = list(replies)
        rec = self.record(server_round)
        before = len(rec.missing)
        good, by_site = self._filter(server_round, replies, is_train=True)
        # answered in time: every reply but the errors and refusals (now in rec.missing)
        answered = len(replies) - (len(rec.missing) - before)
        good, by_site = self._screen(server_round, good, by_site)
        for site, msg in by_site.items():
            m = msg.content["metrics"]
            rec.train[site] = {k: float(m[k]) for k in _REPORTED_TRAIN if k in m}
            if "epsilon" in m:
                rec.privacy[site] = _spent(m)
        refused = [
            r for r in rec.rejected if r["phase"] == "train" and r["reason"].startswith("refused (privacy-budget)")
        ]
        if refused and self.stop_on_budget:
            sites = ", ".join(r["site"] for r in refused)
            raise StopFederation(
                server_round, f"privacy budget spent at {sites}; privacy.on-budget = 'stop' ends the federation"
            )
        if answered < self.min_sites:
            raise QuorumLost(server_round, answered, self.min_sites)
        if not good:
            log.warning("round %d: no usable training replies; the global model is unchanged", server_round)
            return None, None
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, good)
        except RoundNotAggregated as skip:
            log.warning("round %d: %s; the global model is unchanged", server_round, skip.reason)
            rec.skipped = skip.reason
            return None, None
        if metrics is not None and CENTRAL_EPSILON in metrics:
            rec.central_privacy = {"epsilon": float(metrics[CENTRAL_EPSILON]), "delta": float(metrics[CENTRAL_DELTA])}
        if arrays is not None:
            self.latest_arrays = arrays
            rec.selected = self._krum_selected(good, by_site)
        elif not rec.skipped:
            rec.skipped = f"{type(self.strategy).__name__} aggregated none of {len(good)} accepted replies"
        return arrays, metrics

    def restore(self, records: Iterable[RoundRecord]) -> None:
        """Take the records of the rounds a checkpoint holds (a resumed run continues them)."""
        for rec in records:
            self._records[rec.round] = rec

    def _krum_selected(self, good: list[Message], by_site: dict[str, Message]) -> list[str]:
        """The sites Krum / MultiKrum chose this round (Flower's own selection rule, run on the same replies)."""
        try:
            krum = inner_of(self.strategy, MultiKrum)
        except LookupError:
            return []
        chosen = select_multikrum(
            [m.content for m in good],
            num_malicious_nodes=krum.num_malicious_nodes,
            num_nodes_to_select=krum.num_nodes_to_select,
        )
        site_of_content = {id(msg.content): site for site, msg in by_site.items()}
        return sorted(site_of_content[id(c)] for c in chosen if id(c) in site_of_content)

    def _origin(self, reply: Message) -> int:
        """The node a reply answers for: its sender, or, for an error the SuperLink wrote, the instruction's node."""
        if reply.metadata.src_node_id == SUPERLINK_NODE_ID:
            return self._sent_to.get(reply.metadata.reply_to_message_id, SUPERLINK_NODE_ID)
        return reply.metadata.src_node_id

    def _learn_site(self, node: int, site: str) -> None:
        """Remember which site answers from ``node``; earlier rounds' ``node-N`` entries get the site's name.

        A site that crashed before it ever answered is first recorded by its node id; once it rejoins
        and answers, its missing entries in earlier rounds name it.
        """
        if self._node_site.get(node) == site:
            return
        self._node_site[node] = site
        placeholder = f"node-{node}"
        for rec in self._records.values():
            for entry in (*rec.missing, *rec.rejected):
                if entry.get("site") == placeholder:
                    entry["site"] = site
            if placeholder in rec.network:
                rec.network.setdefault(site, {}).update(rec.network.pop(placeholder))

    def _send(
        self, grid: Grid, messages: Iterable[Message], timeout: float, server_round: int, phase: str
    ) -> list[Message]:
        """Send and wait up to ``timeout``; a site that has not answered by then is recorded as missing."""
        sent = list(messages)
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        self._sent_to.update({m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id})
        answered = {self._origin(m) for m in replies}
        rec = self.record(server_round)
        self._measure(rec, sent, replies, phase)
        for msg in sent:
            node = msg.metadata.dst_node_id
            if node not in answered:
                site = self._node_site.get(node, f"node-{node}")
                reason = f"no reply within the round deadline ({timeout:g} s, strategy.round-timeout)"
                log.warning("round %d %s: %s: %s", server_round, phase, site, reason)
                rec.missing.append({"site": site, "phase": phase, "reason": reason})
        return replies

    def _measure(self, rec: RoundRecord, sent: list[Message], replies: list[Message], phase: str) -> None:
        """Add each site's sent and received bytes and its reply's record keys to ``rec.network``."""
        names: dict[int, str] = {}
        for msg in replies:
            name = None if msg.has_error() else site_of(msg)
            if name is not None:  # a second node claiming a name is counted apart from the first
                node = self._origin(msg)
                names[node] = name if name not in names.values() else f"{name}@node-{node}"

        def label(node: int) -> str:
            return names.get(node) or self._node_site.get(node) or f"node-{node}"

        def entry(node: int) -> dict:
            site = rec.network.setdefault(label(node), {})
            return site.setdefault(phase, {"sent_bytes": 0, "received_bytes": 0})

        sizes: dict[str, int] = {}  # the global model is one object tree in every instruction
        for msg in sent:
            entry(msg.metadata.dst_node_id)["sent_bytes"] += message_bytes(msg, sizes)
        for msg in replies:
            e = entry(self._origin(msg))
            e["received_bytes"] += message_bytes(msg, sizes)
            e["reply_records"] = reply_records(msg, self._global_ref)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        after_round: Callable[[int, ArrayRecord], None] | None = None,
    ) -> Result:
        """Run rounds ``first_round`` .. ``num_rounds`` as Flower's ``Strategy.start`` runs 1 .. N, and more.

        Flower's loop always starts at round 1 and gives up nothing to a crash. This one starts at
        ``first_round`` from ``initial_arrays`` (a resumed run: the checkpoint's model and the next
        round), waits ``timeout`` seconds per phase and records the sites that did not answer, retries a
        round once when fewer than ``min_sites`` usable training replies arrived, and calls
        ``after_round(round, global arrays)`` when a round is complete (to write a checkpoint).

        Raises:
            StopFederation: If a round lost its quorum twice (the checkpoint of the round before stays),
                or a wrapped check ends the federation.
        """
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        arrays = initial_arrays
        self.latest_arrays = arrays
        for current in range(first_round, num_rounds + 1):
            log.info("[ROUND %d/%d]", current, num_rounds)
            for attempt in (1, 2):
                replies = self._send(
                    grid, self.configure_train(current, arrays, train_config, grid), timeout, current, "train"
                )
                try:
                    agg_arrays, agg_metrics = self.aggregate_train(current, replies)
                    break
                except QuorumLost as lost:
                    rec = self.record(current)
                    if attempt == 2:
                        after = (
                            f"the run stopped after round {current - 1} (resume it from its checkpoint once "
                            "enough sites are back)"
                            if current > 1
                            else "no round was completed: start the run again once enough sites are up (in a "
                            "simulation the first round also starts the sites: give strategy.round-timeout room)"
                        )
                        raise StopFederation(current, f"quorum lost twice: {lost}; {after}") from lost
                    log.warning("%s; retrying the round once", lost)
                    missing = [m["site"] for m in rec.missing]
                    self._records[current] = RoundRecord(
                        round=current,
                        retried=f"{lost} (missing: {', '.join(missing) or 'none'})",
                        network=rec.network,  # the first attempt's bytes crossed the network too
                    )
            if agg_arrays is not None:
                result.arrays = agg_arrays
                arrays = agg_arrays
            if agg_metrics is not None:
                result.train_metrics_clientapp[current] = agg_metrics
            replies = self._send(
                grid, self.configure_evaluate(current, arrays, evaluate_config, grid), timeout, current, "evaluate"
            )
            agg_eval = self.aggregate_evaluate(current, replies)
            if agg_eval is not None:
                result.evaluate_metrics_clientapp[current] = agg_eval
            if evaluate_fn is not None:
                res = evaluate_fn(current, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[current] = res
            if after_round is not None:
                after_round(current, arrays)
        if result.arrays is None:
            result.arrays = arrays
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy configures the evaluation."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Check and record each site's evaluation, then finish the round (``on_round``)."""
        good, by_site = self._filter(server_round, replies, is_train=False)
        rec = self.record(server_round)
        for site, msg in sorted(by_site.items()):
            m = msg.content["metrics"]
            rec.per_site[site] = {k: float(m[k]) for k in _REPORTED_EVAL if k in m}
            rec.eval_timing[site] = {k: float(m[k]) for k in _TIMING if k in m}
        rec.seconds = time.perf_counter() - self._round_start
        aggregated = self.strategy.aggregate_evaluate(server_round, good) if good else None
        if self._on_round is not None:
            self._on_round(rec)
        return aggregated


S = TypeVar("S", bound=Strategy)


def inner_of(strategy: Strategy, kind: type[S]) -> S:
    """The first strategy of type ``kind`` in a chain of wrappers (each holding ``.strategy``).

    Raises:
        LookupError: If no strategy in the chain is a ``kind``.
    """
    current: object = strategy
    while current is not None:
        if isinstance(current, kind):
            return current
        current = getattr(current, "strategy", None)
    raise LookupError(f"{strategy!r} holds no {kind.__name__}")
