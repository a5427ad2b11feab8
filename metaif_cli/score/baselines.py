"""``method=ekfac_if`` and ``method=trak`` for a training run: the library baselines of method §4.

Rebuilds what the core functions need from a loaded run (network, ``lam``, the weighted
training pool, the evaluation tasks, TRAK's checkpoints) and calls
:func:`metaif_cli.influence.ekfac_if.ekfac_influence` (kronfluence) or
:func:`metaif_cli.influence.trak.trak_influence` (traker). Both ignore the inner level
and score with ``f`` the mean query loss of the evaluation tasks at ``lam``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from metaif_cli.errors import MetaifError
from metaif_cli.influence.compute import ScoreOutput
from metaif_cli.meta.params import Params
from metaif_cli.data.gather import PoolTasks
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.run import checkpoint_paths, load_checkpoint, task_chunk

log = logging.getLogger(__name__)

LIBRARY_METHODS = ("ekfac_if", "trak")
KRONFLUENCE_DIR = "kronfluence"


def pools(run, cfg: ScoreConfig) -> tuple[PoolTasks, PoolTasks]:
    """The weighted training pool and the first ``evaluation.num_tasks`` meta-test tasks."""
    exp = run.exp
    train = exp.tasks("train", weights=run.weights)  # gathered per chunk: the pool's images stay compact
    test_pool = exp.pools["test"]
    m = min(cfg.evaluation.num_tasks or len(test_pool), len(test_pool))
    return train, exp.tasks("test", torch.arange(m))


def trak_checkpoint_paths(run, count: int) -> list[Path]:
    """The latest ``count - 1`` intermediate checkpoints of the run, or one line saying there are fewer."""
    paths = checkpoint_paths(run.run_dir)
    if count - 1 > len(paths):
        raise MetaifError(f"trak.num_checkpoints={count} but the run kept {len(paths)} intermediate checkpoints; "
                          f"use trak.num_checkpoints<={len(paths) + 1} or retrain with optim.num_checkpoints>={count - 1}")
    return paths[len(paths) - (count - 1):] if count > 1 else []


def trak_checkpoints(run, count: int) -> list[Params]:
    """``lam`` and the latest ``count - 1`` intermediate checkpoints of the run."""
    out = [run.lam]
    for path in reversed(trak_checkpoint_paths(run, count)):
        saved = load_checkpoint(path, "an intermediate checkpoint is only written while training: train again into "
                                "a new directory, or lower trak.num_checkpoints", keys=("lam",))
        out.append({k: v.to(run.exp.device, run.exp.dtype) for k, v in saved["lam"].items()})
    return out


def run_library_baseline(run, cfg: ScoreConfig, work_dir: Path | None = None) -> ScoreOutput:
    """Scores of ``cfg.method`` (``ekfac_if`` or ``trak``) for every training task and instance.

    ``work_dir``: the score directory; kronfluence keeps its factors, scores and argument
    files in ``work_dir/kronfluence`` and reuses them on rerun (temporary when None).
    """
    if cfg.evaluation.kind != "mean_loss":
        raise MetaifError(f"method={cfg.method} scores against the mean query loss only; use "
                          "evaluation.kind=mean_loss")
    train, test = pools(run, cfg)
    support = cfg.unit != "task"
    if cfg.method == "ekfac_if":
        from metaif_cli.influence.ekfac_if import ekfac_influence

        return ekfac_influence(run.exp.model, run.lam, train, test, n=len(train),
                               delta_reg=run.train_cfg.optim.delta_reg, cfg=cfg.ekfac, support=support,
                               work_dir=None if work_dir is None else work_dir / KRONFLUENCE_DIR, seed=cfg.seed,
                               progress=cfg.progress)
    from metaif_cli.influence.trak import trak_influence

    return trak_influence(run.exp.model, trak_checkpoints(run, cfg.trak.num_checkpoints), train, test,
                          cfg=cfg.trak, support=support, seed=cfg.seed,
                          chunk=task_chunk(run, cfg.chunk, cfg.chunk_budget_mb), progress=cfg.progress)
