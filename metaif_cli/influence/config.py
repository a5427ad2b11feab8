"""Typed configuration of the influence computation: the total Hessian, the iHVP solver and the
evaluation function (method §1-3).

:class:`InfluenceSettings` is what :mod:`metaif_cli.influence.compute` reads: any object with
these attributes (``metaif score``'s :class:`~metaif_cli.score.config.ScoreConfig` is one), so
the core never depends on a command's root config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from metaif_cli.checks import choice, in_range, integer, positive
from metaif_cli.errors import MetaifError
from metaif_cli.influence.solvers import SOLVERS

HESSIAN_FORMS = ("exact", "no_third_order", "gamma", "gauss_newton")
EVALUATIONS = ("mean_loss", "per_task", "margin")


@dataclass
class HessianConfig:
    """The total Hessian ``H`` (method §2): form, damping ``delta``, Gamma scale ``c``.

    ``form``: ``gauss_newton`` (the default, chosen by the LDS benchmark: docs/results.md "Fidelity"),
    ``exact`` (the paper's total Hessian, third-order terms included), ``no_third_order`` or
    ``gamma`` (the paper's positive-definite variant).

    ``num_tasks``: estimate ``H`` on a seeded subsample of training tasks (null = all; the
    default 128 keeps one Hessian product cheap on large pools and is exact on small ones).
    ``auto_damping``: meta-training rarely ends at a minimum and ``H`` is often indefinite;
    when true, the extreme eigenvalues are estimated by ``lanczos_iters`` Lanczos steps and
    the damping raised to ``damping + damping_factor * max(0, -lambda_min)`` so ``H + delta I``
    is positive definite (the value used is reported in ``score.json``). ``damping_factor``
    2 (not just above 1) keeps the inverse from amplifying the most negative directions
    most: on an undertrained Omniglot model (lambda_min -37) 1.1 detected corrupted tasks
    with ROC AUC 0.63, 2 with 0.81, 4 with 0.84 (MNIST: 1.0 for all three).

    ``damping`` unset (null) is the form's default (:meth:`base_damping`): 0.1 of ``lambda_max``
    for ``gauss_newton`` with ``auto_damping``, 0.01 otherwise. ``lanczos_iters`` unset (null)
    is the form's default too (:meth:`damping_iters`): 8 for ``gauss_newton`` with
    ``auto_damping`` (only ``lambda_max`` is needed, and Lanczos finds it first), 20 otherwise
    (``lambda_min`` of an indefinite ``H`` needs more steps).

    ``form=gauss_newton`` is positive semi-definite, so with ``auto_damping`` there is no
    ``lambda_min`` to clear: the damping is relative, ``delta = damping * lambda_max(G)``, with
    ``lambda_max`` the largest Ritz value of the same ``lanczos_iters`` Lanczos steps (the
    extreme eigenvalue Lanczos finds first, at no extra product with ``cg``). It bounds the
    condition number of ``G + delta I`` by ``(1 + damping) / damping`` whatever the scale of
    ``G`` (the mean diagonal would need extra random probes and bounds nothing).
    """

    form: str = "gauss_newton"
    damping: Optional[float] = None
    auto_damping: bool = True
    damping_factor: float = 2.0
    lanczos_iters: Optional[int] = None
    gamma_scale: float = 1.0
    num_tasks: Optional[int] = 128

    def __post_init__(self) -> None:
        choice("hessian.form", self.form, HESSIAN_FORMS)
        if self.damping is not None:
            positive("hessian.damping", self.damping, allow_zero=True)
        if not (isinstance(self.damping_factor, (int, float)) and 1 < self.damping_factor < float("inf")):
            raise MetaifError(f"hessian.damping_factor={self.damping_factor} must be a finite number > 1 so that "
                              "H + delta I is positive definite; use 2")
        positive("hessian.gamma_scale", self.gamma_scale, allow_zero=True)
        if self.lanczos_iters is not None:
            integer("hessian.lanczos_iters", self.lanczos_iters, minimum=1)
        if self.num_tasks is not None:
            integer("hessian.num_tasks", self.num_tasks, minimum=1)

    @property
    def relative_damping(self) -> bool:
        """Whether the damping is a fraction of ``lambda_max`` (``gauss_newton`` with ``auto_damping``)."""
        return self.form == "gauss_newton" and self.auto_damping

    def base_damping(self) -> float:
        """``damping``, or when unset the form's default: ``gauss_newton`` with ``auto_damping`` 0.1
        (a fraction of ``lambda_max``: as accurate by the LDS benchmark as 0.01 on three datasets,
        with a condition number of at most 11 instead of 101, so CG needs far fewer products;
        docs/results.md "Fidelity"), every other case 0.01 (an absolute damping)."""
        if self.damping is not None:
            return self.damping
        return 0.1 if self.relative_damping else 0.01

    def damping_iters(self) -> int:
        """``lanczos_iters``, or when unset the form's default: the Lanczos steps whose Ritz values
        choose the damping (the solve goes on to ``solver.tol`` from the same basis, so it may take
        more). ``gauss_newton`` with ``auto_damping``: 8, as the damping needs ``lambda_max`` only;
        on the ``omniglot_cpu`` run and on digits, 8 steps give the same damping as 20 to 6-8
        significant digits and task scores with Spearman 1.0000 against 20 steps, for 0.4 of the
        solve's time (``scripts/bench_score.py``, docs/results.md "Speed"). Every other case: 20 (the most
        negative eigenvalue of an indefinite ``H`` is found later)."""
        if self.lanczos_iters is not None:
            return self.lanczos_iters
        return 8 if self.relative_damping else 20


@dataclass
class SolverConfig:
    """The iHVP solver (method §2) and its settings."""

    name: str = "cg"
    max_iter: int = 100
    tol: float = 1e-4
    terms: int = 100
    power_iters: int = 20
    depth: int = 100
    repeats: int = 1
    lissa_tasks: int = 8
    allow_unconverged: bool = False

    def __post_init__(self) -> None:
        choice("solver.name", self.name, tuple(SOLVERS))
        for key in ("max_iter", "terms", "power_iters", "depth", "repeats", "lissa_tasks"):
            integer(f"solver.{key}", getattr(self, key), minimum=1)
        in_range("solver.tol", self.tol, 0.0, 1.0, low_open=True)  # 1: accept any usable solve (loose LiSSA)


@dataclass
class EvaluationConfig:
    """The evaluation function ``f`` (method §1): on how many meta-test tasks, and which form.

    ``mean_loss``: mean query loss after adaptation; ``per_task``: also a train x test
    score matrix; ``margin``: mean of (largest wrong logit - true logit), an accuracy surrogate.
    """

    kind: str = "mean_loss"
    num_tasks: Optional[int] = None

    def __post_init__(self) -> None:
        choice("evaluation.kind", self.kind, EVALUATIONS)
        if self.num_tasks is not None:
            integer("evaluation.num_tasks", self.num_tasks, minimum=1)


class InfluenceSettings(Protocol):
    """The settings the influence computation reads (method §2-3)."""

    hessian: HessianConfig
    solver: SolverConfig
    evaluation: EvaluationConfig
    seed: int
    progress: bool
