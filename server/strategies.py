"""The strategy named by ``strategy.name``, wrapped for FedBN and central DP and recorded per site.

:data:`BUILDERS` maps each name of :data:`common.config.STRATEGY_NAMES` to the Flower strategy it
builds (a test keeps the two equal). :func:`make_strategy` wraps it, innermost first:

* :class:`server.fedbn.FedBN` for ``fedbn`` (normalization layers stay at each site);
* :class:`server.central_dp.CentralDP` when ``privacy.central-dp`` is on;
* :class:`server.recording.RecordingStrategy` always (per-site results and reply checks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from common.config import RunConfig
from server.central_dp import CentralDP, nonzero_update
from server.fedbn import FedBN
from server.recording import RecordingStrategy, ReplyCheck, RoundNotAggregated, RoundRecord

__all__ = ["BUILDERS", "make_strategy"]

#: Builds the aggregating strategy from the run config and the keyword arguments every Flower
#: strategy takes (sampling fractions, minimum sites, the weighting key).
Builder = Callable[[RunConfig, Mapping[str, Any]], Strategy]


def _fedbn(cfg: RunConfig, common: Mapping[str, Any]) -> Strategy:
    from common.model import build_model, norm_keys

    return FedBN(FedAvg(**common), local_keys=norm_keys(build_model(cfg.model, cfg.task)))


class _Bulyan(Bulyan):
    """Flower's Bulyan, saying why it skips a round with too few replies (Flower only logs it)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        needed = 4 * self.num_malicious_nodes + 3
        if len(replies) < needed:
            raise RoundNotAggregated(
                f"bulyan needs 4 x strategy.num-malicious + 3 = {needed} accepted replies, got {len(replies)}"
            )
        return super().aggregate_train(server_round, replies)


#: One builder per name of :data:`common.config.STRATEGY_NAMES`.
BUILDERS: dict[str, Builder] = {
    # FedAvg: weights averaged by training samples.
    "fedavg": lambda cfg, common: FedAvg(**common),
    # FedProx: FedAvg on the server; each site adds mu/2 ||w - w_global||^2 to its loss.
    "fedprox": lambda cfg, common: FedProx(proximal_mu=cfg.strategy.proximal_mu, **common),
    # FedBN: FedAvg of every layer but the normalization layers.
    "fedbn": _fedbn,
    # FedAdam / FedYogi: the averaged update is a pseudo-gradient for a server-side optimizer step.
    "fedadam": lambda cfg, common: FedAdam(
        eta=cfg.strategy.effective_server_lr, eta_l=cfg.train.lr, tau=cfg.strategy.tau, **common
    ),
    "fedyogi": lambda cfg, common: FedYogi(
        eta=cfg.strategy.effective_server_lr, eta_l=cfg.train.lr, tau=cfg.strategy.tau, **common
    ),
    # Robust aggregation (one bad site cannot pull the model anywhere it likes):
    # FedMedian: the coordinate-wise median of the sites' weights.
    "fedmedian": lambda cfg, common: FedMedian(**common),
    # FedTrimmedAvg: per coordinate, cut strategy.trim-beta of the sites at each end, average the rest.
    "fedtrimmedavg": lambda cfg, common: FedTrimmedAvg(beta=cfg.strategy.trim_beta, **common),
    # Krum: the one site update closest to its n - f - 2 nearest others (f = strategy.num-malicious).
    "krum": lambda cfg, common: Krum(num_malicious_nodes=cfg.strategy.num_malicious, **common),
    # MultiKrum: the strategy.krum-select best by the Krum score, averaged.
    "multikrum": lambda cfg, common: MultiKrum(
        num_malicious_nodes=cfg.strategy.num_malicious, num_nodes_to_select=cfg.strategy.krum_select, **common
    ),
    # Bulyan: MultiKrum selection, then a coordinate-wise trimmed mean around the median (needs 4f + 3 sites).
    "bulyan": lambda cfg, common: _Bulyan(num_malicious_nodes=cfg.strategy.num_malicious, **common),
}


def make_strategy(cfg: RunConfig, *, on_round: Callable[[RoundRecord], None] | None = None) -> RecordingStrategy:
    """Build the strategy named by ``strategy.name``, wrapped for central DP if configured.

    Args:
        cfg: The run config.
        on_round: Called with each finished round's per-site record.

    Returns:
        The recording strategy; its ``records`` are the per-site results, its ``strategy`` the
        wrapped one (:func:`server.recording.inner_of` finds a given layer).
    """
    s, p = cfg.strategy, cfg.privacy
    common: dict[str, Any] = {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_sites,
        "min_evaluate_nodes": s.min_sites,
        "min_available_nodes": s.min_sites,
        # Central DP bounds one site's influence only if every site weighs the same.
        "weighted_by_key": "uniform-weight" if p.central_dp else "num-examples",
    }
    strategy = BUILDERS[s.name](cfg, common)
    checks: tuple[ReplyCheck, ...] = ()
    if p.central_dp:
        strategy = CentralDP(
            strategy,
            noise_multiplier=p.central_noise,
            clipping_norm=p.central_clip,
            num_sites=p.central_sites,
            delta=p.delta,
        )
        checks = (nonzero_update,)
    return RecordingStrategy(
        strategy,
        on_round=on_round,
        stop_on_budget=p.dp and p.on_budget == "stop",
        metric=cfg.task.metric,
        checks=checks,
        screen_mad=s.screen_mad,
        min_sites=s.min_sites,
    )
