"""``python -m server.superlink_main ARGS``: Flower's ``flower-superlink`` with a longer SQLite lock wait.

Flower 1.41 opens its state database with ``busy_timeout = 5000`` ms. On a busy coordinator (measured:
2 cores at load 18) the SuperLink's threads wait longer than that for the write lock, and a run fails
with ``sqlite3.OperationalError: database is locked`` (HTTP 500 to the ServerApp and the SuperNodes).
This launcher raises the wait to 60 s and then runs Flower's own entry point unchanged. If a future
Flower release moves the setting, the launcher leaves it alone and starts the SuperLink as it is.
"""

from __future__ import annotations

BUSY_TIMEOUT_MS = 60_000


def main() -> None:
    """Start the SuperLink with the command-line arguments of this process."""
    try:
        from flwr.supercore import sql_mixin

        sql_mixin.SQLITE_PRAGMAS = tuple(
            (k, str(BUSY_TIMEOUT_MS) if k == "busy_timeout" else v) for k, v in sql_mixin.SQLITE_PRAGMAS
        )
    except (ImportError, AttributeError):  # another Flower layout: start it unchanged
        pass
    import sys

    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
