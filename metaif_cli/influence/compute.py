"""Influence scores and baselines for every unit of a training pool (method §2-4).

``compute_scores`` runs one method end to end on a built problem:

- ``if``: ``s = (H + delta I)^{-1} D f`` by the configured solver (the damping chosen on
  the way, :mod:`krylov`), then one pass over the tasks (:meth:`Problem.unit_scores`);
- ``grad_sim``: ``s = D f`` (identity Hessian);
- ``direct_if``: ``if`` on the problem without adaptation (the paper's Direct-IF);
- ``tracin``: ``sum_c lr_c (1/n) D f(lam_c)^T D L(lam_c)`` over the saved checkpoints;
- ``loss``: minus the loss of the unit after adaptation (high loss = suspicious);
- ``random``: seeded uniform scores.

All scores follow one convention: negative = harmful, most negative first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from metaif_cli.errors import MetaifError
from metaif_cli.influence import krylov, solvers
from metaif_cli.influence.config import InfluenceSettings
from metaif_cli.influence.problem import Problem, UnitScores

log = logging.getLogger(__name__)


@dataclass
class ScoreOutput:
    """Scores plus what produced them: ``s``, solver report, timings."""

    scores: UnitScores
    s: Tensor | None = None
    solve: solvers.SolveResult | None = None
    curvature: "Curvature | None" = None
    eval_value: float | None = None
    train_by_test: Tensor | None = None  # [n, T] task scores per evaluation task
    inner_residual: float | None = None  # implicit mode: worst inner solve / CG relative residual
    reused_s: bool = False  # s was given (computed earlier with the same settings), not solved here
    members: list[dict] | None = None  # ensembles: each member's label, seconds, residual, damping
    spread: UnitScores | None = None  # ensembles: standard error of the mean score over the members
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # method-specific facts for score.json (library baselines)


def hessian_index(n: int, cfg: InfluenceSettings) -> Tensor:
    """Training tasks the Hessian is estimated on: all, or a seeded subsample (``hessian.num_tasks``)."""
    m = cfg.hessian.num_tasks
    if m is None or m >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.sort(torch.randperm(n, generator=gen)[:m]).values


def make_hvp(problem: Problem, theta: Tensor, cfg: InfluenceSettings, index: Tensor) -> tuple[Callable, Callable, float | None]:
    """The undamped total-Hessian product, its sub-sampled version (LiSSA) and Gamma."""
    form = cfg.hessian.form if cfg.hessian.form in ("exact", "gauss_newton") else "no_third_order"
    gamma = None
    if cfg.hessian.form == "gamma":
        gamma = cfg.hessian.gamma_scale * problem.gamma(theta, index)

    def hvp(vec: Tensor) -> Tensor:
        out = problem.hvp(theta, vec, index, form)
        return out + gamma * vec if gamma is not None else out

    def hvp_subset(vec: Tensor, gen: torch.Generator) -> Tensor:
        pick = index[torch.randperm(len(index), generator=gen)[: cfg.solver.lissa_tasks]]
        out = problem.hvp(theta, vec, pick, form)
        return out + gamma * vec if gamma is not None else out

    return hvp, hvp_subset, gamma


def damping_rule(cfg: InfluenceSettings) -> krylov.DampingRule | None:
    """``hessian.form=gauss_newton`` (positive semi-definite): ``delta = damping * lambda_max``
    (``damping`` itself when the estimate is not positive); other forms: :func:`krylov.damping_from`."""
    if not cfg.hessian.relative_damping:
        return None
    frac = cfg.hessian.base_damping()
    return lambda lo, hi: frac * hi if hi > 0 else frac


@dataclass
class Curvature:
    """What was learnt about ``H``: Lanczos extremes, the damping used, Gamma."""

    damping: float
    eigenvalue_min: float | None = None
    eigenvalue_max: float | None = None
    gamma: float | None = None


def choose_damping(problem: Problem, theta: Tensor, cfg: InfluenceSettings, start: Tensor | None = None) -> Curvature:
    """The damping ``delta``: configured, or raised above ``-lambda_min`` when ``auto_damping``.

    The spectrum is estimated by ``hessian.damping_iters()`` Lanczos steps started at the
    evaluation gradient ``D f`` (``start`` when the caller has it): then the damping equals
    the one :func:`solve_ihvp` chooses on its way to ``s`` (:mod:`krylov`), so predicted
    parameter changes and scores share one ``H + delta I``.
    """
    index = hessian_index(problem.n, cfg)
    hvp, _, gamma = make_hvp(problem, theta, cfg, index)
    if not cfg.hessian.auto_damping:
        return Curvature(cfg.hessian.base_damping(), gamma=gamma)
    if start is None:
        start = problem.eval_mean_grad(theta)[1]
    damping, lo, hi = krylov.estimate_damping(hvp, start, cfg.hessian.base_damping(), cfg.hessian.damping_factor,
                                              cfg.hessian.damping_iters(), damping_rule(cfg))
    log.info("total Hessian eigenvalues in about [%.3g, %.3g]; damping %.3g", lo, hi, damping)
    return Curvature(damping, lo, hi, gamma)


def solve_ihvp(problem: Problem, theta: Tensor, b: Tensor, cfg: InfluenceSettings,
               curvature: Curvature | None = None) -> tuple[solvers.SolveResult, Curvature]:
    """``(H + delta I)^{-1} b`` with the configured Hessian form and solver; refuses an unconverged solve.

    Without a given ``curvature``, ``b`` is taken as the Lanczos start of
    :func:`choose_damping`. With ``auto_damping`` and ``cg`` the damping is then chosen
    inside the solve from the same Hessian products (:func:`krylov.solve_auto_damped`);
    the other solvers estimate it first. With a given ``curvature`` and ``cg``, a breakdown
    under ``auto_damping`` (negative curvature the Lanczos estimate missed: Ritz values lie
    inside the spectrum) doubles the damping and retries, up to three times.
    """
    index = hessian_index(problem.n, cfg)
    hvp, hvp_subset, gamma = make_hvp(problem, theta, cfg, index)
    sc = cfg.solver
    if curvature is None and cfg.hessian.auto_damping and sc.name == "cg":
        auto = krylov.solve_auto_damped(hvp, b, cfg.hessian.base_damping(), cfg.hessian.damping_factor,
                                        cfg.hessian.damping_iters(), sc.max_iter, sc.tol, progress=cfg.progress,
                                        rule=damping_rule(cfg))
        result = auto.result
        curvature = Curvature(auto.damping, auto.eigenvalue_min, auto.eigenvalue_max, gamma)
        log.info("total Hessian eigenvalues in about [%.3g, %.3g]; damping %.3g", auto.eigenvalue_min,
                 auto.eigenvalue_max, auto.damping)
    else:
        curvature = curvature or choose_damping(problem, theta, cfg, b)

        def run(damping: float) -> solvers.SolveResult:
            return solvers.solve(sc, hvp, b, damping, hvp_subset=hvp_subset,
                                 generator=torch.Generator().manual_seed(cfg.seed), progress=cfg.progress)

        result = run(curvature.damping)
        retries = 3 if cfg.hessian.auto_damping and sc.name == "cg" else 0
        while not result.converged and retries > 0 and result.iterations < sc.max_iter:
            retries -= 1
            curvature = Curvature(2 * curvature.damping, curvature.eigenvalue_min, curvature.eigenvalue_max,
                                  curvature.gamma)
            log.warning("CG met negative curvature; retrying with damping %.3g", curvature.damping)
            result = run(curvature.damping)
    if not sc.allow_unconverged:
        solvers.check_converged(result, sc.tol)
    elif float(b.to(torch.float64).norm()) > 0:
        solvers.check_usable(result)  # a loose solve is allowed, one no better than s = 0 never
    if sc.allow_unconverged and not result.converged:
        log.warning("iHVP solver %s did not converge (relative residual %.3g); using it anyway", sc.name,
                    result.residual)
    return result, curvature


@dataclass
class Solved:
    """``s = (H + delta I)^{-1} D f`` with the solve that produced it (reusable across shards)."""

    s: Tensor
    result: solvers.SolveResult
    curvature: Curvature


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise MetaifError(f"{name} contains NaN or inf: the trained model or data is broken; check the training "
                          "run's metrics.csv, or score in dtype=float64")


def influence(problem: Problem, theta: Tensor, cfg: InfluenceSettings, use_solver: bool = True,
              index: Tensor | None = None, solved: "Solved | None" = None,
              on_solved: Callable[["Solved"], None] | None = None) -> ScoreOutput:
    """``if``/``direct_if`` (``use_solver``) or ``grad_sim``: one ``s``, one pass over the tasks.

    ``index`` restricts the pass to some training tasks (a shard); ``s`` always uses all of them.
    ``solved``: ``s`` computed earlier with the same settings (another shard, an earlier run):
    the solve is skipped. ``on_solved`` receives a freshly computed ``s`` before the unit pass
    (the caller stores it for the other shards).
    """
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if cfg.evaluation.kind == "per_task":  # one s per evaluation task: the [T, P] gradients are needed
        values, grads = problem.eval_grad(theta)  # [T], [T, P]
        value, b = values.mean(), grads.mean(0)
    else:  # accumulated over chunks of evaluation tasks: never [T, P]
        value, b = problem.eval_mean_grad(theta)
    _check_finite("the evaluation gradient D f", b)
    times["eval_grad"] = time.perf_counter() - t0
    result, curvature, train_by_test = None, None, None
    t0 = time.perf_counter()
    if use_solver and solved is not None:
        result, curvature, s = solved.result, solved.curvature, solved.s.to(b)
        log.info("reusing s = (H + delta I)^-1 D f computed earlier with the same settings")
    elif use_solver:
        result, curvature = solve_ihvp(problem, theta, b, cfg)
        s = result.x
        if on_solved is not None:
            on_solved(Solved(s, result, curvature))
    else:
        s = b
    times["solve"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = problem.unit_scores(theta, s, index)
    times["score_units"] = time.perf_counter() - t0
    if cfg.evaluation.kind == "per_task":
        t0 = time.perf_counter()
        cols = []
        for g in grads:
            st = solve_ihvp(problem, theta, g, cfg, curvature)[0].x if use_solver else g
            cols.append(problem.unit_scores(theta, st, index).task)
        train_by_test = torch.stack(cols, 1)  # [n, T]
        times["per_task"] = time.perf_counter() - t0
    _check_finite("the scores", scores.task)
    return ScoreOutput(scores, s=s, solve=result, curvature=curvature, eval_value=float(value),
                       train_by_test=train_by_test, seconds=times, reused_s=use_solver and solved is not None)


def tracin(make_problem: Callable[[], Problem], checkpoints: list[tuple[Tensor, float]],
           index: Tensor | None = None) -> ScoreOutput:
    """TracIn over checkpoints ``(theta_c, lr_c)``: ``sum_c lr_c s_c^T d_w grad F`` with ``s_c = D f(theta_c)``."""
    t0 = time.perf_counter()
    total: UnitScores | None = None
    for theta, lr in checkpoints:
        problem = make_problem()
        s = problem.eval_mean_grad(theta)[1] * lr
        sc = problem.unit_scores(theta, s, index)
        total = sc if total is None else UnitScores(total.task + sc.task, total.query + sc.query,
                                                    total.support + sc.support)
    if total is None:
        raise MetaifError("method=tracin needs the intermediate checkpoints of the training run; retrain with "
                          "optim.num_checkpoints > 0")
    return ScoreOutput(total, seconds={"tracin": time.perf_counter() - t0})


def loss_baseline(problem: Problem, theta: Tensor) -> ScoreOutput:
    """Minus the loss of each unit after adaptation: high loss ranks as most harmful."""
    from metaif_cli.influence.outer import instance_values

    t0 = time.perf_counter()
    learner, spec = problem.learner, problem.spec

    def one(th, x_spt, y_spt, u, x_qry, y_qry, v):
        phi = learner.adapt(spec.unflatten(th), x_spt, y_spt, u)
        return (instance_values(learner, phi, x_qry, y_qry).detach(),
                instance_values(learner, phi, x_spt, y_spt).detach())

    query, support = problem.map_tasks(one, problem.train, theta)
    task = (problem.train.v * query).sum(1) / query.shape[1]
    return ScoreOutput(UnitScores(-task, -query, -support), seconds={"loss": time.perf_counter() - t0})


def random_baseline(n: int, s: int, q: int, seed: int) -> ScoreOutput:
    """Seeded uniform scores in ``[-1, 0)``."""
    gen = torch.Generator().manual_seed(seed)
    return ScoreOutput(UnitScores(-torch.rand(n, generator=gen, dtype=torch.float64),
                                  -torch.rand(n, q, generator=gen, dtype=torch.float64),
                                  -torch.rand(n, s, generator=gen, dtype=torch.float64)))
