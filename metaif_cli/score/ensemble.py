"""Ensembles of scores (issue 10; method §3): the mean of one method's scores over members.

- ``ensemble.checkpoints=K``: the final parameters and the last ``K - 1`` intermediate
  checkpoints saved before them, each scored at its own ``lam`` (its own ``s``, damping and
  solve); unset (the default), ``method=if`` uses up to ``DEFAULT_IF_CHECKPOINTS`` points, as
  many as the run kept, and every other method the final point alone;
- ``runs=[<run>, ...]``: further runs of the same task pool (same units, same weights; e.g.
  other ``model.init_seed`` or ``optim.batch_seed``), averaged with ``run=``. A run whose pool differs is
  refused: scores of different units cannot be averaged.

Both combine (every run x its last ``K`` points). The ensemble's cost is the sum of its members'
(``score.json``: ``ensemble.members`` with each member's seconds, solver residual and damping).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.io import resolved_path
from metaif_cli.influence import compute
from metaif_cli.influence.problem import UnitScores
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.run import LoadedRun, checkpoint_paths, checkpoint_step, load_checkpoint, load_run

log = logging.getLogger(__name__)


DEFAULT_IF_CHECKPOINTS = 5  # chosen by the LDS benchmark (scripts/bench_fidelity.py, docs/results.md "Fidelity")


def ensemble_checkpoints(cfg: ScoreConfig) -> tuple[int, bool]:
    """Points per run to average, and whether that many are required (``False``: up to that many)."""
    if cfg.ensemble.checkpoints is not None:
        return cfg.ensemble.checkpoints, True
    return (DEFAULT_IF_CHECKPOINTS, False) if cfg.method == "if" else (1, True)


def is_ensemble(run: LoadedRun, cfg: ScoreConfig) -> bool:
    """Whether ``cfg`` averages over more than the final point of ``run``."""
    k, required = ensemble_checkpoints(cfg)
    if cfg.runs or (k > 1 and required):
        return True
    return k > 1 and bool(earlier_checkpoints(run))


def earlier_checkpoints(run: LoadedRun) -> list[Path]:
    """The checkpoints ``run`` saved before its final step, oldest first."""
    return [p for p in checkpoint_paths(run.run_dir) if checkpoint_step(p) < run.train_cfg.optim.steps]


def _require_checkpoints(run: LoadedRun, k: int, kept: int) -> None:
    """MetaifError (one line) when ``k`` points need more than the ``kept`` earlier checkpoints."""
    if kept < k - 1:
        raise MetaifError(f"ensemble.checkpoints={k} needs {k - 1} checkpoints saved before the final step in "
                          f"{run.run_dir}, which has {kept}; retrain with optim.num_checkpoints>={k} or "
                          "lower ensemble.checkpoints")


def check_ensemble(run: LoadedRun, cfg: ScoreConfig) -> None:
    """Refuse, before any work, an ensemble the run cannot give: more checkpoints than it kept, a
    checkpoint ensemble of a method that follows the checkpoints already, or a missing run."""
    k, required = ensemble_checkpoints(cfg)
    if cfg.method in ("tracin", "trajectory") and k > 1:
        raise MetaifError(f"method={cfg.method} already follows the training run through its saved checkpoints; "
                          "use ensemble.checkpoints=1")
    if required and k > 1:
        _require_checkpoints(run, k, len(earlier_checkpoints(run)))
    for path in cfg.runs:
        if not (Path(resolved_path(path)) / C.MODEL_PT).is_file():
            raise MetaifError(f"runs: {path} is not a finished metaif train run (no {C.MODEL_PT}); list the "
                              "directories of finished runs")


def checkpoint_members(run: LoadedRun, k: int, required: bool = True) -> list[tuple[str, LoadedRun]]:
    """The final point and the last ``k - 1`` checkpoints saved before it, newest first.

    ``required=False``: as many of them as the run kept (the default ensemble of ``method=if``).
    Raises MetaifError when ``required`` and the run kept fewer.
    """
    earlier = earlier_checkpoints(run)
    if not required:
        k = min(k, len(earlier) + 1)
    _require_checkpoints(run, k, len(earlier))
    members = [(f"{run.run_dir.name}@final", run)]
    for path in reversed(earlier[len(earlier) - (k - 1):] if k > 1 else []):  # only the checkpoints used are read
        state = load_checkpoint(path, f"rerun metaif train for {run.run_dir} (its checkpoint is damaged)")
        lam = {name: t.to(run.exp.device, run.exp.dtype) for name, t in state["lam"].items()}
        members.append((f"{run.run_dir.name}@step_{int(state['step'])}", replace(run, lam=lam)))
    return members


def check_same_pool(ref: LoadedRun, other: LoadedRun) -> None:
    """Refuse (one line) a run whose training pool or weights differ from ``ref``'s."""
    a, b = ref.exp.pools["train"], other.exp.pools["train"]
    same = (ref.train_cfg.dataset.name == other.train_cfg.dataset.name
            and all(getattr(a, f).shape == getattr(b, f).shape and torch.equal(getattr(a, f), getattr(b, f))
                    for f in ("spt_idx", "y_spt", "qry_idx", "y_qry"))
            and set(ref.weights) == set(other.weights)
            and all(torch.equal(ref.weights[k], other.weights[k]) for k in ref.weights))
    if not same:
        raise MetaifError(f"runs: {other.run_dir} was trained on another task pool (or other weights) than "
                          f"{ref.run_dir}; an ensemble averages the scores of the same units, so train every "
                          "member on the same pool (same dataset settings and seed; vary model.init_seed or optim.batch_seed)")


def run_ensemble(run: LoadedRun, cfg: ScoreConfig, index: torch.Tensor | None, rank: int, world: int,
                 single) -> compute.ScoreOutput:
    """Mean of ``single(member_run, cfg, index, rank, world)`` over the members."""
    check_ensemble(run, cfg)
    k, required = ensemble_checkpoints(cfg)
    runs = [run]
    for path in cfg.runs:
        if Path(resolved_path(path)) in {r.run_dir.resolve() for r in runs}:
            raise MetaifError(f"runs: {path} is listed twice (run= is a member already)")
        other = load_run(path, cfg.device, cfg.dtype, data=cfg.data, factory=cfg.factory)
        check_same_pool(run, other)
        runs.append(other)
    members = [m for r in runs for m in checkpoint_members(r, k, required)]
    scored: list[UnitScores] = []
    seconds: dict[str, float] = {}
    report = []
    for label, member in members:
        t0 = time.perf_counter()
        out = single(member, cfg, index, rank, world)
        wall = time.perf_counter() - t0
        scored.append(out.scores)
        for stage, value in out.seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + value
        report.append({"member": label, "seconds": wall,
                       "relative_residual": None if out.solve is None else out.solve.residual,
                       "damping": None if out.curvature is None else out.curvature.damping,
                       "eval_value": out.eval_value})
        log.info("ensemble member %s scored in %.1f s", label, wall)
    mean, spread = mean_and_standard_error(scored)
    return compute.ScoreOutput(mean, seconds=seconds, members=report, spread=spread)


def mean_and_standard_error(scored: list[UnitScores]) -> tuple[UnitScores, UnitScores | None]:
    """Mean of the members' scores and its standard error ``sd / sqrt(m)`` (None for one member)."""
    fields = ("task", "query", "support")
    stacked = {f: torch.stack([getattr(s, f) for s in scored]) for f in fields}  # [m, ...]
    mean = UnitScores(*(stacked[f].mean(0) for f in fields))
    if len(scored) < 2:
        return mean, None
    return mean, UnitScores(*(stacked[f].std(0) / len(scored) ** 0.5 for f in fields))
