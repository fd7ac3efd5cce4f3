"""The site runs only app code it approved: an allow-list of Flower App Bundle (FAB) hashes.

In Flower 1.41 the SuperLink ships the app as a FAB and the SuperNode installs and runs whatever
arrives. A site that starts with ``fedsite site start --approved FILE`` runs its SuperNode with
``--isolation process`` and its own executor (:mod:`client.approved_exec`), which checks each run's
FAB hash against ``FILE`` before any of the app's code runs, and refuses any other.

A FAB's hash is the SHA-256 of its bytes; Flower builds FABs reproducibly (fixed file times), so a
site computes the hash of the source it reviewed with ``fedsite site approve APP_DIR`` and gets the
hash the coordinator's ``flwr run`` will send. One changed byte in any file of the app changes it.

The approved list is JSON: ``{"approved": [{"fab-hash": "...", "app": "fedsite/fedsite",
"version": "0.1.0"}]}``.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path

from common.errors import FedsiteError

__all__ = ["ApprovalError", "approve", "fab_hash_of_app", "load_approved", "refusal"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ApprovalError(FedsiteError):
    """The approved list cannot be read or written; the message names the file and the fix."""


def fab_hash_of_app(app_dir: Path) -> tuple[str, str, str]:
    """The FAB hash Flower computes for the app in ``app_dir``, with its app id and version.

    Returns:
        ``(fab_hash, "publisher/name", version)``.

    Raises:
        ApprovalError: If ``app_dir`` holds no Flower app (``pyproject.toml``).
    """
    from flwr.cli.build import build_fab_from_disk

    project = Path(app_dir) / "pyproject.toml"
    if not project.is_file():
        raise ApprovalError(f"{app_dir} has no pyproject.toml; give the folder of the app's reviewed source")
    meta = tomllib.loads(project.read_text())
    app_id = f"{meta['tool']['flwr']['app']['publisher']}/{meta['project']['name']}"
    digest = hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()
    return digest, app_id, str(meta["project"]["version"])


def load_approved(path: Path) -> list[dict[str, str]]:
    """The approved entries in ``path`` (an empty list when the file does not exist yet).

    Raises:
        ApprovalError: If the file is not a valid approved list.
    """
    if not Path(path).is_file():
        return []
    try:
        entries = json.loads(Path(path).read_text())["approved"]
        assert all(_HEX64.match(e["fab-hash"]) for e in entries)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ApprovalError(
            f'{path} is not an approved list ({{"approved": [{{"fab-hash": ...}}]}}); '
            "recreate it with `fedsite site approve APP_DIR --approved FILE`"
        ) from None
    return list(entries)


def approve(path: Path, fab_hash: str, *, app: str = "", version: str = "") -> list[dict[str, str]]:
    """Add ``fab_hash`` to the approved list in ``path``; returns the list as written.

    Raises:
        ApprovalError: If ``fab_hash`` is not a SHA-256 hex digest.
    """
    if not _HEX64.match(fab_hash):
        raise ApprovalError(f"{fab_hash!r} is not a FAB hash (64 hex digits, as `flwr ls` shows under fab-hash)")
    entries = [e for e in load_approved(path) if e["fab-hash"] != fab_hash]
    entries.append({"fab-hash": fab_hash, "app": app, "version": version})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"approved": entries}, indent=2) + "\n")
    return entries


def refusal(fab_hash: str, approved: list[dict[str, str]]) -> str | None:
    """Why a run with ``fab_hash`` must not run here, or None when it is approved."""
    if any(e["fab-hash"] == fab_hash for e in approved):
        return None
    known = ", ".join(f"{e.get('app') or '?'} {e.get('version') or '?'} ({e['fab-hash'][:12]})" for e in approved)
    return (
        f"app {fab_hash[:12]}... is not approved at this site (approved: {known or 'none'}); "
        "review the app and add it with `fedsite site approve APP_DIR`"
    )
