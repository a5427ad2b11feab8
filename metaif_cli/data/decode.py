"""Checked decoding shared by the loaders (method §1: images in [0, 1]): value ranges and decoder errors.

Two kinds of fault are closed here for every loader:

- a blind cast (``np.asarray(x, dtype=np.uint8)`` on floats in ``[0, 1]`` gives black
  images): :func:`unit_scale` looks at the dtype and the values and says how to bring
  them to ``[0, 1]``, or refuses in one line;
- a decoder exception escaping a loader (``zlib.error`` from a zip member, PIL's
  ``SyntaxError`` on a broken PNG, a pickle's ``UnpicklingError``, gzip's ``EOFError``):
  :func:`corrupt` turns any of them into the one-line ``corrupt or unreadable: <file>``
  :class:`MetaifError`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from metaif_cli.errors import MetaifError
from metaif_cli.io import unreadable

log = logging.getLogger(__name__)

REFETCH = "delete it and fetch the dataset again"


def corrupt(where: str | Path, exc: BaseException, fix: str = REFETCH) -> MetaifError:
    """``corrupt or unreadable: <where> (<decoder error>); <fix>`` as one :class:`MetaifError`."""
    return unreadable(where, fix, exc)


def unit_scale(values: np.ndarray, where: str | Path, what: str = "pixel values",
               fix: str = REFETCH) -> float:
    """The divisor that brings ``values`` to ``[0, 1]``: 1 (floats already in [0, 1]) or 255.

    Accepted: unsigned or signed integers in ``0..255``; floats, all finite, in ``[0, 1]``
    (scaled by 1) or in ``[0, 255]`` with some value above 1 (scaled by 255). Anything else
    (booleans, complex or object arrays, NaN or infinity, negatives, values above 255) is
    refused in one line naming ``where``.
    """
    dtype = values.dtype
    if dtype == np.uint8:
        return 255.0
    if dtype.kind not in "uif":
        raise MetaifError(f"{where}: {what} have dtype {dtype}, expected uint8 (0..255) or floats in [0, 1]; {fix}")
    if values.size == 0:
        return 255.0
    if dtype.kind == "f" and not np.isfinite(values).all():
        raise MetaifError(f"{where}: {what} hold NaN or infinity; {fix}")
    lo, hi = values.min(), values.max()
    if lo < 0 or hi > 255:
        raise MetaifError(f"{where}: {what} range over [{lo:g}, {hi:g}], expected 0..255 or [0, 1]; {fix}")
    if dtype.kind == "f" and hi <= 1:
        log.info("%s: %s are %s in [0, 1]; used as they are", where, what, dtype)
        return 1.0
    if dtype.kind == "f":
        log.info("%s: %s are %s in [0, 255]; scaled by 1/255", where, what, dtype)
    return 255.0


def to_uint8(values: np.ndarray, where: str | Path, what: str = "pixel values", fix: str = REFETCH) -> np.ndarray:
    """``values`` checked by :func:`unit_scale` and stored as uint8 ``0..255`` (rounded)."""
    if values.dtype == np.uint8:
        return values
    factor = 255.0 / unit_scale(values, where, what, fix)
    out = np.empty(values.shape, dtype=np.uint8)
    flat_in, flat_out = values.reshape(-1), out.reshape(-1)
    step = 1 << 24  # bounded float64 temporaries for multi-GB arrays
    for start in range(0, flat_in.size, step):
        flat_out[start : start + step] = np.rint(flat_in[start : start + step].astype(np.float64) * factor)
    return out


def pil_to_uint8(image, mode: str, where: str | Path, fix: str = REFETCH) -> np.ndarray:
    """A PIL image as uint8 in ``mode`` (``"L"`` or ``"RGB"``), scaling 16-bit and float pixels.

    ``Image.convert`` clips 16-bit (``I;16``) and 32-bit (``I``, ``F``) pixels to 255, which
    turns most of such an image white; their values are scaled by their range instead.
    """
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(image)
        if image.mode.startswith("I;16") or (arr.dtype.kind in "iu" and arr.size and arr.max() > 255):
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise MetaifError(f"{where}: pixel values outside 0..65535 in a {image.mode} image; {fix}")
            arr = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
        else:
            arr = to_uint8(arr, where, fix=fix)
        image = Image.fromarray(arr)  # 2-D uint8: mode L
    return np.asarray(image.convert(mode), dtype=np.uint8)


def check_labels(labels: np.ndarray, num_classes: int, where: str | Path, fix: str = REFETCH) -> np.ndarray:
    """Labels as int64, refused unless they are integers in ``0..num_classes-1``."""
    if labels.dtype.kind not in "ui":
        if labels.dtype.kind != "f" or not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise MetaifError(f"{where}: labels have dtype {labels.dtype} and non-integer values; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise MetaifError(f"{where}: label {int(labels.max() if labels.max() >= num_classes else labels.min())} "
                          f"outside 0..{num_classes - 1}; {fix}")
    return labels.astype(np.int64)
