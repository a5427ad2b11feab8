"""Units of a training pool and removal as zero weights (method §1).

A unit is a whole task (``task:K``), a support instance (``support:K:J``) or a query
instance (``query:K:J``) of the training pool; ``K`` is the ``task_id`` and ``J`` the
position inside the task. The ids use the syntax of ``score``'s ``pred_delta_lam=`` option
(:func:`metaif_cli.score.config.parse_unit_ref`). Removing units means setting their
weight (``w_k``, ``u_kj`` or ``v_kj``) to 0 in :class:`~metaif_cli.train.loop.PoolWeights`;
normalisers stay fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pandas as pd
import torch

from metaif_cli.errors import MetaifError
from metaif_cli.score.config import parse_unit_ref
from metaif_cli.train.loop import PoolWeights

KINDS = ("task", "support", "query")


@dataclass(frozen=True)
class Unit:
    """One removable unit: ``kind`` is ``task``, ``support`` or ``query``."""

    kind: str
    task_id: int
    position: int | None = None

    @property
    def id(self) -> str:
        """``task:K`` or ``support:K:J`` / ``query:K:J``."""
        return f"task:{self.task_id}" if self.kind == "task" else f"{self.kind}:{self.task_id}:{self.position}"

    @property
    def ref(self) -> tuple[str, int, str | None, int | None]:
        """The tuple :func:`metaif_cli.score.methods.pred_delta_lam` takes."""
        return parse_unit_ref(self.id)

    @classmethod
    def parse(cls, text: str) -> "Unit":
        """Inverse of :attr:`id`."""
        _, task, role, position = parse_unit_ref(text)
        return cls("task", task) if role is None else cls(role, task, position)


def all_units(n: int, s: int, q: int, kind: str) -> list[Unit]:
    """Every unit of ``kind`` in a pool of ``n`` tasks with ``s`` support and ``q`` query instances."""
    if kind == "task":
        return [Unit("task", k) for k in range(n)]
    if kind not in KINDS:
        raise MetaifError(f"unit={kind!r} is not valid; choose one of: {', '.join(KINDS)}")
    m = s if kind == "support" else q
    return [Unit(kind, k, j) for k in range(n) for j in range(m)]


def weights_without(base: dict[str, torch.Tensor], units: Iterable[Unit]) -> PoolWeights:
    """The pool weights ``base`` (the trained run's) with ``units`` set to 0."""
    w, u, v = (base[k].detach().cpu().clone() for k in ("w", "u", "v"))
    for unit in units:
        if unit.kind == "task":
            w[unit.task_id] = 0.0
        elif unit.kind == "support":
            u[unit.task_id, unit.position] = 0.0
        else:
            v[unit.task_id, unit.position] = 0.0
    return PoolWeights(w, u, v)


def corrupted_flags(tasks_csv: pd.DataFrame, kind: str) -> pd.Series:
    """Recorded corruption of every training unit of ``kind``, indexed by unit id (ground truth).

    A task counts as corrupted when ``task_corrupted``; an instance when its label differs
    from the true one or its whole task is corrupted (the ``corrupted`` column of ``tasks.csv``).
    """
    train = tasks_csv[tasks_csv.split == "train"]
    if kind == "task":
        flags = train.groupby("task_id")["task_corrupted"].first().astype(bool)  # sorted by task_id
        return pd.Series(flags.to_numpy(), index=[f"task:{k}" for k in flags.index])
    rows = train[train.role == kind].sort_values(["task_id", "position"])
    ids = [f"{kind}:{k}:{j}" for k, j in zip(rows.task_id, rows.position)]
    return pd.Series(rows["corrupted"].astype(bool).to_numpy(), index=ids)
