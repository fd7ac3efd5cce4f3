"""FedBN: every layer is averaged except the normalization layers, which stay at each site."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["FedBN"]


class FedBN(Strategy):
    """Wrap a strategy so that normalization layers are never averaged (Li et al., 2021, FedBN).

    Sites keep their own normalization weights and statistics between rounds (in Flower's
    ``Context.state``) and ignore the global ones: each instruction carries ``fedbn = true``.
    The server never averages them: after the inner strategy aggregates, the normalization
    entries of the global model are put back to what they were before the round.

    Args:
        strategy: The strategy that aggregates the other layers (FedAvg in fedsite).
        local_keys: State-dict keys of the normalization layers (:func:`common.model.norm_keys`).
    """

    def __init__(self, strategy: Strategy, *, local_keys: Sequence[str]) -> None:
        self.strategy = strategy
        self.local_keys = list(local_keys)
        self._previous: ArrayRecord | None = None

    def __repr__(self) -> str:
        return f"FedBN({self.strategy!r})"

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the sites to keep their own normalization layers; remember the global ones."""
        self._previous = arrays
        config["fedbn"] = True
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner aggregation, with the normalization entries restored to this round's global ones."""
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None and self._previous is not None:
            for key in self.local_keys:
                arrays[key] = self._previous[key]
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sites evaluate with their own normalization layers."""
        config["fedbn"] = True
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The inner strategy's evaluation aggregate."""
        return self.strategy.aggregate_evaluate(server_round, replies)
