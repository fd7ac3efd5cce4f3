"""One way for the site's commands to end: a one-line error and an exit code, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from common.errors import FedsiteError

__all__ = ["run_guarded"]


def run_guarded(label: str, command: Callable[[], int], *, unexpected: str) -> int:
    """Run ``command`` and turn its failures into one line on stderr.

    Args:
        label: What the user typed, e.g. ``"fedsite predict"``.
        command: The command itself; returns its exit code.
        unexpected: What is known to be safe after an unexpected error, e.g. ``"nothing was written"``.

    Returns:
        The command's code; 2 after an error (fedsite's own message, or only the type of any other
        exception, whose message may hold a path or a header value); 130 when interrupted.
    """
    try:
        return command()
    except FedsiteError as exc:
        print(f"{label}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(
            f"{label}: error: unexpected {type(exc).__name__}; {unexpected}. "
            "Please report this with the command you ran (not the data).",
            file=sys.stderr,
        )
        return 2
