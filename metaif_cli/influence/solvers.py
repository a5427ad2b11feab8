"""Inverse-Hessian-vector products (iHVPs) over flat parameter vectors (SPEC section 2).

Every solver returns an approximation of ``x = (H + delta I)^{-1} b`` given only a
Hessian-vector-product callable ``hvp(v) = H v`` on flat 1-D tensors of size ``P``.
``H`` is symmetric but may be indefinite (meta-training rarely ends at a stationary
point), which is why the damping ``delta`` is always added. Each result reports the true
relative residual ``||(H + delta I) x - b|| / ||b||``, recomputed with one extra HVP:

- ``dense``: build ``H`` column by column and solve exactly (small models; test oracle);
- ``cg``: conjugate gradients; stops on breakdown (``p^T A p <= 0``, indefinite ``A``);
- ``neumann``: ``x = (1/s) sum_{j<J} (I - A/s)^j b`` with ``s`` above the largest
  eigenvalue of ``A = H + delta I`` (power iteration), converging iff ``A`` is positive
  definite with spectrum below ``2 s``;
- ``lissa``: the same recursion where each step uses an HVP on a random subsample of
  tasks, averaged over independent repeats.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from metaif_cli.errors import MetaifError

logger = logging.getLogger(__name__)

Hvp = Callable[[torch.Tensor], torch.Tensor]
SubsetHvp = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

METHODS = ("dense", "cg", "neumann", "lissa")
_HINTS = {
    "dense": "the damped Hessian is singular; add hessian.damping",
    "cg": "raise solver.max_iter, add hessian.damping",
    "neumann": "raise solver.terms, add hessian.damping",
    "lissa": "raise solver.depth or solver.repeats, add hessian.damping",
}


@dataclass
class SolveResult:
    """Outcome of one iHVP solve.

    Attributes:
        x: The solution, same shape, dtype and device as ``b``.
        iterations: HVP calls (dense) or iterations (iterative solvers) used, not
            counting power iteration or the final residual check.
        residual: True relative residual ``||(H + delta I) x - b|| / ||b||``.
        converged: Whether ``residual <= tol`` (dense: whether the matrix was regular).
        method: Solver name.
        eigenvalue_max: Largest-eigenvalue estimate of ``H + delta I`` when computed.
    """

    x: torch.Tensor
    iterations: int
    residual: float
    converged: bool
    method: str
    eigenvalue_max: float | None = None


def _damped(hvp: Hvp, damping: float) -> Hvp:
    """The operator ``v -> (H + delta I) v``."""
    if not damping:
        return hvp
    return lambda v: hvp(v) + damping * v


def _norm64(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v.to(torch.float64)))


def _dot64(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(torch.dot(u.to(torch.float64), v.to(torch.float64)))


def _relative_residual(apply_a: Hvp, x: torch.Tensor, b: torch.Tensor) -> float:
    """``||A x - b|| / ||b||`` with one HVP; absolute residual when ``b == 0``."""
    r = _norm64(apply_a(x) - b)
    b_norm = _norm64(b)
    return r / b_norm if b_norm > 0 else r


def _check_b(b: torch.Tensor) -> None:
    if b.dim() != 1:
        raise ValueError(f"iHVP solvers take a flat 1-D vector b, got shape {tuple(b.shape)}")


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
    _check_b(b)
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
    residual = _relative_residual(_damped(hvp, damping), x, b)
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
    _check_b(b)
    apply_a = _damped(hvp, damping)
    b_norm = _norm64(b)
    x = torch.zeros_like(b)
    if b_norm == 0:
        return SolveResult(x=x, iterations=0, residual=0.0, converged=True, method="cg")
    r = b.clone()
    best_x, best_res = x.clone(), 1.0
    iterations, breakdown = 0, False
    bar = tqdm(total=max_iter, desc="iHVP cg", disable=not progress, leave=False)
    while True:
        p = r.clone()
        rr = _dot64(r, r)
        while iterations < max_iter and math.sqrt(rr) / b_norm > tol:
            ap = apply_a(p)
            pap = _dot64(p, ap)
            iterations += 1
            bar.update(1)
            if not pap > 0:  # also catches NaN
                breakdown = True
                logger.warning("cg breakdown at iteration %d: p^T A p = %.3e <= 0", iterations, pap)
                break
            alpha = rr / pap
            x = x + alpha * p
            r = r - alpha * ap
            rr_new = _dot64(r, r)
            res = math.sqrt(rr_new) / b_norm
            bar.set_postfix(residual=f"{res:.1e}")
            if res < best_res:
                best_x, best_res = x.clone(), res
            p = r + (rr_new / rr) * p
            rr = rr_new
        true_r = b - apply_a(best_x)
        residual = _norm64(true_r) / b_norm
        if breakdown or residual <= tol or iterations >= max_iter or not math.isfinite(residual):
            break
        logger.debug("cg restart: true residual %.3e > tol %.1e", residual, tol)
        x, r = best_x.clone(), true_r
        best_res = residual
    bar.close()
    converged = not breakdown and residual <= tol
    return SolveResult(x=best_x, iterations=iterations, residual=residual, converged=converged, method="cg")


def power_iteration(
    hvp: Hvp,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    """Estimate the largest absolute eigenvalue of ``H`` by power iteration.

    Uses ``||H v||`` for unit ``v``, a lower bound that converges to ``|lambda|_max``
    and stays meaningful when ``H`` is indefinite.

    Args:
        hvp: Hessian-vector product on flat vectors of size ``dim``.
        dim: Number of parameters ``P``.
        dtype: Dtype of the vectors passed to ``hvp``.
        device: Device of the vectors passed to ``hvp``.
        iters: Number of HVPs.
        generator: CPU generator for the random start (seed 0 when omitted).

    Returns:
        The estimate of ``max |eigenvalue(H)|`` (0.0 for a zero operator).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    v = v / _norm64(v)
    estimate = 0.0
    for _ in range(iters):
        w = hvp(v)
        w_norm = _norm64(w)
        if not w_norm > 0:  # zero operator, or NaN
            return w_norm if math.isfinite(w_norm) else float("nan")
        estimate = w_norm
        v = w / w_norm
    return estimate


def _neumann_scale(apply_a: Hvp, b: torch.Tensor, scale: float | None, power_iters: int,
                   generator: torch.Generator | None) -> tuple[float, float | None]:
    """Return ``(s, lambda_max)``: the given scale, or ``1.1 |lambda_max(A)|``."""
    if scale is not None:
        return float(scale), None
    lam = power_iteration(apply_a, b.numel(), b.dtype, b.device, power_iters, generator)
    if not (math.isfinite(lam) and lam > 0):
        raise MetaifError(
            f"Neumann/LiSSA scale: power iteration gave largest eigenvalue {lam}; "
            "set solver.scale explicitly or add hessian.damping"
        )
    return 1.1 * lam, lam


def solve_neumann(
    hvp: Hvp,
    b: torch.Tensor,
    damping: float,
    terms: int = 100,
    scale: float | None = None,
    power_iters: int = 20,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
    progress: bool = False,
) -> SolveResult:
    """Truncated Neumann series ``x = (1/s) sum_{j<J} (I - A/s)^j b``, ``A = H + delta I``.

    Computed by the recursion ``p_0 = b``, ``p_j = b + p_{j-1} - A p_{j-1} / s``, so
    ``J`` terms cost ``J - 1`` HVPs. Converges only if the spectrum of ``A`` lies in
    ``(0, 2 s)``; a negative eigenvalue makes the series diverge, which the residual
    shows.

    Args:
        hvp: Hessian-vector product on flat vectors.
        b: Right-hand side, shape ``[P]``.
        damping: Damping ``delta >= 0``.
        terms: Number of series terms ``J``.
        scale: ``s``; default ``1.1 |lambda_max(A)|`` from power iteration.
        power_iters: HVPs spent on power iteration when ``scale`` is not given.
        generator: Generator for the power-iteration start vector.
        tol: Relative residual below which the result counts as converged.
        progress: Show a tqdm bar.

    Returns:
        The solve result.
    """
    _check_b(b)
    apply_a = _damped(hvp, damping)
    s, lam = _neumann_scale(apply_a, b, scale, power_iters, generator)
    p = b.clone()
    for _ in tqdm(range(terms - 1), desc="iHVP neumann", disable=not progress, leave=False):
        p = b + p - apply_a(p) / s
    x = p / s
    residual = _relative_residual(apply_a, x, b)
    return SolveResult(x=x, iterations=max(terms - 1, 0), residual=residual,
                       converged=residual <= tol, method="neumann", eigenvalue_max=lam)


def solve_lissa(
    hvp_on_subset: SubsetHvp,
    b: torch.Tensor,
    damping: float,
    depth: int = 100,
    repeats: int = 1,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    power_hvp: Hvp | None = None,
    power_iters: int = 20,
    tol: float = 1e-6,
    progress: bool = False,
) -> SolveResult:
    """LiSSA: the Neumann recursion with an HVP on a random task subsample per step.

    Each repeat runs ``p_0 = b``, ``p_t = b + p_{t-1} - A_t p_{t-1} / s`` for
    ``t = 1..depth`` with ``A_t = H_t + delta I`` and ``H_t`` the Hessian of a fresh
    subsample (drawn by ``hvp_on_subset`` from ``generator``); the estimates
    ``p_depth / s`` are averaged over ``repeats``.

    Args:
        hvp_on_subset: ``(v, generator) -> H_t v`` on a subsample it draws itself.
        b: Right-hand side, shape ``[P]``.
        damping: Damping ``delta >= 0``.
        depth: Recursion steps per repeat (one sub-sampled HVP each).
        repeats: Independent recursions averaged.
        scale: ``s``; default ``1.1 |lambda_max(A)|`` by power iteration on ``power_hvp``
            (or on sub-sampled HVPs when ``power_hvp`` is not given).
        generator: CPU generator for subsamples and the power-iteration start (seed 0).
        power_hvp: Full-data HVP, used for the scale and the reported residual.
        power_iters: HVPs spent on power iteration when ``scale`` is not given.
        tol: Relative residual below which the result counts as converged.
        progress: Show a tqdm bar.

    Returns:
        The solve result.
    """
    _check_b(b)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    full = power_hvp if power_hvp is not None else (lambda v: hvp_on_subset(v, generator))
    s, lam = _neumann_scale(_damped(full, damping), b, scale, power_iters, generator)
    x = torch.zeros_like(b)
    bar = tqdm(total=depth * repeats, desc="iHVP lissa", disable=not progress, leave=False)
    for _ in range(repeats):
        p = b.clone()
        for _ in range(depth):
            p = b + p - (hvp_on_subset(p, generator) + damping * p) / s
            bar.update(1)
        x = x + p / (s * repeats)
    bar.close()
    residual = _relative_residual(_damped(full, damping), x, b)
    return SolveResult(x=x, iterations=depth * repeats, residual=residual,
                       converged=residual <= tol, method="lissa", eigenvalue_max=lam)


def solve(method: str, hvp: Any, b: torch.Tensor, damping: float, **kwargs: Any) -> SolveResult:
    """Dispatch to the solver named ``method`` ("dense", "cg", "neumann", "lissa").

    For ``lissa``, ``hvp`` is the sub-sampled ``(v, generator) -> H_t v`` callable.

    Raises:
        MetaifError: If ``method`` is unknown.
    """
    solvers = {"dense": solve_dense, "cg": solve_cg, "neumann": solve_neumann, "lissa": solve_lissa}
    if method not in solvers:
        raise MetaifError(f"unknown iHVP solver {method!r}; set solver.method to one of {', '.join(METHODS)}")
    return solvers[method](hvp, b, damping, **kwargs)


def check_converged(result: SolveResult, tol: float) -> None:
    """Raise if the solve's true relative residual exceeds ``tol`` (or is NaN).

    Raises:
        MetaifError: Naming the solver, residual, tolerance, iterations and the fix.
    """
    if result.residual <= tol:
        return
    hint = _HINTS.get(result.method, "add hessian.damping")
    tol_text = f"{tol:.0e}" if float(f"{tol:.0e}") == tol else f"{tol:.2e}"
    raise MetaifError(
        f"iHVP solver {result.method!r} did not converge: relative residual {result.residual:.1e} "
        f"> tol {tol_text} after {result.iterations} iterations; {hint}, "
        "or set solver.allow_unconverged=true"
    )
