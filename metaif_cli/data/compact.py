"""Compact storage of a dataset's images and their conversion to the compute dtype (method §1).

Images read from 8-bit files are kept as ``uint8`` (a quarter of float32, an eighth of
float64) and converted per chunk of tasks by :func:`to_float`, the loaders' own conversion
(``uint8 -> float32 / 255 -> dtype``): a converted chunk holds exactly the values of a float
copy of the whole dataset.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compact_images(images: Tensor) -> Tensor:
    """``uint8`` copy of float ``images`` in ``[0, 1]`` when that is lossless (every value ``k/255``
    exactly as :func:`to_float` gives it back), else ``images`` unchanged."""
    if images.dtype == torch.uint8 or not images.is_floating_point() or images.numel() == 0:
        return images
    u8 = torch.empty(images.shape, dtype=torch.uint8, device=images.device)
    step = max(1, (1 << 24) // max(1, images[0].numel()))  # convert in slices: no float temporary of the whole
    for a in range(0, images.shape[0], step):
        part = images[a : a + step]
        q = (part.to(torch.float32) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        if not torch.equal(to_float(q, part.dtype), part):
            return images
        u8[a : a + step] = q
    return u8


def to_float(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Compact images -> floats in ``[0, 1]`` in ``dtype`` (``uint8`` through float32 ``/ 255``, as the loaders)."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    return x.to(dtype)


def image_bytes(images: Tensor) -> int:
    """Bytes held by ``images``."""
    return images.numel() * images.element_size()
