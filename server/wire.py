"""What crosses the network: the size of each message as Flower serialises it, and what a reply may carry.

Flower 1.41 moves a :class:`~flwr.app.Message` as a tree of content-addressed objects (the message,
its RecordDict, each record, each array and its chunks), each serialised by its ``deflate()``; a
site pulls the instruction's objects from the SuperLink and pushes its reply's. :func:`message_bytes`
sums those objects, each distinct one once (``get_all_nested_objects``), the way Flower pushes them:
the bytes of what was sent, without the gRPC framing and the polling around it (``flwr ls`` counts
those too, for the whole run).

A reply carries weights, counts, metrics and the site's public name and nothing else
(:data:`ALLOWED_RECORDS`); :func:`unexpected_content` names the first thing outside that, and
:func:`reply_records` summarises what a reply held for ``results.json`` (record names and keys,
never values).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common.units import UNIT_KEY

__all__ = ["ALLOWED_RECORDS", "message_bytes", "phase_of", "reply_records", "unexpected_content"]

_SAFE_KEY = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: What a site's reply may hold: record name -> (record type, the keys it may have; None = any key).
#: ``arrays`` must also hold exactly the global model's keys (checked by :func:`common.records.check_arrays`);
#: a MetricRecord holds numbers only (Flower's type), and here single numbers (no lists).
ALLOWED_RECORDS: dict[str, dict[str, tuple[type, frozenset[str] | None]]] = {
    "train": {
        "arrays": (ArrayRecord, None),
        "metrics": (MetricRecord, None),
        "site": (ConfigRecord, frozenset({"name"})),
    },
    "refusal": {
        "site": (ConfigRecord, frozenset({"name"})),
        "refusal": (ConfigRecord, frozenset({"kind", "reason"})),
        "privacy": (MetricRecord, frozenset({"epsilon", "delta", UNIT_KEY})),
    },
    "evaluate": {
        "metrics": (MetricRecord, None),
        "site": (ConfigRecord, frozenset({"name"})),
    },
}

_LABELS = {"train": "a training reply", "refusal": "a refusal", "evaluate": "an evaluation reply"}


def _shown(name: str) -> str:
    """A record or key name as results.json and logs show it (a name a site chose may not be printable)."""
    return name if _SAFE_KEY.match(name) else "<unprintable name>"


def message_bytes(msg: Message, sizes: dict[str, int] | None = None) -> int:
    """The bytes of ``msg`` as Flower serialises it for the network: each distinct object of its tree once.

    Args:
        msg: A sent instruction or a received reply (with content or an error).
        sizes: A cache of object id -> serialised size, shared across the messages of one round (the
            global model is one object tree in every instruction; it is serialised once here).

    Returns:
        The sum of ``len(obj.deflate())`` over the message, its RecordDict, records, arrays and chunks.
    """
    sizes = {} if sizes is None else sizes
    total = 0
    for object_id, obj in get_all_nested_objects(msg).items():
        if object_id not in sizes:
            sizes[object_id] = len(obj.deflate())
        total += sizes[object_id]
    return total


def reply_records(msg: Message, model_keys: Iterable[str]) -> dict[str, object]:
    """What a reply held, by record: names and keys, never values.

    Args:
        msg: A site's reply.
        model_keys: The global model's state-dict keys.

    Returns:
        ``{}`` for an error reply; else per record: for an ArrayRecord ``{"count": n, "model_keys": bool}``
        (whether its keys are exactly the model's), for a metric or config record its sorted keys.
    """
    if msg.has_error():
        return {}
    out: dict[str, object] = {}
    for name, record in sorted(msg.content.items()):
        if isinstance(record, ArrayRecord):
            out[_shown(name)] = {"count": len(record), "model_keys": set(record.keys()) == set(model_keys)}
        else:
            out[_shown(name)] = sorted(_shown(k) for k in record)
    return out


def unexpected_content(msg: Message, *, phase: str) -> str | None:
    """The first record, key or value a reply must not carry, as a reason to reject it; None if all is allowed.

    Args:
        msg: A site's reply (not an error).
        phase: ``"train"``, ``"refusal"`` (a training reply that refuses) or ``"evaluate"``.
    """
    allowed = ALLOWED_RECORDS[phase]
    for name, record in sorted(msg.content.items()):
        if name not in allowed:
            return (
                f"reply carries a record '{_shown(name)}' not allowed in {_LABELS[phase]} "
                f"(allowed: {', '.join(sorted(allowed))})"
            )
        kind, keys = allowed[name]
        if not isinstance(record, kind):
            return f"record '{name}' is a {type(record).__name__}, expected a {kind.__name__}"
        extra = sorted(set(record.keys()) - keys) if keys is not None else []
        if extra:
            return (
                f"record '{name}' carries a key '{_shown(extra[0])}' not allowed in a reply "
                f"(allowed: {', '.join(sorted(keys or ()))})"
            )
        if isinstance(record, MetricRecord):
            listed = sorted(k for k, v in record.items() if not isinstance(v, (int, float)))
            if listed:
                return f"metric '{_shown(listed[0])}' is a list; a reply carries single numbers"
    return None


def phase_of(msg: Message, *, is_train: bool) -> str:
    """Which reply shape :data:`ALLOWED_RECORDS` checks ``msg`` against."""
    if not is_train:
        return "evaluate"
    return "refusal" if isinstance(msg.content.config_records.get("refusal"), ConfigRecord) else "train"
