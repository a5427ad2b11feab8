"""Series iHVP solvers (method §2): power iteration for the scale, the truncated Neumann
series and LiSSA, its stochastic version.

- ``neumann``: ``x = (1/s) sum_{j<J} (I - A/s)^j b`` with ``s`` above the largest
  eigenvalue of ``A = H + delta I`` (power iteration), converging iff ``A`` is positive
  definite with spectrum below ``2 s``;
- ``lissa``: the same recursion where each step uses an HVP on a random subsample of
  tasks, averaged over independent repeats.
"""

from __future__ import annotations

import math

import torch

from metaif_cli.errors import MetaifError
from metaif_cli.influence.operators import Hvp, SolveResult, SubsetHvp, check_b, damped, norm64, relative_residual
from metaif_cli.progress import bar as progress_bar
from metaif_cli.progress import finish


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
    v = v / norm64(v)
    estimate = 0.0
    for _ in range(iters):
        w = hvp(v)
        w_norm = norm64(w)
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
    check_b(b)
    apply_a = damped(hvp, damping)
    s, lam = _neumann_scale(apply_a, b, scale, power_iters, generator)
    p = b.clone()
    for _ in progress_bar(range(terms - 1), desc="iHVP neumann", enabled=progress, leave=False):
        p = b + p - apply_a(p) / s
    x = p / s
    residual = relative_residual(apply_a, x, b)
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
    check_b(b)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    full = power_hvp if power_hvp is not None else (lambda v: hvp_on_subset(v, generator))
    s, lam = _neumann_scale(damped(full, damping), b, scale, power_iters, generator)
    x = torch.zeros_like(b)
    bar = progress_bar(total=depth * repeats, desc="iHVP lissa", enabled=progress, leave=False)
    for _ in range(repeats):
        p = b.clone()
        for _ in range(depth):
            p = b + p - (hvp_on_subset(p, generator) + damping * p) / s
            bar.update(1)
        x = x + p / (s * repeats)
    finish(bar)
    residual = relative_residual(damped(full, damping), x, b)
    return SolveResult(x=x, iterations=depth * repeats, residual=residual,
                       converged=residual <= tol, method="lissa", eigenvalue_max=lam)
