"""Method dispatch of ``metaif score``: build the bilevel problem of a loaded run and compute
one method's scores or predicted parameter changes (method §3-4).

``if``, ``direct_if``, ``grad_sim``, ``tracin``, ``loss`` and ``random`` all go through
:func:`run_method`; ``pred_delta_lam`` gives ``(H + delta I)^{-1} d_{w_e} grad F`` per unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from metaif_cli.errors import MetaifError
from metaif_cli.influence import compute
from metaif_cli.influence.implicit import ImplicitProblem
from metaif_cli.influence.problem import Problem, UnrolledProblem
from metaif_cli.meta.params import FlatSpec
from metaif_cli.score.baselines import LIBRARY_METHODS, run_library_baseline
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.run import LoadedRun, task_chunk, tracin_checkpoints
from metaif_cli.score.trajectory import score_trajectory


def derivative_mode(run: LoadedRun, cfg: ScoreConfig) -> str:
    """``unrolled`` for MAML/ANIL, ``implicit`` for iMAML; a mismatching request is refused."""
    natural = run.train_cfg.meta.mode
    if cfg.derivative not in ("auto", natural):
        raise MetaifError(f"derivative={cfg.derivative} does not apply to meta={run.train_cfg.meta.name}; "
                          f"use derivative={natural} (or auto)")
    return natural


def build_problem(run: LoadedRun, cfg: ScoreConfig, direct: bool = False) -> Problem:
    """The problem over the training pool (with the run's weights) and the evaluation tasks."""
    exp = run.exp
    train = exp.tasks("train", weights=run.weights)  # gathered per chunk: the pool's images stay compact
    test_pool = exp.pools["test"]
    m = cfg.evaluation.num_tasks or len(test_pool)
    test = exp.tasks("test", torch.arange(min(m, len(test_pool))))
    kwargs = dict(n=len(train), delta_reg=run.train_cfg.optim.delta_reg, eval_kind=cfg.evaluation.kind,
                  chunk=task_chunk(run, cfg.chunk, cfg.chunk_budget_mb), support=cfg.unit != "task")
    spec = FlatSpec.of(run.lam)
    if direct:
        return UnrolledProblem(exp.learner, spec, train, test, steps=0, **kwargs)
    if derivative_mode(run, cfg) == "implicit":
        return ImplicitProblem(exp.learner, spec, train, test, inner_tol=cfg.inner_tol,
                               inner_max_iter=cfg.inner_max_iter, cg_tol=cfg.inner_tol,
                               support_third_order=cfg.support_third_order, inner_solver=cfg.inner_solver,
                               **kwargs)
    return UnrolledProblem(exp.learner, spec, train, test, **kwargs)


def run_method(run: LoadedRun, cfg: ScoreConfig, index: torch.Tensor | None = None, rank: int = 0,
               world: int = 1, work_dir: Path | None = None, solved: compute.Solved | None = None,
               on_solved: Callable[[compute.Solved], None] | None = None) -> compute.ScoreOutput:
    """Compute the scores of ``cfg.method`` for the training tasks ``index`` (default all).

    ``rank``/``world``: this process under torchrun (Hessian products are summed over processes).
    ``work_dir``: where ``ekfac_if`` keeps kronfluence's factors for reuse (the score directory).
    ``solved``/``on_solved``: a stored ``s`` to reuse, and where to store a new one
    (:func:`metaif_cli.influence.compute.influence`).
    With an ensemble (``ensemble.checkpoints``, by default up to 5 points for ``method=if``, or
    ``runs``): the mean over the members (:mod:`ensemble`;
    library baselines then keep their factors in a temporary folder per member).
    """
    from metaif_cli.score import ensemble

    if ensemble.is_ensemble(run, cfg):  # each member solves its own s: ihvp.pt is not reused
        return ensemble.run_ensemble(run, cfg, index, rank, world, run_single)
    return run_single(run, cfg, index, rank, world, work_dir, solved=solved, on_solved=on_solved)


def run_single(run: LoadedRun, cfg: ScoreConfig, index: torch.Tensor | None = None, rank: int = 0,
               world: int = 1, work_dir: Path | None = None, solved: compute.Solved | None = None,
               on_solved: Callable[[compute.Solved], None] | None = None) -> compute.ScoreOutput:
    """:func:`run_method` at the run's ``lam`` alone."""
    theta = FlatSpec.of(run.lam).flatten(run.lam)
    pool = run.exp.pools["train"]
    if cfg.method in LIBRARY_METHODS:
        return _select(run_library_baseline(run, cfg, work_dir), index)
    if cfg.method == "random":
        out = compute.random_baseline(len(pool), pool.spt_idx.shape[1], pool.qry_idx.shape[1], cfg.seed)
        return _select(out, index)

    def make(direct: bool = False) -> Problem:
        problem = build_problem(run, cfg, direct=direct)
        problem.rank, problem.world = rank, world
        problem.progress = cfg.progress
        return problem

    if cfg.method == "tracin":
        return compute.tracin(make, tracin_checkpoints(run), index)
    if cfg.method == "trajectory":
        return _select(score_trajectory(run, cfg, make()), index)
    problem = make(direct=cfg.method == "direct_if")
    if cfg.method == "loss":
        return _select(compute.loss_baseline(problem, theta), index)
    out = compute.influence(problem, theta, cfg, use_solver=cfg.method != "grad_sim", index=index, solved=solved,
                            on_solved=on_solved)
    if isinstance(problem, ImplicitProblem):
        out.inner_residual = problem.max_residual
    return out


def _select(out: compute.ScoreOutput, index: torch.Tensor | None) -> compute.ScoreOutput:
    if index is not None:
        sc = out.scores
        out.scores = type(sc)(sc.task[index], sc.query[index], sc.support[index])
    return out


def pred_delta_lam(run: LoadedRun, cfg: ScoreConfig, units: list[tuple[str, int, str | None, int | None]]) -> dict:
    """``(H + delta I)^{-1} d_{w_e} grad F`` for each requested unit, and for their sum (model editing)."""
    if cfg.method in LIBRARY_METHODS + ("trajectory",):
        raise MetaifError(f"method={cfg.method} predicts no parameter change; drop pred_delta_lam (or use "
                          "update=retrain), or use method=if or direct_if")
    problem = build_problem(run, cfg, direct=cfg.method == "direct_if")
    theta = FlatSpec.of(run.lam).flatten(run.lam)
    curvature = compute.choose_damping(problem, theta, cfg)
    out, total = {}, None
    for _, task, role, position in units:
        g = problem.weight_gradient(theta, task, role, position)
        total = g if total is None else total + g
        key = f"task:{task}" if role is None else f"{role}:{task}:{position}"
        out[key] = compute.solve_ihvp(problem, theta, g, cfg, curvature)[0].x.detach().cpu()
    if total is not None:
        out["sum"] = compute.solve_ihvp(problem, theta, total, cfg, curvature)[0].x.detach().cpu()
    return out
