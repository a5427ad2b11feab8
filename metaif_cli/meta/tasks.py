"""Task tensors: support/query images, labels and the weights of method §1.

A :class:`TaskBatch` holds ``T`` tasks of equal shape. Weights ``w`` (task), ``u``
(support instance) and ``v`` (query instance) are 1 by default; removing a unit sets
its weight to 0 with the normalisers unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class TaskBatch:
    """``T`` tasks: ``x_spt [T,S,C,H,W]``, ``y_spt [T,S]``, ``u [T,S]``,
    ``x_qry [T,Q,C,H,W]``, ``y_qry [T,Q]``, ``v [T,Q]``, ``w [T]``."""

    x_spt: Tensor
    y_spt: Tensor
    u: Tensor
    x_qry: Tensor
    y_qry: Tensor
    v: Tensor
    w: Tensor

    def __len__(self) -> int:
        return self.w.shape[0]

    def __getitem__(self, index) -> "TaskBatch":
        """Select tasks by an index tensor, list or slice (keeps the task dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TaskBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device, dtype: torch.dtype) -> "TaskBatch":
        """Move to ``device``; images and weights to ``dtype``, labels stay int64."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = t.to(device) if f.name.startswith("y_") else t.to(device=device, dtype=dtype)
        return TaskBatch(**out)

    def with_weights(self, w: Tensor | None = None, u: Tensor | None = None, v: Tensor | None = None) -> "TaskBatch":
        """A copy with some weights replaced."""
        return replace(self, w=self.w if w is None else w, u=self.u if u is None else u, v=self.v if v is None else v)

    def task_args(self) -> tuple[Tensor, ...]:
        """The per-task tensors in the order the learner's task functions take them."""
        return (self.x_spt, self.y_spt, self.u, self.x_qry, self.y_qry, self.v)
