"""Content fingerprints: what an artefact was computed from, recorded beside it and checked on
read (no method section: plumbing of the run directory).

A fingerprint is a SHA-256 hex digest of bytes: of a file (:func:`file_digest`), of several
files (:func:`files_digest`, e.g. a run's ``model.pt`` and ``tasks.csv``) or of a dataset's
images and labels (:func:`tensors_digest`, computed once when a dataset cache is built).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

_BLOCK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 over the names and bytes of several files (absent ones count as absent)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        h.update(f"{path.name}\n".encode())
        h.update(file_digest(path).encode() if path.is_file() else b"absent")
    return h.hexdigest()


def tensors_digest(*parts: torch.Tensor | np.ndarray | str) -> str:
    """SHA-256 over tensors' dtypes, shapes and bytes, and strings (e.g. class names)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            h.update(f"s{len(part)}:{part}".encode())
            continue
        arr = part.detach().cpu().contiguous().numpy() if isinstance(part, torch.Tensor) else np.ascontiguousarray(part)
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.reshape(-1).view(np.uint8).data)
    return h.hexdigest()
