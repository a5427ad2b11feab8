"""Parameter dicts and flat vectors.

Influence code works on flat vectors of all meta-parameters (method §2); the
meta-learners work on dicts. :class:`FlatSpec` converts between the two in a fixed
order, also under ``vmap``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]


@dataclass(frozen=True)
class FlatSpec:
    """Names and shapes of a parameter dict, in a fixed order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> "FlatSpec":
        return cls(tuple(params), tuple(p.shape for p in params.values()))

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """Dict -> ``[P]`` vector (concatenated in ``names`` order)."""
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, vec: Tensor) -> Params:
        """``[P]`` vector -> dict of tensors shaped as the spec."""
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(torch.Size(shape).numel())
            out[name] = vec[start : start + size].reshape(shape)
            start += size
        return out


def non_finite(params: Mapping[str, Tensor]) -> list[str]:
    """Names of the tensors of ``params`` holding a NaN or an infinity (floating tensors only)."""
    return [k for k, t in params.items()
            if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
