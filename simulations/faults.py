"""Fault injection for simulations, tests and demos: misbehaving sites and a server that dies.

``fedsite simulate --fault SPEC`` (repeatable) with ``SPEC = WHO:KIND[@ROUND]``:

* ``site-02:raise@3``  the site raises in round 3 (the server sees an error reply);
* ``site-02:hang@3``   the site does not answer round 3's training in time (it sleeps 1.5 x
  ``strategy.round-timeout``, at least 5 s, then fails; set the deadline);
* ``site-02:nan@3``    the site's trained weights carry a NaN;
* ``site-02:x1000@3``  the site sends its trained weights multiplied by 1000;
* ``site-02:arch@3``   the site sends the weights of another architecture;
* ``server:kill@2``    the server dies right after round 2's checkpoint (resume with ``--resume``).

Without ``@ROUND`` a site fault applies in every round. The faults live here, in a simulation-only
ClientApp and ServerApp that wrap the real handlers (:mod:`client.app`, :func:`server.app.run_federation`):
the hospital client's own code path has no fault code.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError

__all__ = [
    "HANG_S",
    "SITE_KINDS",
    "Fault",
    "InjectedFault",
    "ServerKilled",
    "corrupt_reply",
    "faulty_client_app",
    "faulty_server_app",
    "observed_server_app",
    "parse_fault",
]

log = logging.getLogger("fedsite.faults")

#: What a site can be made to do wrong.
SITE_KINDS = ("raise", "hang", "nan", "x1000", "arch")
#: A hanging site sleeps this long at least (and at least 1.5 x the round deadline), then fails.
HANG_S = 5.0
_SPEC = re.compile(r"^(?P<who>[A-Za-z0-9._-]+):(?P<kind>[a-z0-9]+)(?:@(?P<round>[0-9]+))?$")


class InjectedFault(RuntimeError):
    """Raised by a site told to fail (``raise``, or ``hang`` once it wakes up)."""


class ServerKilled(RuntimeError):
    """Raised by the server told to die after a round (``server:kill@R``)."""


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``who`` (a site name or ``server``), ``kind``, the round (0 = every round)."""

    who: str
    kind: str
    round: int = 0

    def applies(self, site: str, server_round: int) -> bool:
        """Whether this fault hits ``site`` in ``server_round``."""
        return self.who == site and self.round in (0, server_round)


def parse_fault(spec: str) -> Fault:
    """Parse ``WHO:KIND[@ROUND]``, e.g. ``site-02:nan@3`` or ``server:kill@2``.

    Raises:
        ConfigError: If the spec is malformed or names an unknown kind.
    """
    m = _SPEC.match(spec.strip())
    if m is None:
        raise ConfigError(f"--fault {spec!r}: expected WHO:KIND[@ROUND], e.g. site-02:nan@3 or server:kill@2")
    who, kind, rnd = m["who"], m["kind"], int(m["round"] or 0)
    if who == "server":
        if kind != "kill" or rnd < 1:
            raise ConfigError(f"--fault {spec!r}: the server fault is server:kill@ROUND (ROUND >= 1)")
    elif kind not in SITE_KINDS:
        raise ConfigError(f"--fault {spec!r}: unknown kind {kind!r}; a site fault is one of {', '.join(SITE_KINDS)}")
    return Fault(who, kind, rnd)


def corrupt_reply(reply: Message, kind: str) -> Message:
    """Make a site's training reply misbehave as ``kind`` says (``nan``, ``x1000`` or ``arch``), in place."""
    arrays = reply.content["arrays"]
    if kind == "arch":
        reply.content["arrays"] = ArrayRecord({"other.conv.weight": Array(np.ones((4, 1, 3, 3), dtype=np.float32))})
        return reply
    out: dict[str, Array] = {}
    poisoned = False
    for key, value in arrays.items():
        a = value.numpy()
        if a.dtype.kind == "f":
            if kind == "x1000":
                a = a * 1000.0
            elif kind == "nan" and not poisoned:
                a = a.copy()
                a.flat[0] = np.nan
                poisoned = True
        out[key] = Array(np.asarray(a))
    reply.content["arrays"] = ArrayRecord(out)
    return reply


def _site_name(context: Context) -> str:
    from client.layout import sim_site_name

    return sim_site_name(int(context.node_config["partition-id"]))


def _hang_seconds(context: Context) -> float:
    timeout = float(context.run_config.get("strategy.round-timeout", 0.0) or 0.0)
    return max(HANG_S, 1.5 * timeout)


def faulty_client_app(faults: Sequence[Fault]) -> ClientApp:
    """A ClientApp that runs the real site handlers and misbehaves where ``faults`` say."""
    import client.app as real

    site_faults = [f for f in faults if f.who != "server"]
    app = ClientApp()

    def _before(msg: Message, context: Context, *, train: bool) -> Fault | None:
        site = _site_name(context)
        server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
        fault = next((f for f in site_faults if f.applies(site, server_round)), None)
        if fault is not None and fault.kind == "hang" and not train:
            return None  # a site late for training may still evaluate (its late reply is ignored)
        if fault is None:
            return None
        log.warning("injected fault: %s %s in round %d", site, fault.kind, server_round)
        if fault.kind == "raise":
            raise InjectedFault(f"injected fault: {site} raises in round {server_round}")
        if fault.kind == "hang":
            time.sleep(_hang_seconds(context))
            raise InjectedFault(f"injected fault: {site} did not answer in round {server_round}")
        return fault

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fault = _before(msg, context, train=True)
        reply = real.train(msg, context)
        if fault is not None and "arrays" in reply.content:
            corrupt_reply(reply, fault.kind)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        fault = _before(msg, context, train=False)
        del fault  # weight faults concern training replies only
        return real.evaluate(msg, context)

    return app


def observed_server_app(after_round: Callable[[int, ArrayRecord], None]) -> ServerApp:
    """The real coordinator, calling ``after_round(round, global arrays)`` after each round's checkpoint."""
    from common.config import parse_run_config
    from server.app import run_federation

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("fedsite").setLevel(logging.INFO)
        run_federation(grid, parse_run_config(context.run_config), after_round=after_round)

    return app


def faulty_server_app(
    faults: Sequence[Fault], after_round: Callable[[int, ArrayRecord], None] | None = None
) -> ServerApp:
    """The real coordinator, killed right after the checkpoint of the round a ``server:kill@R`` fault names."""
    kill = min((f.round for f in faults if f.who == "server"), default=0)

    def hook(server_round: int, arrays: ArrayRecord) -> None:
        if after_round is not None:
            after_round(server_round, arrays)
        if kill and server_round == kill:
            raise ServerKilled(f"injected fault: the server dies after round {server_round}")

    return observed_server_app(hook)
