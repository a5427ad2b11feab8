"""MAML, first-order MAML, ANIL and iMAML as pure functions of ``(lam, task)``.

One :meth:`MetaLearner.adapt` serves training, evaluation and influence (method
§1). Unrolled mode (MAML, ANIL) takes ``K`` SGD steps on the weighted support
loss ``(1/|S|) sum_j u_j l(phi; z_j)``; gradients flow through the steps
(second-order) or are stopped (``first_order``). ANIL adapts ``head.*`` only, on body
features computed once. Implicit mode (iMAML) solves the proximal problem
``(1/|S|) sum_j u_j l + (eta/2)||phi - lam||^2`` and differentiates by the implicit
function theorem (:mod:`metaif_cli.meta.implicit`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from metaif_cli.meta.config import MetaConfig
from metaif_cli.meta import implicit
from metaif_cli.meta.params import Params
from metaif_cli.meta.tasks import TaskBatch
from metaif_cli.models.networks import MetaModel, features, head_logits, logits, split_params


class MetaLearner:
    """A model plus its inner level. All methods are pure in ``lam`` (a parameter dict)."""

    def __init__(self, model: MetaModel, cfg: MetaConfig) -> None:
        self.model = model
        self.cfg = cfg

    # ---- losses -----------------------------------------------------------------------
    def instance_losses(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Per-instance cross-entropy ``l(params; z_j)``: ``[B]``."""
        return F.cross_entropy(logits(self.model, params, x), y, reduction="none")

    def inner_loss(self, params: Params, x_spt: Tensor, y_spt: Tensor, u: Tensor) -> Tensor:
        """Weighted support loss ``(1/|S|) sum_j u_j l(params; z_j)`` (fixed normaliser)."""
        return (u * self.instance_losses(params, x_spt, y_spt)).sum() / u.shape[0]

    # ---- inner level ------------------------------------------------------------------
    def adapt(self, lam: Params, x_spt: Tensor, y_spt: Tensor, u: Tensor, steps: int | None = None) -> Params:
        """``phi_k(lam; u)``: the task-adapted parameters (method §1).

        First order stops the gradient with respect to ``lam`` only: ``phi = lam - sg(lam) +
        phi_hat(sg(lam); u)`` has the forward values of the second-order steps, ``d phi / d lam = I``
        (the first-order meta-gradient), and the exact dependence on the support weights ``u``
        (support-instance scores). Stopping the inner gradients instead would also cut ``u``.
        ``steps=0`` (Direct-IF) is ``phi = lam`` in every mode.
        """
        steps = self.cfg.inner_steps if steps is None else steps
        if steps == 0:
            return dict(lam)
        if self.cfg.mode == "implicit":
            return implicit.solve_inner(self, lam, x_spt, y_spt, u, steps)
        if self.cfg.name == "anil":
            return self._adapt_head(lam, x_spt, y_spt, u, steps)
        if self.cfg.first_order:
            return _first_order(lam, self._unroll({k: t.detach() for k, t in lam.items()}, x_spt, y_spt, u, steps))
        return self._unroll(lam, x_spt, y_spt, u, steps)

    def _unroll(self, lam: Params, x_spt: Tensor, y_spt: Tensor, u: Tensor, steps: int) -> Params:
        """``steps`` differentiable SGD steps on the weighted support loss from ``lam``."""
        phi = dict(lam)
        step_grad = grad(self.inner_loss)
        for _ in range(steps):
            g = step_grad(phi, x_spt, y_spt, u)
            phi = {k: phi[k] - self.cfg.inner_lr * g[k] for k in phi}
        return phi

    def _adapt_head(self, lam: Params, x_spt: Tensor, y_spt: Tensor, u: Tensor, steps: int) -> Params:
        """ANIL: SGD on ``head.*`` over body features computed once (first order: see :meth:`adapt`)."""
        body, head = split_params(lam)
        feats = features(self.model, body, x_spt)  # [S, D]
        start = head
        if self.cfg.first_order:  # no derivative through the inner gradients w.r.t. lam (head or body)
            feats, start = feats.detach(), {k: t.detach() for k, t in head.items()}

        def head_loss(h: Params) -> Tensor:
            losses = F.cross_entropy(head_logits(h, feats), y_spt, reduction="none")
            return (u * losses).sum() / u.shape[0]

        step_grad = grad(head_loss)
        phi = dict(start)
        for _ in range(steps):
            g = step_grad(phi)
            phi = {k: phi[k] - self.cfg.inner_lr * g[k] for k in phi}
        if self.cfg.first_order:
            phi = _first_order(head, phi)
        return {**body, **phi}

    # ---- outer level ------------------------------------------------------------------
    def query_losses(self, lam: Params, x_spt, y_spt, u, x_qry, y_qry, steps: int | None = None) -> Tensor:
        """Per-instance query losses after adaptation, ``l(phi_k(lam); z_j)``: ``[Q]``."""
        return self.instance_losses(self.adapt(lam, x_spt, y_spt, u, steps), x_qry, y_qry)

    def task_loss(self, lam: Params, x_spt, y_spt, u, x_qry, y_qry, v, steps: int | None = None) -> Tensor:
        """``L_Q^k = (1/|Q|) sum_j v_j l(phi_k(lam; u); z_j)``."""
        return (v * self.query_losses(lam, x_spt, y_spt, u, x_qry, y_qry, steps)).sum() / v.shape[0]

    def task_grad(self, lam: Params, x_spt, y_spt, u, x_qry, y_qry, v) -> tuple[Params, Tensor]:
        """Total gradient ``D_lam L_Q^k`` and ``L_Q^k`` for one task (method §2)."""
        if self.cfg.mode == "implicit":
            return implicit.task_grad_fixed(self, lam, x_spt, y_spt, u, x_qry, y_qry, v, self.cfg.cg_iters)
        return grad_and_value(self.task_loss)(lam, x_spt, y_spt, u, x_qry, y_qry, v)

    def meta_gradient(self, lam: Params, batch: TaskBatch, use_vmap: bool | None = None) -> tuple[Params, Tensor]:
        """``(1/T) sum_k w_k D_lam L_Q^k`` over a meta-batch, and the per-task losses ``[T]``.

        ``vmap`` over tasks and a plain loop give the same result (tested); vmap is the
        default where it is correct (every model here uses vmap-safe primitive norms).
        """
        use_vmap = self.cfg.vmap if use_vmap is None else use_vmap
        if use_vmap:
            grads, losses = vmap(self.task_grad, in_dims=(None, 0, 0, 0, 0, 0, 0))(lam, *batch.task_args())
        else:
            outs = [self.task_grad(lam, *(t[i] for t in batch.task_args())) for i in range(len(batch))]
            grads = {k: torch.stack([g[k] for g, _ in outs]) for k in lam}
            losses = torch.stack([l for _, l in outs])
        w = batch.w
        mean_grad = {k: torch.tensordot(w, g, dims=1) / len(batch) for k, g in grads.items()}
        return mean_grad, losses

    # ---- evaluation -------------------------------------------------------------------
    def evaluate(self, lam: Params, batch: TaskBatch, chunk: int = 32) -> tuple[Tensor, Tensor]:
        """Per-task query loss and accuracy after adaptation (``eval_inner_steps``): ``[T], [T]``."""
        steps = self.cfg.inner_steps if self.cfg.eval_inner_steps is None else self.cfg.eval_inner_steps
        lam = {k: t.detach() for k, t in lam.items()}

        def one(x_spt, y_spt, u, x_qry, y_qry, v):
            phi = self.adapt(lam, x_spt, y_spt, u, steps)
            out = logits(self.model, phi, x_qry)
            loss = (v * F.cross_entropy(out, y_qry, reduction="none")).sum() / v.shape[0]
            acc = (out.argmax(-1) == y_qry).to(out.dtype).mean()
            return loss.detach(), acc.detach()

        fn: Callable = vmap(one) if self.cfg.vmap else None  # type: ignore[assignment]
        losses, accs = [], []
        for start in range(0, len(batch), chunk):
            part = batch[start : start + chunk]
            if fn is not None:
                l, a = fn(*part.task_args())
            else:
                la = [one(*(t[i] for t in part.task_args())) for i in range(len(part))]
                l, a = torch.stack([x for x, _ in la]), torch.stack([y for _, y in la])
            losses.append(l)
            accs.append(a)
        return torch.cat(losses), torch.cat(accs)


def _first_order(lam: Params, phi_hat: Params) -> Params:
    """``lam - sg(lam) + phi_hat``: the values of ``phi_hat``, identity derivative in ``lam``.

    ``sg`` (``detach``) stops every torch.func level at once, and ``lam`` never depends on
    the weights ``u``, so ``phi_hat``'s dependence on ``u`` is kept whatever the order of
    the transforms (grad over ``u`` of a jvp over ``lam``, or the reverse).
    """
    return {k: (lam[k] - lam[k].detach()) + phi_hat[k] for k in lam}
