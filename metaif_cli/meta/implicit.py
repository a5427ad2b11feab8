"""iMAML: the proximal inner problem and implicit total gradients (method §1-2).

``phi_k = argmin_phi (1/|S|) sum_j u_j l(phi; z_j) + (eta/2)||phi - lam||^2`` is solved
approximately by gradient steps from ``lam`` and treated as a constant for autodiff.
Derivatives come from the implicit function theorem (paper Thm 4.1):
``J_k^T g = eta H_in^{-1} g`` with ``H_in = grad2_phi (inner data loss) + eta I``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor
from torch.func import grad, jvp

from metaif_cli.meta.config import MetaConfig
from metaif_cli.meta.params import FlatSpec, Params


class InnerLearner(Protocol):
    """What the implicit derivatives need of a learner (:class:`~metaif_cli.meta.learner.MetaLearner`
    is one): its settings and its losses. A protocol, so that this module does not import the
    learner that calls it."""

    cfg: MetaConfig

    def instance_losses(self, params: Params, x: Tensor, y: Tensor) -> Tensor: ...

    def inner_loss(self, params: Params, x_spt: Tensor, y_spt: Tensor, u: Tensor) -> Tensor: ...


def solve_inner(learner: InnerLearner, lam: Params, x_spt: Tensor, y_spt: Tensor, u: Tensor, steps: int) -> Params:
    """Approximate proximal solution by ``steps`` gradient steps of size ``inner_lr`` (no graph)."""
    eta, lr = learner.cfg.eta, learner.cfg.inner_lr
    anchor = {k: t.detach() for k, t in lam.items()}

    def prox_loss(phi: Params) -> Tensor:
        prox = sum(((phi[k] - anchor[k]) ** 2).sum() for k in phi)
        return learner.inner_loss(phi, x_spt, y_spt, u) + 0.5 * eta * prox

    phi = dict(anchor)
    step_grad = grad(prox_loss)
    for _ in range(steps):
        g = step_grad(phi)
        phi = {k: (phi[k] - lr * g[k]).detach() for k in phi}
    return phi


def inner_hvp(learner: InnerLearner, phi: Params, x_spt: Tensor, y_spt: Tensor, u: Tensor) -> Callable[[Tensor], Tensor]:
    """``v -> H_in v = grad2_phi(inner data loss) v + eta v`` on flat vectors."""
    spec = FlatSpec.of(phi)
    flat_phi = spec.flatten(phi)

    def flat_grad(p: Tensor) -> Tensor:
        return spec.flatten(grad(learner.inner_loss)(spec.unflatten(p), x_spt, y_spt, u))

    def hvp(vec: Tensor) -> Tensor:
        return jvp(flat_grad, (flat_phi,), (vec,))[1] + learner.cfg.eta * vec

    return hvp


def cg_fixed(hvp: Callable[[Tensor], Tensor], b: Tensor, iters: int) -> Tensor:
    """Conjugate gradients with a fixed iteration count (no data-dependent branches: vmap-safe)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    tiny = torch.finfo(b.dtype).tiny
    for _ in range(iters):
        ap = hvp(p)
        alpha = rs / (p @ ap + tiny)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        p = r + (rs_new / (rs + tiny)) * p
        rs = rs_new
    return x


def query_grad(learner: InnerLearner, phi: Params, x_qry: Tensor, y_qry: Tensor, v: Tensor) -> tuple[Params, Tensor]:
    """``d_phi L_Q`` and ``L_Q`` at the adapted parameters."""

    def loss(p: Params) -> Tensor:
        return (v * learner.instance_losses(p, x_qry, y_qry)).sum() / v.shape[0]

    g = grad(loss)(phi)
    return g, loss(phi)


def task_grad_fixed(learner: InnerLearner, lam: Params, x_spt, y_spt, u, x_qry, y_qry, v, cg_iters: int) -> tuple[Params, Tensor]:
    """iMAML's total gradient ``eta H_in^{-1} d_phi L_Q`` by ``cg_iters`` CG steps (training path)."""
    phi = solve_inner(learner, lam, x_spt, y_spt, u, learner.cfg.inner_steps)
    g, loss = query_grad(learner, phi, x_qry, y_qry, v)
    spec = FlatSpec.of(phi)
    x = cg_fixed(inner_hvp(learner, phi, x_spt, y_spt, u), spec.flatten(g), cg_iters)
    return spec.unflatten(learner.cfg.eta * x), loss.detach()
