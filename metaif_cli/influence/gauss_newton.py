"""The Gauss-Newton total Hessian (method §2, ``hessian.form=gauss_newton``).

``G = (1/m) sum_k w_k J_k^T H_k J_k + delta_reg I`` with ``J_k`` the Jacobian of the query
logits after adaptation with respect to ``lam`` (through the inner level) and ``H_k`` the
Hessian of the weighted cross-entropy ``(1/|Q|) sum_j v_j l(z_j)`` with respect to the logits:
``(v_j/|Q|) (diag(p_j) - p_j p_j^T)`` per instance, ``p_j = softmax(z_j)``. Positive
semi-definite; no derivative of ``J`` (no third-order term). One product costs one forward-mode
pass (``J vec``) and one reverse-mode pass (``J^T (H J vec)``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.func import jvp, vjp


def ce_logit_hessian(z: Tensor, t: Tensor, weights: Tensor) -> Tensor:
    """``H t`` for the weighted mean cross-entropy at logits ``z`` ``[Q, C]`` (any labels)."""
    p = torch.softmax(z, dim=-1)
    pt = p * t
    return (weights / weights.shape[-1])[:, None] * (pt - p * pt.sum(-1, keepdim=True))


def product(logits_fn: Callable[[Tensor], Tensor], x: Tensor, vec: Tensor, weights: Tensor) -> Tensor:
    """``J^T H J vec`` with ``J = d logits_fn / d x`` at ``x``: one jvp and one vjp."""
    z, jz = jvp(logits_fn, (x,), (vec,))
    return vjp(logits_fn, x)[1](ce_logit_hessian(z, jz, weights))[0]
