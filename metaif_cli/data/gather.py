"""Tasks gathered chunk by chunk from compact images (method §1; memory of every pass over tasks).

A pool is index tensors into the dataset's images. The images stay in a compact form
(``uint8`` where every value is ``k/255``, as read from PNG or pickle files; else the
loader's floats), and only the tasks of the chunk being processed are gathered and
converted to the compute dtype. The conversion is the loaders' own (``uint8 -> float32
/ 255 -> dtype``), so a gathered task holds exactly the values of the old float copy of
the whole dataset.

:class:`PoolTasks` behaves like a :class:`~metaif_cli.meta.tasks.TaskBatch` where the
passes over tasks need it (``len``, indexing by tensor, list or slice, ``w``/``u``/``v``,
``with_weights``), but indexing builds the chunk's tensors on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from metaif_cli.data.compact import to_float
from metaif_cli.data.pool import TaskPool
from metaif_cli.meta.tasks import TaskBatch


@dataclass
class PoolTasks:
    """Tasks ``rows`` of ``pool`` with their weights; images gathered per selection.

    ``images [N, C, H, W]`` compact, on the compute device; ``w [n]``, ``u [n, S]``, ``v [n, Q]``
    in ``dtype`` on that device (one per selected task); ``rows [n]`` task rows of ``pool`` (CPU).
    """

    pool: TaskPool
    images: Tensor
    dtype: torch.dtype
    rows: Tensor
    w: Tensor
    u: Tensor
    v: Tensor

    @classmethod
    def of(cls, pool: TaskPool, images: Tensor, dtype: torch.dtype, index: Tensor | None = None,
           weights: dict[str, Tensor] | None = None) -> "PoolTasks":
        """Tasks ``index`` (default all) of ``pool``, unit weights unless ``weights`` (``w``/``u``/``v`` over
        the whole pool) are given."""
        rows = torch.arange(len(pool)) if index is None else torch.as_tensor(index).cpu().long()
        dev = images.device
        ones = {"w": (len(rows),), "u": (len(rows), pool.spt_idx.shape[1]), "v": (len(rows), pool.qry_idx.shape[1])}
        wts = {k: (torch.ones(shape, dtype=dtype, device=dev) if weights is None or weights.get(k) is None
                   else weights[k][rows.to(weights[k].device)].to(dev, dtype)) for k, shape in ones.items()}
        return cls(pool, images, dtype, rows, **wts)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def _select(self, index) -> Tensor:
        if isinstance(index, int):
            index = slice(index, index + 1)
        if isinstance(index, slice):
            return torch.arange(len(self))[index]
        return torch.as_tensor(index).cpu().long()

    def image_rows(self, role: str, index=None) -> Tensor:
        """Dataset rows of the ``support`` or ``query`` images of the selected tasks, ``[T, M]`` (CPU)."""
        sel = self.rows if index is None else self.rows[self._select(index)]
        return (self.pool.spt_idx if role == "support" else self.pool.qry_idx)[sel]

    @property
    def y_spt(self) -> Tensor:
        """Support labels of every selected task, ``[n, S]`` on the device (labels are small: kept whole)."""
        return self.pool.y_spt[self.rows].to(self.images.device)

    @property
    def y_qry(self) -> Tensor:
        """Query labels of every selected task, ``[n, Q]`` on the device."""
        return self.pool.y_qry[self.rows].to(self.images.device)

    def __getitem__(self, index) -> TaskBatch:
        """The selected tasks as tensors: images gathered and converted, weights selected."""
        sel = self._select(index)
        rows, dev = self.rows[sel], self.images.device
        dsel = sel.to(dev)
        return TaskBatch(
            x_spt=to_float(self.images[self.pool.spt_idx[rows].to(dev)], self.dtype),  # [T, S, C, H, W]
            y_spt=self.pool.y_spt[rows].to(dev),
            u=self.u[dsel],
            x_qry=to_float(self.images[self.pool.qry_idx[rows].to(dev)], self.dtype),  # [T, Q, C, H, W]
            y_qry=self.pool.y_qry[rows].to(dev),
            v=self.v[dsel],
            w=self.w[dsel],
        )

    def with_weights(self, w: Tensor | None = None, u: Tensor | None = None, v: Tensor | None = None) -> "PoolTasks":
        """A copy with some weights replaced (one per selected task)."""
        return replace(self, w=self.w if w is None else w, u=self.u if u is None else u, v=self.v if v is None else v)

    def materialise(self) -> TaskBatch:
        """All selected tasks at once (small pools and tests only: this is what chunking avoids)."""
        return self[slice(None)]
