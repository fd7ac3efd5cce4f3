"""On-disk cache of a site's decoded, preprocessed samples, on the site's own disk.

Decoding DICOM and resampling is the slow part of reading a site. The result is stored once in
``<site>/.fedsite-cache/`` (or, when the site folder is read-only, under ``$FEDSITE_CACHE``, by
default ``~/.cache/fedsite/site-cache/``) and reused by every later round, run and process. The
cache key covers every input file's relative path and stat data (size, modification time, change
time and inode, as git's index keeps them) plus the preprocessing settings and a pipeline
version, so a changed file or setting makes a new entry; older entries of the same site are
removed. The change time catches a file rewritten with the same size whose modification time
was restored or kept (``cp -p``, ``rsync -a``, unpacking an archive, or two writes within the
clock's resolution): no program can set it back. fedsite's own folders (the cache and the
privacy ledger, :mod:`client.layout`) are not inputs. The cache holds patient pixels: it never
leaves the site and is never committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from client.layout import CACHE_DIR, LEDGER_DIR, POLICY_FILE

__all__ = ["cache_dir_for", "cached", "fingerprint"]

log = logging.getLogger("fedsite.client")


def fingerprint(
    root: Path, *, settings: dict[str, Any], skip: Iterable[str] = (CACHE_DIR, LEDGER_DIR, POLICY_FILE)
) -> str:
    """A key for everything under ``root`` (paths and stat data: size, mtime, ctime, inode) and ``settings``.

    Args:
        root: The site folder.
        settings: Preprocessing settings that change the samples (JSON-able).
        skip: Top-level folder and file names to ignore (the cache itself, the privacy ledger and the
            privacy policy: editing the policy changes no sample).

    Returns:
        A hex digest.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    skip = set(skip)
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in skip]
        dirnames.sort()
        top = Path(dirpath) == root
        for name in sorted(filenames):
            if top and name in skip:
                continue
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()[:24]


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True):
            pass
        return True
    except OSError:
        return False


def cache_dir_for(site_dir: Path) -> Path:
    """Where the site's cache lives: in the site folder if writable, else the user cache."""
    local = site_dir / CACHE_DIR
    if _writable(local):
        return local
    base = Path(os.environ.get("FEDSITE_CACHE", Path.home() / ".cache" / "fedsite")) / "site-cache"
    fallback = base / hashlib.sha256(str(site_dir.resolve()).encode()).hexdigest()[:16]
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def cached(
    site_dir: Path, *, name: str, settings: dict[str, Any], build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Return ``build()``'s result for this site and settings, from the disk cache when valid.

    Args:
        site_dir: The site folder (inputs are fingerprinted from it).
        name: The kind of entry, e.g. ``"samples"``.
        settings: What else the result depends on.
        build: Makes the result (a dict of tensors, numbers, strings and lists) on a miss.

    Returns:
        The cached or freshly built result.
    """
    site_dir = Path(site_dir)
    key = fingerprint(site_dir, settings=settings)
    folder = cache_dir_for(site_dir)
    path = folder / f"{name}-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:  # a damaged entry is rebuilt, never trusted
            log.warning("site cache entry %s is unreadable (%s); rebuilding it", path.name, type(exc).__name__)
    result = build()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(result, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in folder.glob(f"{name}-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return result
