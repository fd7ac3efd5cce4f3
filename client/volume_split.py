"""Volumes within a series: the header values that tell them apart, how a series is split, which are used.

A multi-volume MR series (diffusion: one volume per b-value and direction; fMRI and perfusion: one
per time point; multi-echo: one per echo; enhanced multi-frame: one per dimension index) stacks
several images at each slice position. :func:`volume_keys` reads, for one image, the header values
that can tell its volume (:data:`KEYS`); :func:`split_volumes` groups a series' images by the
first key (or, failing that, all varying keys together) under which every group is one stack;
:func:`select_volumes` applies the site's ``data.volume`` policy.

Key values are acquisition parameters (b-values, echo numbers, time-point indices), never
patient values, so they may appear in reasons and reports.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from client.errors import SiteDataError

__all__ = ["KEYS", "POLICY_HELP", "parse_policy", "select_volumes", "split_volumes", "volume_keys"]

#: The keys that can tell volumes apart, in the order they are tried.
KEYS = ("b-value", "direction", "temporal position", "echo", "trigger time", "acquisition", "dimension", "image type")

POLICY_HELP = (
    "which volume(s) of a multi-volume series (diffusion, fMRI, multi-echo) to use: 'first' (the lowest "
    "b-value / echo / time point), 'all', or a header rule KEY=VALUE (b-value=0, echo=1, temporal position=1)"
)

_ALIASES = {"b": "b-value", "bvalue": "b-value", "b-value": "b-value", "echo": "echo", "temporal": "temporal position"}


def _num(value: Any) -> str | None:
    try:
        items = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") else [value]
        if isinstance(value, (str, bytes)):
            items = [value]
        out = [float(v.decode() if isinstance(v, bytes) else v) for v in items]
    except (TypeError, ValueError):
        return None
    if not out or not all(np.isfinite(out)):
        return None
    return "/".join(f"{v:g}" for v in out)


def _get(ds: Any, tag: Any) -> Any:
    try:
        elem = ds.get(tag)
    except Exception:
        return None
    if elem is None:
        return None
    return getattr(elem, "value", elem)


def _first(ds: Any, seq: str) -> Any:
    items = _get(ds, seq)
    return items[0] if items else None


def _dimension(ds: Any, frame_item: Any) -> str | None:
    """An enhanced frame's DimensionIndexValues without the in-stack (slice position) index."""
    values = _get(frame_item, "DimensionIndexValues") if frame_item is not None else None
    if values is None:
        return None
    values = list(values) if hasattr(values, "__iter__") else [values]
    pointers = [_get(item, "DimensionIndexPointer") for item in (_get(ds, "DimensionIndexSequence") or [])]
    position_tags = {0x00209057, 0x00200032}  # InStackPositionNumber, ImagePositionPatient
    kept = [str(v) for i, v in enumerate(values) if i >= len(pointers) or int(pointers[i] or 0) not in position_tags]
    return "/".join(kept) if kept else None


def volume_keys(ds: Any, frame: int | None = None) -> dict[str, str]:
    """The header values of one image (a file, or frame ``frame`` of an enhanced file) that can tell volumes apart.

    Args:
        ds: A pydicom dataset (header only is enough).
        frame: 0-based frame of an enhanced multi-frame file; None for a single image.

    Returns:
        ``{key: value}`` for the keys of :data:`KEYS` the header holds.
    """
    keys: dict[str, str] = {}
    per = None
    if frame is not None:
        items = _get(ds, "PerFrameFunctionalGroupsSequence")
        per = items[frame] if items and len(items) > frame else None
    shared = _first(ds, "SharedFunctionalGroupsSequence")

    def group(seq: str) -> Any:
        for source in (per, shared):
            if source is not None and _get(source, seq):
                return _first(source, seq)
        return None

    diffusion = group("MRDiffusionSequence")
    bval = _get(diffusion, "DiffusionBValue") if diffusion is not None else None
    for tag in ("DiffusionBValue", 0x00431039, 0x0019100C, 0x20011003):
        if bval is None:
            value = _get(ds, tag)
            bval = value[0] if tag == 0x00431039 and isinstance(value, (list, tuple)) and value else value
    if (b := _num(bval)) is not None:
        keys["b-value"] = b
    direction = None
    if diffusion is not None:
        vec = _first(diffusion, "DiffusionGradientDirectionSequence")
        direction = _get(vec, "DiffusionGradientOrientation") if vec is not None else None
    for tag in ("DiffusionGradientOrientation", 0x0019100E):
        if direction is None:
            direction = _get(ds, tag)
    if (d := _num(direction)) is not None:
        keys["direction"] = d
    content = _first(per, "FrameContentSequence") if per is not None else None
    temporal = _get(content, "TemporalPositionIndex") if content is not None else None
    if temporal is None:
        temporal = _get(ds, "TemporalPositionIdentifier")
    if (t := _num(temporal)) is not None:
        keys["temporal position"] = t
    echo_seq = group("MREchoSequence")
    echo = _get(echo_seq, "EffectiveEchoTime") if echo_seq is not None else None
    if echo is None:
        echo = _get(ds, "EchoNumbers")
    if (e := _num(echo)) is not None:
        keys["echo"] = e
    if (tt := _num(_get(ds, "TriggerTime"))) is not None:
        keys["trigger time"] = tt
    if (a := _num(_get(ds, "AcquisitionNumber"))) is not None:
        keys["acquisition"] = a
    if (dim := _dimension(ds, content)) is not None:
        keys["dimension"] = dim
    image_type = _get(ds, "ImageType")
    if image_type:
        items = [image_type] if isinstance(image_type, str) else list(image_type)
        keys["image type"] = re.sub(r"[^0-9A-Za-z_\\]", "", "\\".join(str(v) for v in items))[:64]
    return keys


def _order(value: str) -> tuple:
    try:
        return (0, tuple(float(v) for v in value.split("/")), value)
    except ValueError:
        return (1, (), value)


def split_volumes(
    frames: Sequence[Any], is_stack: Callable[[Sequence[Any]], bool]
) -> tuple[str, list[tuple[str, list[Any]]]] | None:
    """Group a series' images into volumes by the first key under which every group is one stack.

    Args:
        frames: The images (each with a ``keys`` dict, :func:`volume_keys`).
        is_stack: Whether some images form one stack (no duplicate positions, one orientation).

    Returns:
        ``(how, [(volume name, images), ...])`` in volume order (lowest value first), e.g.
        ``("b-value", [("b-value 0", ...), ("b-value 1000", ...)])``; None if no key splits the series.
    """
    varying = [k for k in KEYS if len({f.keys.get(k) for f in frames}) > 1]
    candidates: list[tuple[str, ...]] = [(k,) for k in varying]
    if len(varying) > 1:
        candidates.append(tuple(varying))
        diffusion = tuple(k for k in varying if k in ("b-value", "direction"))
        if len(diffusion) == 2:
            candidates.insert(0, diffusion)
    for combo in candidates:
        groups: dict[tuple, list[Any]] = {}
        for f in frames:
            groups.setdefault(tuple(f.keys.get(k, "") for k in combo), []).append(f)
        if len(groups) > 1 and all(is_stack(g) for g in groups.values()):
            ordered = sorted(groups.items(), key=lambda kv: tuple(_order(v) for v in kv[0]))
            named = [
                (", ".join(f"{k} {v or 'none'}" for k, v in zip(combo, values, strict=True)), g)
                for values, g in ordered
            ]
            return " + ".join(combo), named
    return None


def parse_policy(policy: str) -> tuple[str, str | None, str | None]:
    """``data.volume`` as ``(mode, key, value)``: ``("first", None, None)``, ``("all", None, None)`` or
    ``("rule", key, value)``.

    Raises:
        SiteDataError: If the policy is none of these (the message names the accepted forms).
    """
    text = policy.strip().lower()
    if text in ("first", "all"):
        return text, None, None
    if "=" in text:
        key, value = (p.strip() for p in text.split("=", 1))
        key = _ALIASES.get(key.replace(" ", ""), _ALIASES.get(key, key))
        if key in KEYS and value:
            return "rule", key, value
    raise SiteDataError(f"data.volume {policy!r} is not understood: {POLICY_HELP}")


def select_volumes(volumes: list[tuple[str, list[Any]]], policy: str) -> list[int]:
    """Indices of the volumes (in :func:`split_volumes` order) the policy uses.

    A rule (``b-value=0``) picks the volumes whose key has that value; when none has it, the first is used.
    """
    mode, key, value = parse_policy(policy)
    if mode == "all":
        return list(range(len(volumes)))
    if mode == "rule":
        want = _num(value)
        hits = [
            i
            for i, (_, frames) in enumerate(volumes)
            if (got := frames[0].keys.get(key)) is not None and (got == value or (want is not None and got == want))
        ]
        if hits:
            return hits
    return [0]
