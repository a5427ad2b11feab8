"""Inverse-Hessian-vector products (iHVPs) over flat parameter vectors (method §2).

Every solver returns an approximation of ``x = (H + delta I)^{-1} b`` given only a
Hessian-vector-product callable ``hvp(v) = H v`` on flat 1-D tensors of size ``P``.
``H`` is symmetric but may be indefinite (meta-training rarely ends at a stationary
point), which is why the damping ``delta`` is always added. Each result reports the true
relative residual ``||(H + delta I) x - b|| / ||b||``, recomputed with one extra HVP:

- ``dense``: build ``H`` column by column and solve exactly (small models; test oracle);
- ``cg``: conjugate gradients; stops on breakdown (``p^T A p <= 0``, indefinite ``A``);
- ``neumann``, ``lissa``: series solvers, in :mod:`metaif_cli.influence.series`.

:data:`SOLVERS` is the registry of solvers, the single source of their names, help text, hints and
dispatch (``solver.name``); :func:`solve` runs the one a :class:`SolverConfig`-like object names;
:func:`check_converged` refuses an unconverged solve;
:func:`check_usable` refuses, even under ``solver.allow_unconverged``, a solve no better than
``x = 0`` (relative residual >= 1, not finite, or ``x = 0``: a CG breakdown at the first
step), which would otherwise rank every unit by nothing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from metaif_cli.errors import MetaifError
from metaif_cli.influence.operators import Hvp, SolveResult, check_b, damped, dot64, norm64, relative_residual
from metaif_cli.influence.series import power_iteration, solve_lissa, solve_neumann
from metaif_cli.progress import bar as progress_bar
from metaif_cli.progress import finish

logger = logging.getLogger(__name__)

__all__ = ["SolveResult", "SolverEntry", "SOLVERS", "build_dense_hessian", "solve_dense", "solve_cg",
           "power_iteration", "solve_neumann", "solve_lissa", "solve", "check_converged", "check_usable"]


def build_dense_hessian(hvp: Hvp, dim: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Build the ``[P, P]`` Hessian by applying ``hvp`` to the ``P`` unit vectors.

    Args:
        hvp: Hessian-vector product on flat vectors of size ``dim``.
        dim: Number of parameters ``P``.
        dtype: Dtype of the vectors passed to ``hvp``.
        device: Device of the vectors passed to ``hvp``.

    Returns:
        The symmetrised Hessian ``(H + H^T) / 2``, shape ``[P, P]``.
    """
    h = torch.empty(dim, dim, dtype=dtype, device=device)  # [P, P]
    for i in range(dim):
        e = torch.zeros(dim, dtype=dtype, device=device)
        e[i] = 1.0
        h[:, i] = hvp(e)
    return (h + h.T) / 2


def solve_dense(hvp: Hvp, b: torch.Tensor, damping: float) -> SolveResult:
    """Exact solve with the dense damped Hessian (the test oracle; small ``P`` only).

    The solve runs in float64. A singular matrix falls back to the minimum-norm
    least-squares solution and is reported as not converged.

    Args:
        hvp: Hessian-vector product on flat vectors.
        b: Right-hand side, shape ``[P]``.
        damping: Damping ``delta >= 0`` added to the diagonal.

    Returns:
        The solve result; ``iterations`` is the number of HVPs used to build ``H``.
    """
    check_b(b)
    p = b.numel()
    a = build_dense_hessian(hvp, p, b.dtype, b.device).to(torch.float64)
    a = a + damping * torch.eye(p, dtype=torch.float64, device=b.device)
    b64 = b.to(torch.float64)
    # LU rarely hits an exact zero pivot, so judge singularity from the spectrum, at
    # the precision the HVPs were computed in.
    rcond = p * torch.finfo(b.dtype).eps
    abs_eig = torch.linalg.eigvalsh(a).abs()
    regular = bool(torch.isfinite(abs_eig).all()) and float(abs_eig.min()) > rcond * float(abs_eig.max())
    if regular:
        x64 = torch.linalg.solve(a, b64)
    else:
        logger.warning("dense iHVP: damped Hessian is singular; using least squares")
        # gelsd handles rank deficiency but only exists on CPU.
        x64 = torch.linalg.lstsq(a.cpu(), b64.cpu().unsqueeze(1), rcond=rcond, driver="gelsd").solution
        x64 = x64.squeeze(1).to(b.device)
    x = x64.to(b.dtype)
    residual = relative_residual(damped(hvp, damping), x, b)
    return SolveResult(x=x, iterations=p, residual=residual, converged=regular, method="dense")


def solve_cg(
    hvp: Hvp,
    b: torch.Tensor,
    damping: float,
    max_iter: int = 100,
    tol: float = 1e-6,
    progress: bool = False,
) -> SolveResult:
    """Conjugate gradients on ``(H + delta I) x = b``.

    Stops when the recursive relative residual reaches ``tol``; then checks the true
    residual and restarts from the current iterate if drift left it above ``tol``. On
    breakdown (``p^T A p <= 0``, i.e. ``A`` is not positive definite along ``p``) it
    stops, returns the iterate with the smallest residual, and reports not converged.

    Args:
        hvp: Hessian-vector product on flat vectors.
        b: Right-hand side, shape ``[P]``.
        damping: Damping ``delta >= 0``.
        max_iter: Maximum number of CG iterations (one HVP each).
        tol: Relative residual tolerance.
        progress: Show a tqdm bar.

    Returns:
        The solve result.
    """
    check_b(b)
    apply_a = damped(hvp, damping)
    b_norm = norm64(b)
    x = torch.zeros_like(b)
    if b_norm == 0:
        return SolveResult(x=x, iterations=0, residual=0.0, converged=True, method="cg")
    r = b.clone()
    best_x, best_res = x.clone(), 1.0
    iterations, breakdown = 0, False
    bar = progress_bar(total=max_iter, desc="iHVP cg", enabled=progress, leave=False)
    while True:
        p = r.clone()
        rr = dot64(r, r)
        while iterations < max_iter and math.sqrt(rr) / b_norm > tol:
            ap = apply_a(p)
            pap = dot64(p, ap)
            iterations += 1
            bar.update(1)
            if not pap > 0:  # also catches NaN
                breakdown = True
                logger.warning("cg breakdown at iteration %d: p^T A p = %.3e <= 0", iterations, pap)
                break
            alpha = rr / pap
            x = x + alpha * p
            r = r - alpha * ap
            rr_new = dot64(r, r)
            res = math.sqrt(rr_new) / b_norm
            bar.set_postfix(residual=f"{res:.1e}")
            if res < best_res:
                best_x, best_res = x.clone(), res
            p = r + (rr_new / rr) * p
            rr = rr_new
        true_r = b - apply_a(best_x)
        residual = norm64(true_r) / b_norm
        if breakdown or residual <= tol or iterations >= max_iter or not math.isfinite(residual):
            break
        logger.debug("cg restart: true residual %.3e > tol %.1e", residual, tol)
        x, r = best_x.clone(), true_r
        best_res = residual
    finish(bar)  # ends at 100% when the solve converged early
    converged = not breakdown and residual <= tol
    return SolveResult(x=best_x, iterations=iterations, residual=residual, converged=converged, method="cg")


@dataclass(frozen=True)
class SolverEntry:
    """One iHVP solver of the registry.

    Attributes:
        help: One line for the reference (what it computes, method §2).
        hint: What to change when it does not converge (ends every refusal).
        run: ``(settings, hvp, hvp_subset, b, damping, generator, progress) -> SolveResult``, with
            ``settings`` a :class:`~metaif_cli.influence.config.SolverConfig` (read by name).
    """

    help: str
    hint: str
    run: Callable[..., SolveResult]


SOLVERS: dict[str, SolverEntry] = {
    "cg": SolverEntry(
        "conjugate gradients on Hessian-vector products (with auto damping: one Lanczos basis)",
        "raise solver.max_iter, add hessian.damping",
        lambda s, hvp, sub, b, d, gen, progress: solve_cg(hvp, b, d, max_iter=s.max_iter, tol=s.tol,
                                                          progress=progress)),
    "dense": SolverEntry(
        "build the Hessian column by column and solve exactly (small models; the tests' oracle)",
        "the damped Hessian is singular; add hessian.damping",
        lambda s, hvp, sub, b, d, gen, progress: solve_dense(hvp, b, d)),
    "neumann": SolverEntry(
        "truncated Neumann series of solver.terms terms, scaled by power iteration",
        "raise solver.terms, add hessian.damping",
        lambda s, hvp, sub, b, d, gen, progress: solve_neumann(hvp, b, d, terms=s.terms, power_iters=s.power_iters,
                                                               generator=gen, tol=s.tol, progress=progress)),
    "lissa": SolverEntry(
        "stochastic Neumann series on solver.lissa_tasks sampled tasks, averaged over solver.repeats",
        "raise solver.depth or solver.repeats, add hessian.damping",
        lambda s, hvp, sub, b, d, gen, progress: solve_lissa(sub, b, d, depth=s.depth, repeats=s.repeats,
                                                             generator=gen, power_hvp=hvp, tol=s.tol,
                                                             progress=progress)),
}


def solve(settings: Any, hvp: Hvp, b: torch.Tensor, damping: float, *, hvp_subset: Any = None,
          generator: torch.Generator | None = None, progress: bool = False) -> SolveResult:
    """``(H + delta I)^{-1} b`` by the solver ``settings.name`` of :data:`SOLVERS` (method §2).

    Args:
        settings: A :class:`~metaif_cli.influence.config.SolverConfig` (its solver's knobs are read).
        hvp: ``v -> H v`` on flat ``[P]`` vectors.
        b: Right-hand side, ``[P]``.
        damping: ``delta >= 0``.
        hvp_subset: ``(v, generator) -> H_t v`` on a task subsample (``lissa`` only).
        generator: Seeds the random draws of ``neumann`` and ``lissa``.
        progress: Show a progress bar.

    Raises:
        MetaifError: If the solver is unknown.
    """
    entry = SOLVERS.get(settings.name)
    if entry is None:
        raise MetaifError(f"unknown iHVP solver {settings.name!r}; set solver.name to one of {', '.join(SOLVERS)}")
    return entry.run(settings, hvp, hvp_subset, b, damping, generator, progress)


def _hint(method: str) -> str:
    entry = SOLVERS.get(method)
    return entry.hint if entry is not None else "add hessian.damping"


def check_converged(result: SolveResult, tol: float) -> None:
    """Raise if the solve's true relative residual exceeds ``tol`` (or is NaN).

    Raises:
        MetaifError: Naming the solver, residual, tolerance, iterations and the fix.
    """
    if result.residual <= tol:
        return
    hint = _hint(result.method)
    tol_text = f"{tol:.0e}" if float(f"{tol:.0e}") == tol else f"{tol:.2e}"
    raise MetaifError(
        f"iHVP solver {result.method!r} did not converge: relative residual {result.residual:.1e} "
        f"> tol {tol_text} after {result.iterations} iterations; {hint}, "
        "or set solver.allow_unconverged=true"
    )


def check_usable(result: SolveResult) -> None:
    """Raise if the solve is no better than ``x = 0`` (relative residual >= 1 or NaN, or ``x = 0``).

    ``solver.allow_unconverged`` accepts a loose solve, never an unusable one: with ``s = 0``
    every score would be 0 and the ranking the task order.

    Raises:
        MetaifError: One line naming the solver, its residual and the fix.
    """
    zero = not bool(result.x.ne(0).any())
    if math.isfinite(result.residual) and result.residual < 1 and not zero:
        return
    hint = _hint(result.method)
    what = "returned s = 0" if zero else f"has relative residual {result.residual:.1e} (no better than s = 0)"
    raise MetaifError(f"iHVP solver {result.method!r} {what} after {result.iterations} iterations, so it cannot "
                      f"rank anything even with solver.allow_unconverged=true; {hint} (or hessian.auto_damping=true)")
