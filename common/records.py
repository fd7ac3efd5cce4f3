"""Conversion between model weights and Flower records, with checks a bad message cannot pass.

This is the one module in ``common`` that imports Flower: the handlers use it to translate;
training and model code never see a record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.errors import FedsiteError

__all__ = ["RecordError", "check_arrays", "load_arrays", "to_arrays"]


class RecordError(FedsiteError, ValueError):
    """A record's content does not fit the model or holds non-finite numbers."""


def to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The model's full state (parameters and buffers) as an ``ArrayRecord``, keyed by state-dict name."""
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def check_arrays(
    arrays: ArrayRecord, reference: Mapping[str, Any], *, what: str = "the model"
) -> dict[str, np.ndarray]:
    """Check that ``arrays`` has exactly the reference's keys and shapes and only finite values.

    Used by both sides: a site checks the global weights it receives, the server checks each
    site's weights before aggregating them.

    Args:
        arrays: Weights received in a message.
        reference: The expected weights (anything with ``.shape`` per key: tensors, arrays).
        what: How messages name the reference, e.g. ``"the global model"``.

    Returns:
        The arrays as NumPy arrays, keyed by name.

    Raises:
        RecordError: Naming the first missing, extra, misshapen or non-finite entry.
    """
    got = set(arrays.keys())
    want = set(reference.keys())
    if got != want:
        missing = sorted(want - got)[:3]
        extra = sorted(got - want)[:3]
        raise RecordError(
            f"weights do not match {what}: missing {missing or 'none'}, unexpected {extra or 'none'} "
            "(do the site and the server run the same model.* config?)"
        )
    out: dict[str, np.ndarray] = {}
    for key in reference:
        arr = arrays[key].numpy()
        if tuple(arr.shape) != tuple(reference[key].shape):
            raise RecordError(
                f"weights do not match {what}: '{key}' has shape {tuple(arr.shape)}, "
                f"expected {tuple(reference[key].shape)}"
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise RecordError(f"weight '{key}' holds NaN or infinite values")
        out[key] = arr
    return out


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Load ``arrays`` into ``model`` after :func:`check_arrays`.

    Raises:
        RecordError: If the arrays do not fit the model.
    """
    reference = model.state_dict()
    checked = check_arrays(arrays, reference)
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v, copy=True)).to(reference[k].dtype) for k, v in checked.items()}
    )
