"""Where a deployment keeps its generated material by default: outside any repository.

* certificates and keys: ``$FEDSITE_CERTS`` or ``~/.config/fedsite/certs``
* the SuperLink's state (database, log, Flower's home): ``$FEDSITE_STATE`` or ``~/.local/share/fedsite/superlink``
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["certs_dir", "state_dir"]


def certs_dir() -> Path:
    """The default certificate folder: ``$FEDSITE_CERTS`` or ``~/.config/fedsite/certs``."""
    env = os.environ.get("FEDSITE_CERTS")
    return Path(env).expanduser() if env else Path.home() / ".config" / "fedsite" / "certs"


def state_dir() -> Path:
    """The coordinator's default state folder: ``$FEDSITE_STATE`` or ``~/.local/share/fedsite/superlink``."""
    env = os.environ.get("FEDSITE_STATE")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "fedsite" / "superlink"
