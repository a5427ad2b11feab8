"""Shared pieces of the iHVP solvers (method §2): the operator types, the damped operator
``v -> (H + delta I) v``, float64 norms and dot products, the true relative residual and
the result every solver returns. Used by :mod:`solvers`, :mod:`series` and :mod:`krylov`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Hvp = Callable[[torch.Tensor], torch.Tensor]
SubsetHvp = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


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


def damped(hvp: Hvp, damping: float) -> Hvp:
    """The operator ``v -> (H + delta I) v``."""
    if not damping:
        return hvp
    return lambda v: hvp(v) + damping * v


def norm64(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v.to(torch.float64)))


def dot64(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(torch.dot(u.to(torch.float64), v.to(torch.float64)))


def relative_residual(apply_a: Hvp, x: torch.Tensor, b: torch.Tensor) -> float:
    """``||A x - b|| / ||b||`` with one HVP; absolute residual when ``b == 0``."""
    r = norm64(apply_a(x) - b)
    b_norm = norm64(b)
    return r / b_norm if b_norm > 0 else r


def check_b(b: torch.Tensor) -> None:
    if b.dim() != 1:
        raise ValueError(f"iHVP solvers take a flat 1-D vector b, got shape {tuple(b.shape)}")
