"""Lanczos on the total Hessian: its extreme eigenvalues and the damped solve from one
Krylov basis (method §2, ``hessian.auto_damping`` with ``solver.name=cg``).

``H`` may be indefinite, so the damping is raised above ``-lambda_min``. Lanczos started
at ``b`` gives both at once. Its tridiagonal ``T_k = Q_k^T H Q_k`` has Ritz values that
approach the extreme eigenvalues from inside the spectrum, and

    x_k = ||b|| Q_k (T_k + delta I)^{-1} e_1

is the conjugate-gradient iterate for ``(H + delta I) x = b`` (CG is Lanczos with an
implicit factorisation of ``T_k``; the shift ``delta`` leaves the Krylov space unchanged),
with residual ``beta_k |e_k^T y_k|``. So the damping chosen from the first
``damping_iters`` steps and the solve share every Hessian product, where estimating the
spectrum first and then running CG would pay for both. The basis is kept in float64 with
full reorthogonalisation (``k <= max_iter`` vectors of size ``P``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from metaif_cli.influence.operators import Hvp, SolveResult, damped, relative_residual
from metaif_cli.progress import bar as progress_bar
from metaif_cli.progress import finish

log = logging.getLogger(__name__)


class Lanczos:
    """The Lanczos process for symmetric ``H`` from the start vector ``b`` (float64 basis)."""

    def __init__(self, hvp: Hvp, b: torch.Tensor) -> None:
        self.hvp, self.dtype = hvp, b.dtype
        b64 = b.to(torch.float64)
        self.b_norm = float(b64.norm())
        self.basis = (b64 / self.b_norm).unsqueeze(0)  # [k, P]
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
        self.exhausted = False  # an invariant subspace was found: the solve is exact there

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def step(self) -> None:
        """One Hessian product: extend ``T`` by one row and the basis by one vector."""
        q = self.basis[-1]
        w = self.hvp(q.to(self.dtype)).to(torch.float64)
        alpha = float(w @ q)
        for _ in range(2):  # full reorthogonalisation; twice is enough in floating point
            w = w - self.basis.T @ (self.basis @ w)
        beta = float(w.norm())
        self.alphas.append(alpha)
        self.betas.append(beta)
        if not (math.isfinite(alpha) and math.isfinite(beta)) or beta <= 1e-12 * max(1.0, abs(alpha)):
            self.exhausted = True
            return
        self.basis = torch.cat([self.basis, (w / beta).unsqueeze(0)])

    def tridiagonal(self) -> torch.Tensor:
        """``T_k``, ``[k, k]``."""
        k = self.steps
        tri = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if k > 1:
            off = torch.tensor(self.betas[: k - 1], dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        return tri

    def extremes(self) -> tuple[float, float]:
        """Smallest and largest Ritz values (inside the spectrum of ``H``); NaN for a NaN product."""
        tri = self.tridiagonal()
        if not torch.isfinite(tri).all():
            return math.nan, math.nan
        ritz = torch.linalg.eigvalsh(tri)
        return float(ritz[0]), float(ritz[-1])

    def solve(self, damping: float) -> tuple[torch.Tensor, float]:
        """``x_k`` and its estimated relative residual."""
        k = self.steps
        a = self.tridiagonal() + damping * torch.eye(k, dtype=torch.float64)
        if not torch.isfinite(a).all():
            return torch.full_like(self.basis[0], math.nan).to(self.dtype), math.inf
        rhs = torch.zeros(k, dtype=torch.float64)
        rhs[0] = self.b_norm
        y = torch.linalg.solve(a, rhs)
        estimate = 0.0 if self.exhausted else self.betas[k - 1] * abs(float(y[-1])) / self.b_norm
        x = (self.basis[:k].T @ y).to(self.dtype)
        return x, estimate


def damping_from(lo: float, base: float, factor: float) -> float:
    """``delta = base + factor * max(0, -lambda_min)``: ``H + delta I`` positive definite for ``factor > 1``.

    A factor near 1 leaves the most negative direction with the smallest damped eigenvalue,
    so ``(H + delta I)^{-1}`` would amplify the least trustworthy curvature most.
    """
    return base + factor * max(0.0, -lo)


DampingRule = Callable[[float, float], float]  # (lambda_min, lambda_max) -> delta


def estimate_damping(hvp: Hvp, b: torch.Tensor, base: float, factor: float, damping_iters: int,
                     rule: Optional[DampingRule] = None) -> tuple[float, float, float]:
    """``(delta, lambda_min, lambda_max)`` from ``damping_iters`` Lanczos steps started at ``b``.

    The same numbers :func:`solve_auto_damped` chooses, without its solve. ``rule``: how the
    damping follows from the Ritz extremes (default :func:`damping_from`).
    """
    rule = rule or (lambda lo, hi: damping_from(lo, base, factor))
    process = Lanczos(hvp, b)
    while process.steps < min(damping_iters, b.numel()) and not process.exhausted:
        process.step()
    lo, hi = process.extremes()
    return rule(lo, hi), lo, hi


@dataclass
class AutoDampedSolve:
    """A solve with its damping chosen on the way, and the spectrum estimate behind it."""

    result: SolveResult
    damping: float
    eigenvalue_min: float
    eigenvalue_max: float


def solve_auto_damped(hvp: Hvp, b: torch.Tensor, base: float, factor: float, damping_iters: int, max_iter: int,
                      tol: float, progress: bool = False, rule: Optional[DampingRule] = None) -> AutoDampedSolve:
    """``(H + delta I)^{-1} b`` with ``delta`` chosen from the first ``damping_iters`` steps.

    After ``damping_iters`` steps the damping is fixed to :func:`damping_from` of the
    smallest Ritz value; the iteration then goes on until the estimated residual reaches
    ``tol``. If later steps reveal more negative curvature (``T_k + delta I`` not positive
    definite), the damping is chosen again by the same rule from all of ``T_k``, with no
    further products (logged). The reported residual is the true one (one more product); when
    it lies above ``tol`` while the estimate did not (the estimate drifts in finite precision),
    the iteration goes on to a tighter estimate, up to ``max_iter`` steps.
    ``rule`` replaces :func:`damping_from` (``hessian.form=gauss_newton``: relative to ``lambda_max``).
    """
    rule = rule or (lambda lo_, hi_: damping_from(lo_, base, factor))
    if float(b.to(torch.float64).norm()) == 0:
        return AutoDampedSolve(SolveResult(torch.zeros_like(b), 0, 0.0, True, "cg"), base, 0.0, 0.0)
    process = Lanczos(hvp, b)
    limit = min(max(max_iter, damping_iters), b.numel())
    choose = min(damping_iters, limit)  # steps that choose the damping
    bar = progress_bar(total=limit, desc="iHVP lanczos-cg", enabled=progress, leave=False)
    damping, lo, hi = base, 0.0, 0.0
    x = torch.zeros_like(b)  # the loop always solves at least once (at step ``choose`` or on exhaustion)
    target = tol  # for the estimated residual; tightened when the true one is found above tol
    while True:
        while process.steps < limit and not process.exhausted:
            process.step()
            bar.update(1)
            if process.steps <= choose:
                lo, hi = process.extremes()
                damping = rule(lo, hi)
                if process.steps < choose and not process.exhausted:
                    continue
            x, estimate = process.solve(damping)
            bar.set_postfix(residual=f"{estimate:.1e}")
            if estimate <= target:
                break
        if process.extremes()[0] + damping <= 0:  # later steps found more negative curvature: same rule, all of T_k
            lo, hi = process.extremes()
            damping = rule(lo, hi)
            log.warning("Lanczos met negative curvature (%.3g) after its first %d steps; damping raised to %.3g",
                        lo, damping_iters, damping)
            x = process.solve(damping)[0]
        residual = relative_residual(damped(hvp, damping), x, b)
        if residual <= tol or process.steps >= limit or process.exhausted:
            break
        # the Lanczos estimate drifts from the true residual (rounding): iterate on to a tighter estimate
        target = min(target, estimate) * tol / residual / 2
    finish(bar)  # ends at 100% when the solve converged early
    result = SolveResult(x=x, iterations=process.steps, residual=residual, converged=residual <= tol,
                         method="cg")
    return AutoDampedSolve(result, damping, lo, hi)
