"""Where the repository and the shared test data are, wherever a test file sits in ``tests/``."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
"""The repository's root (the folder holding ``pyproject.toml``)."""

SHARED_DATA = REPO.parent / "shared" / "data"
"""``../shared/data`` beside the repository (never copied into it)."""
