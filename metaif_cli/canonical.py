"""Canonical form of an object before ``torch.save``: equal content gives equal bytes (no method
section: plumbing of the run directory, README "byte-identical .pt files").

``torch.save`` pickles, and a pickle records object identity: a string or a tensor storage
met twice is written once and referenced after. Two equal objects built differently (a
checkpoint written straight through, and one written after a resume, whose optimiser state
was read back from disk) can then give different bytes. :func:`canonical` rebuilds the
object with fresh containers, fresh contiguous tensors (each on its own storage), interned
strings and plain Python numbers, keeping every dict's order (the order metaif built it in),
so the bytes depend on the content alone.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any

import torch


def canonical(obj: Any) -> Any:
    """``obj`` rebuilt: dicts, lists and tuples fresh, tensors cloned, strings interned, numbers plain."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone(memory_format=torch.contiguous_format)
    if isinstance(obj, str):
        return sys.intern(str(obj))
    if isinstance(obj, dict):
        return {canonical(k): canonical(v) for k, v in obj.items()}
    if type(obj) is list:
        return [canonical(v) for v in obj]
    if type(obj) is tuple:
        return tuple(canonical(v) for v in obj)
    if obj is None or type(obj) in (bool, int, float):
        return obj
    if isinstance(obj, numbers.Integral):  # numpy integers
        return int(obj)
    if isinstance(obj, numbers.Real):  # numpy floats
        return float(obj)
    return obj
