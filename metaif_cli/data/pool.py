"""Fixed, seeded task pools with stable ids (method §1) and label corruption (section 6).

A pool is drawn once from the run's seed: every task keeps its ``task_id`` and every
instance its ``instance_id`` (row of the dataset), so scores trace back to data.
``tasks.csv`` lists them all; the ``corrupted`` column is ground truth for evaluation
only and is never read by scoring.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from metaif_cli.data.config import CorruptionConfig, DatasetConfig
from metaif_cli.data.base import ImageDataset
from metaif_cli.data.compact import to_float
from metaif_cli.errors import MetaifError
from metaif_cli.meta.tasks import TaskBatch

SPLITS = ("train", "val", "test")


@dataclass
class TaskPool:
    """``n`` tasks of one split. Index tensors point into the dataset's images.

    ``spt_idx [n,S]``, ``y_spt [n,S]`` (labels used, maybe corrupted), ``true_y_spt [n,S]``,
    likewise ``qry_idx``/``y_qry``/``true_y_qry [n,Q]``; ``task_corrupted [n]`` bool.
    """

    split: str
    spt_idx: Tensor
    y_spt: Tensor
    true_y_spt: Tensor
    qry_idx: Tensor
    y_qry: Tensor
    true_y_qry: Tensor
    task_corrupted: Tensor

    def __len__(self) -> int:
        return self.spt_idx.shape[0]

    def batch(self, images: Tensor, index: Tensor | None = None, dtype: torch.dtype | None = None) -> TaskBatch:
        """Materialise tasks (all, or ``index``) as a :class:`TaskBatch` with unit weights on ``images.device``.

        ``images`` may be compact (``uint8``: :mod:`metaif_cli.data.compact`); the gathered images are
        converted to ``dtype`` (default: ``images.dtype`` for floats, float32 for ``uint8``).
        """
        dtype = dtype or (images.dtype if images.is_floating_point() else torch.float32)
        sel = slice(None) if index is None else torch.as_tensor(index).cpu()
        spt, qry, dev = self.spt_idx[sel], self.qry_idx[sel], images.device
        return TaskBatch(
            x_spt=to_float(images[spt.to(dev)], dtype),  # [T, S, C, H, W]
            y_spt=self.y_spt[sel].to(dev),
            u=torch.ones(spt.shape, dtype=dtype, device=dev),
            x_qry=to_float(images[qry.to(dev)], dtype),  # [T, Q, C, H, W]
            y_qry=self.y_qry[sel].to(dev),
            v=torch.ones(qry.shape, dtype=dtype, device=dev),
            w=torch.ones(spt.shape[0], dtype=dtype, device=dev),
        )


def split_classes(dataset: ImageDataset, cfg: DatasetConfig, gen: torch.Generator) -> dict[str, Tensor]:
    """Instance indices available to each split: by class (disjoint classes) or by instance."""
    labels = dataset.labels
    fr = torch.tensor(cfg.split_fractions, dtype=torch.float64)
    fr = fr / fr.sum()
    if cfg.split_by == "class":
        if dataset.splits is not None:
            class_sets = {s: torch.tensor(dataset.splits[s], dtype=torch.long) for s in SPLITS}
        else:
            # rotated copies of a character (".../rot90") stay in the split of the character
            base = [re.sub(r"/rot\d+$", "", name) for name in dataset.class_names]
            groups = sorted(set(base))
            group_of = torch.tensor([groups.index(b) for b in base]) if len(groups) < len(base) else None
            perm = torch.randperm(len(groups), generator=gen)
            cut = torch.round(torch.cumsum(fr, 0) * len(groups)).long().tolist()
            class_sets = {"train": perm[: cut[0]], "val": perm[cut[0] : cut[1]], "test": perm[cut[1] :]}
            if group_of is not None:
                class_sets = {s: torch.nonzero(torch.isin(group_of, g)).flatten() for s, g in class_sets.items()}
        return {s: torch.nonzero(torch.isin(labels, c)).flatten() for s, c in class_sets.items()}
    if dataset.splits is not None:
        raise MetaifError(f"{dataset.name} fixes its class split (e.g. train/, val/, test/ folders), which "
                          "dataset.split_by=instance would ignore; use dataset.split_by=class")
    parts: dict[str, list[Tensor]] = {s: [] for s in SPLITS}
    for c in range(dataset.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = torch.round(torch.cumsum(fr, 0) * len(idx)).long().tolist()
        for s, chunk in zip(SPLITS, (idx[: cut[0]], idx[cut[0] : cut[1]], idx[cut[1] :])):
            parts[s].append(chunk)
    return {s: torch.sort(torch.cat(p)).values for s, p in parts.items()}


def _check_feasible(labels: Tensor, available: Tensor, cfg: DatasetConfig, split: str) -> dict[int, Tensor]:
    by_class = {}
    for c in torch.unique(labels[available]).tolist():
        idx = available[labels[available] == c]
        if len(idx) >= cfg.shots + cfg.queries:
            by_class[c] = idx
    if len(by_class) < cfg.ways:
        raise MetaifError(
            f"the {split} split has {len(by_class)} classes with at least shots+queries="
            f"{cfg.shots + cfg.queries} images, fewer than dataset.ways={cfg.ways}; lower dataset.ways, "
            "dataset.shots or dataset.queries, or change dataset.split_fractions"
        )
    return by_class


def draw_pool(labels: Tensor, available: Tensor, cfg: DatasetConfig, n: int, split: str, gen: torch.Generator) -> TaskPool:
    """Draw ``n`` tasks: ``ways`` classes, then ``shots`` support and ``queries`` query images each."""
    by_class = _check_feasible(labels, available, cfg, split)
    classes = torch.tensor(sorted(by_class))
    spt, qry, ys, yq = [], [], [], []
    for _ in range(n):
        chosen = classes[torch.randperm(len(classes), generator=gen)[: cfg.ways]]
        s_idx, q_idx = [], []
        for c in chosen.tolist():
            pool = by_class[c]
            pick = pool[torch.randperm(len(pool), generator=gen)[: cfg.shots + cfg.queries]]
            s_idx.append(pick[: cfg.shots])
            q_idx.append(pick[cfg.shots :])
        spt.append(torch.cat(s_idx))
        qry.append(torch.cat(q_idx))
        ys.append(torch.arange(cfg.ways).repeat_interleave(cfg.shots))
        yq.append(torch.arange(cfg.ways).repeat_interleave(cfg.queries))
    y_spt, y_qry = torch.stack(ys), torch.stack(yq)
    return TaskPool(split, torch.stack(spt), y_spt, y_spt.clone(), torch.stack(qry), y_qry, y_qry.clone(),
                    torch.zeros(n, dtype=torch.bool))


def _wrong_labels(y: Tensor, ways: int, gen: torch.Generator) -> Tensor:
    """A uniformly random label different from each entry of ``y``."""
    shift = torch.randint(1, ways, y.shape, generator=gen)
    return (y + shift) % ways


def corrupt_pool(pool: TaskPool, cfg: CorruptionConfig, ways: int, gen: torch.Generator) -> None:
    """Corrupt labels in place: whole tasks first, then single instances of clean tasks."""
    n = len(pool)
    n_tasks = int(round(cfg.task_fraction * n))
    bad = torch.randperm(n, generator=gen)[:n_tasks]
    for k in bad.tolist():
        if cfg.task_mode == "shift":  # the query follows a consistent wrong rule: class c is called c + 1
            pool.y_qry[k] = (pool.y_qry[k] + 1) % ways
            pool.task_corrupted[k] = True
            continue
        for y in (pool.y_spt, pool.y_qry):
            if cfg.task_mode == "permute":
                y[k] = y[k][torch.randperm(y.shape[1], generator=gen)]
            else:
                y[k] = _wrong_labels(y[k], ways, gen)
        pool.task_corrupted[k] = True
    clean = ~pool.task_corrupted
    for role in cfg.instance_roles:
        y = pool.y_spt if role == "support" else pool.y_qry
        cand = torch.nonzero(clean[:, None].expand_as(y).reshape(-1)).flatten()
        n_inst = int(round(cfg.instance_fraction * len(cand)))
        flat = y.view(-1)
        pick = cand[torch.randperm(len(cand), generator=gen)[:n_inst]]
        flat[pick] = _wrong_labels(flat[pick], ways, gen)


def build_pools(dataset: ImageDataset, dcfg: DatasetConfig, ccfg: CorruptionConfig, seed: int) -> dict[str, TaskPool]:
    """The train/val/test pools of a run, drawn from ``seed``; only ``train`` is corrupted."""
    gen = torch.Generator().manual_seed(seed)
    available = split_classes(dataset, dcfg, gen)
    sizes = {"train": dcfg.num_train_tasks, "val": dcfg.num_val_tasks, "test": dcfg.num_test_tasks}
    pools = {s: draw_pool(dataset.labels, available[s], dcfg, sizes[s], s, gen) for s in SPLITS}
    corrupt_pool(pools["train"], ccfg, dcfg.ways, gen)
    return pools


def pools_table(pools: dict[str, TaskPool], dataset: ImageDataset) -> pd.DataFrame:
    """One row per (task, instance): the content of ``tasks.csv``."""
    frames = []
    for split, pool in pools.items():
        for role, idx, y, true_y in (("support", pool.spt_idx, pool.y_spt, pool.true_y_spt),
                                     ("query", pool.qry_idx, pool.y_qry, pool.true_y_qry)):
            n, m = idx.shape
            cls = dataset.labels[idx.reshape(-1)]
            frames.append(pd.DataFrame({
                "task_id": torch.arange(n).repeat_interleave(m).numpy(),
                "split": split,
                "role": role,
                "position": torch.arange(m).repeat(n).numpy(),
                "instance_id": idx.reshape(-1).numpy(),
                "class": [dataset.class_names[c] for c in cls.tolist()],
                "label": y.reshape(-1).numpy(),
                "true_label": true_y.reshape(-1).numpy(),
                "corrupted": (y != true_y).reshape(-1).numpy() | pool.task_corrupted.repeat_interleave(m).numpy(),
                "task_corrupted": pool.task_corrupted.repeat_interleave(m).numpy(),
            }))
    return pd.concat(frames, ignore_index=True)
