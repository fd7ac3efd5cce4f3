"""Run a long-lived child process (a SuperLink, a SuperNode) in the foreground of a fedsite command.

Ctrl-C or ``kill`` (SIGINT/SIGTERM) of the fedsite command is passed on to its children, which
then get 20 s to stop before they are killed: stopping the command never leaves a SuperLink or a
SuperNode running on its own.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Mapping

__all__ = ["run_foreground", "start_watched"]


def start_watched(
    cmd: list[str], env: Mapping[str, str] | None, marker: str
) -> tuple[subprocess.Popen, threading.Event]:
    """Start ``cmd`` with its output passed through to ours, and watch that output for ``marker``.

    Returns:
        The process, and an event set once a line holding ``marker`` was printed (the event is
        final once the process has ended and its output is read to the end).
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = threading.Event()

    def echo() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
            if marker.encode() in raw:
                seen.set()

    threading.Thread(target=echo, daemon=True).start()
    return proc, seen


def run_foreground(procs: list[subprocess.Popen], *, grace_s: float = 20.0) -> int:
    """Wait for ``procs[0]``; on SIGINT/SIGTERM, or when it ends, stop every process in ``procs``.

    Returns:
        The exit code of ``procs[0]`` (130 when interrupted).
    """
    stopping = {"signal": 0}

    def forward(signum: int, _frame: object) -> None:
        stopping["signal"] = signum
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = procs[0].wait()
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s, h in previous.items():
            signal.signal(s, h)
    return 130 if stopping["signal"] else code
