"""Central (site-level) differential privacy: clip each site's update, add noise, account per round.

The guarantee is per *site* (one hospital's whole update replaced by any other), not per patient,
and it holds against whoever sees the released global models, not against the server itself (which
sees every site's update in the clear). Each site's update is clipped to ``clipping_norm``; the
wrapper averages exactly the ``n`` clipped updates it clipped, uniformly; Gaussian noise of standard
deviation ``noise_multiplier * clipping_norm / n`` is added for those ``n``; and Flower's RDP
accountant composes one release per aggregated round.

Neighbouring relation: *replace-one*. A released mean is over a fixed number ``n`` of sites (a
round with another number is not aggregated when ``num_sites`` is set), so a neighbouring
federation swaps one site's update for another's: the mean moves by up to ``2 * clipping_norm / n``,
twice the add/remove-one sensitivity. Each release is therefore accounted as a Gaussian mechanism
with noise multiplier ``noise_multiplier / 2`` (sensitivity-normalised), without amplification by
sampling. The clipping and noise are Flower's own (:mod:`flwr.supercore.differential_privacy`).

Only FedAvg-style server averaging (``fedavg``, ``fedprox``) may be wrapped: a server optimizer
(FedAdam, FedYogi) or FedBN's partial averaging would be fed un-noised updates (Flower refuses the
combination too); :func:`common.config.parse_run_config` refuses it with a ``ConfigError``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update, compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from server.recording import CENTRAL_DELTA, CENTRAL_EPSILON, RoundNotAggregated, site_of

__all__ = ["CentralDP", "default_central_delta", "nonzero_update"]

log = logging.getLogger("fedsite.server")


def default_central_delta(population: int) -> float:
    """Default delta of central DP: 1e-5, or 1/(100 x sites) for federations over 1,000 sites (delta << 1/sites)."""
    return min(1e-5, 1.0 / (100.0 * max(population, 1)))


def nonzero_update(local: Mapping[str, np.ndarray], global_ref: Mapping[str, np.ndarray]) -> str | None:
    """A reply check: a site whose weights equal the global model's learnt nothing this round.

    Under central DP such a reply still counts as a site in the noise scale; it is rejected so that
    the round's ``n`` counts only sites that sent an update.
    """
    if all(np.array_equal(local[k], global_ref[k]) for k in global_ref):
        return "update is exactly zero (nothing learnt)"
    return None


class CentralDP(Strategy):
    """Wrap a strategy with central DP: server-side fixed clipping, Gaussian noise, RDP accounting.

    Args:
        strategy: The strategy that averages the clipped updates; it must weigh every site the
            same (``weighted_by_key="uniform-weight"``), or one site could count more than the
            noise allows for.
        noise_multiplier: Noise standard deviation in units of ``clipping_norm / n``.
        clipping_norm: L2 norm each site's update (its weights minus the global ones) is clipped to.
        num_sites: The number of sites expected to answer every round
            (``privacy.central-sites``); a round with another number is not aggregated.
            0 = the sites that answer: the noise is scaled for the sites aggregated that round and
            the accountant's population is the number of different sites seen so far.
        delta: The delta epsilon is reported at; 0 = :func:`default_central_delta`.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        num_sites: int = 0,
        delta: float = 0.0,
    ) -> None:
        if noise_multiplier <= 0 or clipping_norm <= 0 or num_sites < 0:
            raise ValueError(
                f"central DP needs noise_multiplier > 0, clipping_norm > 0 and num_sites >= 0, got "
                f"{noise_multiplier}, {clipping_norm} and {num_sites}"
            )
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.num_sites = num_sites
        self.delta = delta
        self._current: ArrayRecord = ArrayRecord()
        self._population = num_sites
        self._releases: list[int] = []  # sites aggregated in each noisy release
        self._seen: set[str] = set()  # names of the sites aggregated so far
        self.accountant: RdpAccountant | None = self._new_accountant(num_sites) if num_sites else None

    def __repr__(self) -> str:
        return f"CentralDP({self.strategy!r})"

    def _new_accountant(self, population: int) -> RdpAccountant:
        config = PrivacyConfig(
            target_delta=self.delta if self.delta > 0 else default_central_delta(population),
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
        return RdpAccountant(config)

    @property
    def population(self) -> int:
        """The number of sites the accountant protects (0 until the first aggregation when counted)."""
        return self._population

    def privacy_spent(self) -> PrivacySpent | None:
        """Epsilon and delta spent so far, or None before the first noisy release."""
        return self.accountant.get_privacy_spent() if self.accountant is not None and self._releases else None

    def _account(self, sites: int, seen: int) -> PrivacySpent:
        """Compose one release of ``sites`` updates; grow the population to ``seen`` first if needed.

        Without amplification by sampling the epsilon of a release does not depend on the
        population; only the default delta does. A grown population replays the past releases.
        """
        if self.accountant is None or seen > self._population:
            self._population = max(seen, self._population)
            self.accountant = self._new_accountant(self._population)
            for n in self._releases:
                self.accountant.compose(self._event(n))
        self.accountant.compose(self._event(sites))
        self._releases.append(sites)
        return self.accountant.get_privacy_spent()

    def _event(self, sites: int) -> GaussianPrivacyEvent:
        # Replace-one: sensitivity 2 x clip against noise noise_multiplier x clip (both over n).
        return GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier / 2.0, sample_size=sites, population_size=self._population
        )

    def checkpoint_state(self) -> dict[str, object]:
        """The accountant's state as JSON: the releases so far, the population and the sites seen."""
        return {"releases": list(self._releases), "population": self._population, "seen": sorted(self._seen)}

    def restore_checkpoint_state(self, state: dict) -> None:
        """Continue from :meth:`checkpoint_state`: the accountant replays the releases."""
        self._releases = [int(n) for n in state["releases"]]
        self._population = int(state["population"])
        self._seen = set(state["seen"])
        self.accountant = None
        if self._population:
            self.accountant = self._new_accountant(self._population)
            for n in self._releases:
                self.accountant.compose(self._event(n))

    def summary(self) -> None:
        """Log the DP settings and the inner strategy's summary."""
        log.info("central DP: noise multiplier %s, clipping norm %s", self.noise_multiplier, self.clipping_norm)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the updates are measured from; the inner strategy configures."""
        self._current = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each reply's update, let the inner strategy average them, add noise, account.

        Args:
            server_round: The round.
            replies: Replies that passed the recorder's checks (one per site).

        Returns:
            The noisy global model and the inner metrics plus ``central-epsilon``/``central-delta``.

        Raises:
            RoundNotAggregated: If ``num_sites`` is set and another number of sites answered, or
                a reply carries an error or no weights.
        """
        replies = list(replies)
        if any(m.has_error() or "arrays" not in m.content.array_records for m in replies):
            raise RoundNotAggregated("central DP: a reply carries an error or no weights; check the replies first")
        n = len(replies)
        if self.num_sites and n != self.num_sites:
            raise RoundNotAggregated(
                f"central DP expects updates from privacy.central-sites = {self.num_sites} sites, got {n}: "
                f"the noise is scaled for {self.num_sites}; set privacy.central-sites to the number of sites "
                "(0 = those that answer)"
            )
        current = self._current.to_numpy_ndarrays()
        keys = list(self._current.keys())
        clipped = []
        for reply in replies:
            record = reply.content["arrays"]
            if list(record.keys()) != keys:
                raise RoundNotAggregated("central DP: a reply's weights do not match the global model's layers")
            weights = record.to_numpy_ndarrays()
            compute_clip_model_update(param1=weights, param2=current, clipping_norm=self.clipping_norm)
            clipped.append(weights)
            reply.content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, weights, strict=True)})
        # The inner (FedAvg) strategy gives the round's metrics; the released mean is computed here, over
        # exactly the n updates clipped above, so the noise is sized for the updates really averaged.
        inner, metrics = self.strategy.aggregate_train(server_round, replies)
        if inner is None:
            return None, metrics
        noisy = [np.mean(np.stack([w[i] for w in clipped]), axis=0).astype(current[i].dtype) for i in range(len(keys))]
        add_gaussian_noise_inplace(noisy, compute_stdv(self.noise_multiplier, self.clipping_norm, n))
        arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, noisy, strict=True)})
        self._seen.update(site_of(m) or f"node-{m.metadata.src_node_id}" for m in replies)
        spent = self._account(n, self.num_sites or max(n, len(self._seen)))
        log.info(
            "round %d: central DP over %d sites, epsilon %.4g at delta %.3g",
            server_round,
            n,
            spent.epsilon,
            spent.delta,
        )
        out = MetricRecord(dict(metrics) if metrics is not None else {})
        out[CENTRAL_EPSILON] = float(spent.epsilon)
        out[CENTRAL_DELTA] = float(spent.delta)
        return arrays, out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy configures the evaluation."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The inner strategy's evaluation aggregate (evaluation metrics are not protected)."""
        return self.strategy.aggregate_evaluate(server_round, replies)
