"""``python -m client.approved_exec ARGS``: Flower's ``flower-superexec`` that runs approved apps only.

Started by ``fedsite site start --approved FILE`` next to a SuperNode running with
``--isolation process``. It is Flower's own executor loop (same arguments as ``flower-superexec``,
plus ``--approved FILE``) with one change: before a task's ClientApp process is launched, the run's
FAB hash is checked against the site's approved list (:mod:`client.approval`). A refused task is
never launched (none of its code runs here); the reason goes to the site's log, and Flower's task
expiry then reports the failure to the SuperLink.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("fedsite.client")


def main() -> None:
    """Run the executor with this process's arguments."""
    argv = sys.argv[1:]
    if "--approved" not in argv:
        print("client.approved_exec: --approved FILE is required", file=sys.stderr)
        raise SystemExit(2)
    i = argv.index("--approved")
    approved_file = Path(argv[i + 1])
    del argv[i : i + 2]

    import importlib

    rs = importlib.import_module("flwr.supercore.superexec.run_superexec")
    from flwr.supercore.superexec.executor import LaunchResult

    from client.approval import load_approved, refusal

    base = rs.AutoExecPlugin

    class ApprovedOnly(base):  # type: ignore[misc, valid-type]
        """Flower's plugin, launching a task only when its FAB hash is approved."""

        def launch_task(self, token, task):
            reason = refusal(task.fab_hash, load_approved(approved_file))  # re-read: approvals take effect at once
            if reason is not None:
                print(f"fedsite site: refused run {task.run_id}: {reason}", file=sys.stderr, flush=True)
                return LaunchResult.failed(reason)
            print(f"fedsite site: run {task.run_id} uses approved app {task.fab_hash[:12]}", flush=True)
            return super().launch_task(token, task)

    rs.AutoExecPlugin = ApprovedOnly
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv = ["flower-superexec", *argv]
    flower_superexec()


if __name__ == "__main__":
    main()
