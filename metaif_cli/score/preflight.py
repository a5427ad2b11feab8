"""Checks ``metaif score`` makes before any expensive work or write (method §3).

Every reference a command line makes into the training pool is checked against the
loaded run: the shard count against the number of training tasks (no empty shard),
``pred_delta_lam`` references against the pool's tasks, support and query positions,
``evaluation.num_tasks`` against the meta-test pool, the intermediate checkpoints
``method=tracin`` and ``trak`` need, what the library baselines cannot do. Each failure is one line saying what to fix.
"""

from __future__ import annotations

from metaif_cli import constants as C
from metaif_cli.checks import available_memory, fits
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_torch
from metaif_cli.score.config import ScoreConfig, parse_unit_ref
from metaif_cli.score.baselines import LIBRARY_METHODS, trak_checkpoint_paths
from metaif_cli.score.ensemble import check_ensemble, is_ensemble
from metaif_cli.score.run import LoadedRun, checkpoint_paths


def check_unit_refs(refs: list[str], n: int, shots: int, queries: int, name: str = "pred_delta_lam") -> None:
    """Each ``task:K`` / ``support:K:J`` / ``query:K:J`` must name a unit of the pool."""
    for text in refs:
        _, task, role, position = parse_unit_ref(text)
        if not 0 <= task < n:
            raise MetaifError(f"{name}: {text!r} names task {task}, but the training pool has tasks 0..{n - 1}; "
                              "use a task id from the run's tasks.csv")
        size = shots if role == "support" else queries
        if role is not None and not 0 <= position < size:
            raise MetaifError(f"{name}: {text!r} names {role} position {position}, but each task has {size} {role} "
                              f"instances (positions 0..{size - 1})")


def check_inputs(run: LoadedRun, cfg: ScoreConfig, shards: int, what: str = "shards") -> None:
    """Refuse, before scoring, anything that names more than the run holds."""
    pool = run.exp.pools["train"]
    n = len(pool)
    if shards > n:
        raise MetaifError(f"{shards} {what} for {n} training tasks would leave some empty; use at most {n} "
                          f"(e.g. shard=0/{n})")
    check_unit_refs(list(cfg.pred_delta_lam), n, pool.spt_idx.shape[1], pool.qry_idx.shape[1])
    n_test = len(run.exp.pools["test"])
    if cfg.evaluation.num_tasks is not None and cfg.evaluation.num_tasks > n_test:
        raise MetaifError(f"evaluation.num_tasks={cfg.evaluation.num_tasks} exceeds the run's {n_test} meta-test "
                          f"tasks; use at most {n_test}, or null for all")
    if cfg.method in LIBRARY_METHODS:
        if cfg.evaluation.kind != "mean_loss":
            raise MetaifError(f"method={cfg.method} scores against the mean query loss only; use "
                              "evaluation.kind=mean_loss")
        if cfg.pred_delta_lam:
            raise MetaifError(f"method={cfg.method} predicts no parameter change; drop pred_delta_lam, or use "
                              "method=if or direct_if")
        if cfg.method == "trak":
            trak_checkpoint_paths(run, cfg.trak.num_checkpoints)
    if cfg.method == "trajectory":
        if cfg.pred_delta_lam:
            raise MetaifError("method=trajectory predicts no parameter change; drop pred_delta_lam, or use "
                              "method=if or direct_if")
        if cfg.evaluation.kind == "per_task":
            raise MetaifError("method=trajectory scores one evaluation function; use evaluation.kind=mean_loss "
                              "or margin")
    check_ensemble(run, cfg)
    if cfg.method == "tracin" and not checkpoint_paths(run.run_dir):
        raise MetaifError(f"method=tracin needs the intermediate checkpoints of the training run, and "
                          f"{run.run_dir / C.CHECKPOINT_DIR} holds none; retrain with optim.num_checkpoints > 0")
    if cfg.method == "trak":  # per-example projected gradients of every checkpoint, in float32
        pool = run.exp.pools["train"]
        examples = n * (pool.spt_idx.shape[1] + pool.qry_idx.shape[1] + 1)
        fits(f"trak.proj_dim={cfg.trak.proj_dim} for {examples} examples", 2.0 * examples * cfg.trak.proj_dim * 4
             * cfg.trak.num_checkpoints, available_memory(), "memory", "lower trak.proj_dim")
    if cfg.method in ("tracin", "trak", "trajectory") or is_ensemble(run, cfg):
        check_checkpoints_readable(run)


def check_checkpoints_readable(run: LoadedRun) -> None:
    """Read every intermediate checkpoint now, so a damaged one stops the command before any work."""
    for path in checkpoint_paths(run.run_dir):
        load_torch(path, f"rerun metaif train for {run.run_dir} (its checkpoint is damaged), or choose a method "
                   "that reads no checkpoints", keys=("lam",))
