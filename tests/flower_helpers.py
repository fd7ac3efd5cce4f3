"""Flower records for handler tests, built by hand: a site's Context and a server's Message; a Grid and site replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict

from common.config import flatten, parse_run_config


def site_context(
    site_dir: Path,
    config: Mapping[str, object],
    *,
    node_id: int = 7,
    run_id: int = 1,
    state: RecordDict | None = None,
    node_config: Mapping[str, object] | None = None,
) -> Context:
    """The Context a SuperNode gives the ClientApp: the validated run config and ``data-dir`` (plus ``node_config``)."""
    return Context(
        run_id=run_id,
        node_id=node_id,
        node_config={"data-dir": str(site_dir), **(node_config or {})},
        state=state if state is not None else RecordDict(),
        run_config=flatten(parse_run_config(dict(config))),
    )


def site_message(arrays: ArrayRecord, kind: str, *, node_id: int = 7, **config: object) -> Message:
    """A train or evaluate message carrying the global ``arrays`` and this round's ``config``."""
    return Message(
        content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=node_id, message_type=kind
    )


# --- the coordinator's side: a Grid and site replies built by hand ---------------------------


class FakeGrid:
    """Just enough of a Grid for a strategy's ``configure_*`` to sample nodes.

    Args:
        node_ids: The connected nodes.
        answer: For :meth:`send_and_receive` (a whole federation without Flower): called with each
            instruction, returns the site's reply, or None for a site that does not answer in time.
    """

    def __init__(
        self, node_ids: Sequence[int] = (11, 12, 13), answer: Callable[[Message], Message] | None = None
    ) -> None:
        self.node_ids = list(node_ids)
        self.answer = answer

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        assert self.answer is not None, "FakeGrid(answer=...) is needed to run rounds"
        messages = list(messages)
        for m in messages:  # as Flower's grid does when it pushes a message
            m.metadata.__dict__["_message_id"] = m.object_id
        replies = (self.answer(m) for m in messages)
        return [r for r in replies if r is not None]


def instruction(node: int, kind: str) -> Message:
    """A server instruction to ``node`` (to reply to)."""
    return Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=kind)


def train_reply(
    node: int,
    site: object,
    weights: Mapping[str, np.ndarray],
    metrics: Mapping[str, float],
    *,
    to: Message | None = None,
) -> Message:
    """A site's training reply: its weights, its metrics and its ``site`` name (any value, to test bad ones)."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()}),
            "metrics": MetricRecord(dict(metrics)),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content=content, reply_to=to if to is not None else instruction(node, MessageType.TRAIN))


def eval_reply(node: int, site: object, metrics: Mapping[str, float], *, to: Message | None = None) -> Message:
    """A site's evaluation reply: its metrics and its ``site`` name."""
    content = RecordDict({"metrics": MetricRecord(dict(metrics)), "site": ConfigRecord({"name": site})})
    return Message(content=content, reply_to=to if to is not None else instruction(node, MessageType.EVALUATE))


def refusal_reply(node: int, site: str, *, epsilon: float, delta: float, to: Message | None = None) -> Message:
    """A site's refusal to train because its privacy budget is spent (as ``client.app.train`` sends it)."""
    content = RecordDict(
        {
            "site": ConfigRecord({"name": site}),
            "refusal": ConfigRecord({"kind": "privacy-budget", "reason": "privacy.max-epsilon reached"}),
            "privacy": MetricRecord({"epsilon": epsilon, "delta": delta}),
        }
    )
    return Message(content=content, reply_to=to if to is not None else instruction(node, MessageType.TRAIN))


def error_reply(node: int, reason: str, *, kind: str = MessageType.TRAIN) -> Message:
    """The reply Flower makes when a site's handler raised."""
    return Message(error=Error(code=0, reason=reason), reply_to=instruction(node, kind))
