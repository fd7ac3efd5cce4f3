"""Flower records for handler tests: a site's Context and a server's Message, built by hand."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from common.config import flatten, parse_run_config


def site_context(
    site_dir: Path, config: Mapping[str, object], *, node_id: int = 7, run_id: int = 1, state: RecordDict | None = None
) -> Context:
    """The Context a SuperNode gives the ClientApp: the validated run config and ``data-dir``."""
    return Context(
        run_id=run_id,
        node_id=node_id,
        node_config={"data-dir": str(site_dir)},
        state=state if state is not None else RecordDict(),
        run_config=flatten(parse_run_config(dict(config))),
    )


def site_message(arrays: ArrayRecord, kind: str, *, node_id: int = 7, **config: object) -> Message:
    """A train or evaluate message carrying the global ``arrays`` and this round's ``config``."""
    return Message(
        content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=node_id, message_type=kind
    )
