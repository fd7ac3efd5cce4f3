"""The ``fedsite`` command: one argument parser over the commands of each side of fedsite.

Each side is a module with the same protocol:

* ``add_parser(subparsers)`` registers its top-level commands (and their subcommands) on the
  ``fedsite`` parser's subparsers, importing nothing heavy;
* ``run(args) -> int`` runs one of its commands and returns the exit code.

The front builds the parser from :data:`SIDES`, remembers which side registered which command, and
hands the parsed arguments to that side. Adding a side (the server's ``fedsite server``/``fedsite
run``, ``fedsite certs``) is one line in :data:`SIDES`. Today:

* ``fedsite simulate``, ``fedsite study privacy|shift``, ``fedsite data synth``: :mod:`simulations.cli`
* ``fedsite site check|pull``: :mod:`client.cli`
* ``fedsite site start|approve``: :mod:`client.cli`
* ``fedsite predict``: :mod:`client.predict_cli`
* ``fedsite server start|add-site|remove-site|sites``, ``fedsite run``: :mod:`server.cli`
* ``fedsite certs init|server|site|status``: :mod:`certs.cli`
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from common.config import ConfigError

__all__ = ["SIDES", "build_parser", "main", "run"]

#: The modules whose commands ``fedsite`` offers, in the order of its help.
SIDES: tuple[str, ...] = (
    "simulations.cli",
    "client.cli",
    "client.predict_cli",
    "server.cli",
    "certs.cli",
)


def build_parser(sides: Sequence[str] = SIDES) -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The ``fedsite`` argument parser, and which side runs each top-level command.

    Args:
        sides: Module names following the side protocol (``add_parser``, ``run``).

    Returns:
        ``(parser, owner)`` with ``owner[command]`` the side module that registered ``command``.

    Raises:
        argparse.ArgumentError: If two sides register the same command (argparse refuses it).
    """
    parser = argparse.ArgumentParser(prog="fedsite", description="Federated multi-site training for medical imaging.")
    sub = parser.add_subparsers(dest="command", required=True)
    owner: dict[str, ModuleType] = {}
    for name in sides:
        side = importlib.import_module(name)
        before = set(sub.choices)
        side.add_parser(sub)
        owner.update({command: side for command in sub.choices if command not in before})
    return parser, owner


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time of each record (it may be replaced)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedsite`` command with ``argv``; returns the exit code.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code of the command's side; 2 for a config error no side handled.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    fed = logging.getLogger("fedsite")
    fed.setLevel(logging.INFO)
    if not fed.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        fed.addHandler(handler)
        fed.propagate = False
    parser, owner = build_parser()
    args = parser.parse_args(argv)
    try:
        return owner[args.command].run(args)
    except ConfigError as exc:
        print(f"fedsite: error: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``fedsite`` console script.

    A failed simulation can leave Flower's server thread waiting for sites that are gone; the
    command then ends the process itself after reporting the error, instead of hanging.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
