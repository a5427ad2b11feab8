"""One recorded meta-training step as a pure function of the state and the weights (method
§5, trajectory influence).

A step of ``metaif train`` maps ``(lam_t, m_t, v_t)`` and the weights ``w, u, v`` of the tasks
in its meta-batch to ``(lam_{t+1}, m_{t+1}, v_{t+1})``:
``g = (1/B) sum_k w_k G_k(lam_t; u_k, v_k) + delta_reg lam_t``, then an Adam step (moments
``m, v``, bias correction, ``eps``) or an SGD step. :func:`make_step` writes it with the same
tensor operations as the training loop and ``torch.optim`` (so the values agree bit for bit in
one dtype), but differentiably in everything the real computation depends on:

- second-order MAML/ANIL: ``G_k`` is the learner's total gradient (a pure function);
- first-order MAML/ANIL: ``G_k = d_phi L_Q^k`` at ``phi_k(lam; u)``; the learner stops the
  gradients through the inner steps, but the *value* of ``phi_k`` still moves with ``lam`` and
  ``u``, so here ``phi_k`` is computed with the full graph and ``G_k`` differentiated as it is;
- iMAML: the inner solve (``inner_steps`` proximal gradient steps) and the fixed-iteration CG of
  the meta-gradient are differentiated through, instead of treated as constants.

``sqrt`` of Adam's second moment has derivative 0 where the moment is exactly 0 (a parameter
that never had a gradient): its update is identically 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, vmap

from metaif_cli.errors import MetaifError
from metaif_cli.meta import implicit
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.meta.params import FlatSpec, Params
from metaif_cli.meta.tasks import TaskBatch


@dataclass(frozen=True)
class OptimSpec:
    """The outer optimiser of a run: ``adam`` (torch defaults but ``lr``) or plain ``sgd``, plus ``delta_reg``."""

    name: str
    lr: float
    delta_reg: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in ("adam", "sgd"):
            raise MetaifError(f"trajectory influence supports optim.optimizer=adam or sgd, not {self.name!r}")


@dataclass
class OptState:
    """The training state after ``step`` outer steps; ``opt_step``: Adam's step counter then."""

    step: int
    lam: Params
    m: Params | None = None  # Adam's exp_avg
    v: Params | None = None  # Adam's exp_avg_sq
    opt_step: int = 0

    def tensors(self) -> tuple[Params, Params, Params]:
        """``(lam, m, v)``; zero moments where there are none (SGD, or before Adam's first step)."""
        zeros = {k: torch.zeros_like(t) for k, t in self.lam.items()}
        return self.lam, self.m if self.m is not None else zeros, self.v if self.v is not None else dict(zeros)


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` with derivative 0 (not inf) at ``x = 0``; the same values as ``x.sqrt()``."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def adam_update(lam: Params, m: Params, v: Params, g: Params, count: int, spec: OptimSpec) -> tuple[Params, Params, Params]:
    """``torch.optim.Adam``'s step number ``count`` (1-based) as a pure function, op for op."""
    b1, b2 = spec.betas
    bc1, bc2 = 1 - b1 ** float(count), 1 - b2 ** float(count)
    step_size, bc2_sqrt = spec.lr / bc1, bc2 ** 0.5
    m2 = {k: torch.lerp(m[k], g[k], 1 - b1) for k in lam}
    v2 = {k: torch.addcmul(v[k] * b2, g[k], g[k], value=1 - b2) for k in lam}
    lam2 = {k: torch.addcdiv(lam[k], m2[k], safe_sqrt(v2[k]) / bc2_sqrt + spec.eps, value=-step_size) for k in lam}
    return lam2, m2, v2


def sgd_update(lam: Params, g: Params, spec: OptimSpec) -> Params:
    """``torch.optim.SGD`` without momentum: ``lam - lr g``."""
    return {k: torch.add(lam[k], g[k], alpha=-spec.lr) for k in lam}


def task_gradient_fn(learner: MetaLearner) -> Callable[..., Params]:
    """``(lam, x_spt, y_spt, u, x_qry, y_qry, v) -> G_k``: the training meta-gradient of one task,
    differentiable in ``lam``, ``u`` and ``v`` wherever its value depends on them."""
    cfg = learner.cfg
    if cfg.mode == "implicit":
        return lambda lam, *task: _imaml_gradient(learner, lam, *task)
    if not cfg.first_order:
        return lambda lam, *task: learner.task_grad(lam, *task)[0]
    full = MetaLearner(learner.model, replace(cfg, first_order=False))

    def first_order(lam, x_spt, y_spt, u, x_qry, y_qry, v):
        phi = full.adapt(lam, x_spt, y_spt, u)  # the same values as the stopped-gradient inner loop
        return grad(lambda p: (v * learner.instance_losses(p, x_qry, y_qry)).sum() / v.shape[0])(phi)

    return first_order


def _imaml_gradient(learner: MetaLearner, lam: Params, x_spt, y_spt, u, x_qry, y_qry, v) -> Params:
    """:func:`metaif_cli.meta.implicit.task_grad_fixed` without its stopped gradients."""
    cfg = learner.cfg

    def prox_loss(phi: Params) -> Tensor:
        prox = sum(((phi[k] - lam[k]) ** 2).sum() for k in phi)
        return learner.inner_loss(phi, x_spt, y_spt, u) + 0.5 * cfg.eta * prox

    phi, step_grad = dict(lam), grad(prox_loss)
    for _ in range(cfg.inner_steps):
        g = step_grad(phi)
        phi = {k: phi[k] - cfg.inner_lr * g[k] for k in phi}
    g, _ = implicit.query_grad(learner, phi, x_qry, y_qry, v)
    spec = FlatSpec.of(phi)
    x = implicit.cg_fixed(implicit.inner_hvp(learner, phi, x_spt, y_spt, u), spec.flatten(g), cfg.cg_iters)
    return spec.unflatten(cfg.eta * x)


def meta_gradient(task_fn: Callable[..., Params], lam: Params, batch: TaskBatch, use_vmap: bool) -> Params:
    """``(1/B) sum_k w_k G_k`` over a meta-batch, as :meth:`MetaLearner.meta_gradient` sums it."""
    if use_vmap:
        grads = vmap(task_fn, in_dims=(None, 0, 0, 0, 0, 0, 0))(lam, *batch.task_args())
    else:
        outs = [task_fn(lam, *(t[i] for t in batch.task_args())) for i in range(len(batch))]
        grads = {k: torch.stack([g[k] for g in outs]) for k in lam}
    return {k: torch.tensordot(batch.w, g, dims=1) / len(batch) for k, g in grads.items()}


StepFn = Callable[[Params, Params, Params, Tensor, Tensor, Tensor], tuple[Params, Params, Params]]


def make_step(learner: MetaLearner, spec: OptimSpec, batch: TaskBatch, count: int) -> StepFn:
    """``(lam, m, v, w_b, u_b, v_b) -> (lam', m', v')``: one outer step on ``batch`` (its images and
    labels fixed, its weights the arguments); ``count``: Adam's step number (1-based)."""
    task_fn = task_gradient_fn(learner)
    use_vmap = learner.cfg.vmap

    def step(lam, m, v, w_b, u_b, v_b):
        g = meta_gradient(task_fn, lam, batch.with_weights(w=w_b, u=u_b, v=v_b), use_vmap)
        g = {k: g[k] + spec.delta_reg * lam[k] for k in lam}
        if spec.name == "sgd":
            return sgd_update(lam, g, spec), m, v
        return adam_update(lam, m, v, g, count, spec)

    return step
