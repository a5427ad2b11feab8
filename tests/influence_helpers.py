"""Independent float64 reference implementations for ``tests/test_influence.py``.

Everything here is written from the definitions of method §1-3, not from
``metaif_cli.influence``: the unrolled inner loop, the proximal (iMAML) inner solution by
Newton's method, dense implicit total gradients and total Hessians (third-order term
included), the meta-objective ``F`` and the evaluation function ``f``, and a full-batch
Newton trainer that drives ``||grad F||`` to ~1e-10 (leave-one-out ground truth).
Only the network forward pass (:func:`metaif_cli.models.logits`) is shared with the code
under test.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, hessian, vmap

from metaif_cli.influence.implicit import ImplicitProblem
from metaif_cli.influence.problem import Problem, UnrolledProblem
from metaif_cli.meta.config import MetaConfig
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.meta.params import FlatSpec
from metaif_cli.meta.tasks import TaskBatch
from metaif_cli.models.config import ModelConfig
from metaif_cli.models.networks import MetaModel, build_model, logits, params_of

DT = torch.float64


# ---------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------
def make_model(name: str = "mlp", norm: str = "none", hidden: int = 4, layers: int = 1,
               image_shape: tuple[int, int, int] = (1, 6, 6), ways: int = 3, seed: int = 0,
               pool: str = "max") -> MetaModel:
    cfg = ModelConfig(name=name, hidden=hidden, layers=layers, norm=norm, groups=2, pool=pool)
    # the meta-learners read parameters from a dict; module parameters (a fixed body when
    # ``lam`` holds only the head) need no autograd graph
    return build_model(cfg, image_shape, ways, seed).double().requires_grad_(False)


def make_learner(model: MetaModel, name: str = "maml", steps: int = 2, lr: float = 0.4, eta: float = 1.0,
                 vmap: bool = True) -> MetaLearner:
    return MetaLearner(model, MetaConfig(name=name, inner_steps=steps, inner_lr=lr, eta=eta, vmap=vmap))


def lam_of(model: MetaModel, head_only: bool = False) -> tuple[FlatSpec, Tensor]:
    """``(spec, theta)`` of all parameters (or only ``head.*``: the body stays fixed in the module)."""
    lam = params_of(model, DT, torch.device("cpu"))
    if head_only:
        lam = {k: v for k, v in lam.items() if k.startswith("head.")}
    spec = FlatSpec.of(lam)
    return spec, spec.flatten(lam)


def random_tasks(n: int, ways: int = 3, shots: int = 2, queries: int = 3,
                 image_shape: tuple[int, int, int] = (1, 6, 6), seed: int = 0,
                 unit_weights: bool = False) -> TaskBatch:
    """Random Gaussian images; weights in [0.5, 1.5] unless ``unit_weights``."""
    g = torch.Generator().manual_seed(seed)
    s, q = ways * shots, ways * queries
    x_spt = torch.randn(n, s, *image_shape, generator=g, dtype=DT)
    x_qry = torch.randn(n, q, *image_shape, generator=g, dtype=DT)
    y_spt = torch.arange(ways).repeat_interleave(shots).repeat(n, 1)
    y_qry = torch.arange(ways).repeat_interleave(queries).repeat(n, 1)

    def wts(*shape: int) -> Tensor:
        return torch.ones(*shape, dtype=DT) if unit_weights else 0.5 + torch.rand(*shape, generator=g, dtype=DT)

    return TaskBatch(x_spt, y_spt, wts(n, s), x_qry, y_qry, wts(n, q), wts(n))


_DIGITS: tuple[Tensor, Tensor] | None = None


def _digits() -> tuple[Tensor, Tensor]:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=DT) / 16.0
        x = (x - x.mean()) / x.std()
        _DIGITS = (x[:, None], torch.tensor(d.target, dtype=torch.long))  # [N, 1, 8, 8], [N]
    return _DIGITS


def digits_tasks(n: int, ways: int = 3, shots: int = 2, queries: int = 3, seed: int = 0,
                 classes: Sequence[int] = tuple(range(10))) -> TaskBatch:
    """``n`` few-shot tasks from sklearn's 8x8 digits (each task: ``ways`` random classes of ``classes``)."""
    x, y = _digits()
    rng = np.random.default_rng(seed)
    xs, ys, xq, yq = [], [], [], []
    for _ in range(n):
        cls = rng.choice(np.asarray(classes), ways, replace=False)
        si, qi = [], []
        for c in cls:
            pick = rng.choice(np.flatnonzero(y.numpy() == c), shots + queries, replace=False)
            si.append(pick[:shots])
            qi.append(pick[shots:])
        si, qi = np.concatenate(si), np.concatenate(qi)
        xs.append(x[si])
        xq.append(x[qi])
        ys.append(torch.arange(ways).repeat_interleave(shots))
        yq.append(torch.arange(ways).repeat_interleave(queries))
    s, q = ways * shots, ways * queries
    return TaskBatch(torch.stack(xs), torch.stack(ys), torch.ones(n, s, dtype=DT), torch.stack(xq),
                     torch.stack(yq), torch.ones(n, q, dtype=DT), torch.ones(n, dtype=DT))


def make_problem(learner: MetaLearner, spec: FlatSpec, train: TaskBatch, test: TaskBatch, delta_reg: float,
                 **kwargs) -> Problem:
    """The problem of the learner's mode, implicit inner problems solved to ~machine precision."""
    common = dict(n=len(train), delta_reg=delta_reg, chunk=kwargs.pop("chunk", 16))
    if learner.cfg.mode == "implicit":
        opts = dict(inner_tol=1e-13, inner_max_iter=20000, cg_tol=1e-13, cg_max_iter=2000)
        opts.update(kwargs)
        return ImplicitProblem(learner, spec, train, test, **common, **opts)
    return UnrolledProblem(learner, spec, train, test, **common, **kwargs)


def task(batch: TaskBatch, k: int) -> tuple[Tensor, ...]:
    """``(x_spt, y_spt, u, x_qry, y_qry, v, w)`` of task ``k``."""
    return tuple(a[k] for a in batch.task_args()) + (batch.w[k],)


# ---------------------------------------------------------------------------------------
# reference mathematics
# ---------------------------------------------------------------------------------------
def ce(model: MetaModel, params: dict, x: Tensor, y: Tensor) -> Tensor:
    """Per-instance cross-entropy ``[B]``."""
    return F.cross_entropy(logits(model, params, x), y, reduction="none")


def wmean(values: Tensor, weights: Tensor) -> Tensor:
    return (weights * values).sum() / weights.shape[0]


def ref_adapt(learner: MetaLearner, spec: FlatSpec, theta: Tensor, x_spt, y_spt, u, steps: int | None = None) -> dict:
    """``K`` SGD steps of size ``alpha`` on the weighted support loss (ANIL: ``head.*`` only)."""
    cfg, model = learner.cfg, learner.model
    steps = cfg.inner_steps if steps is None else steps
    phi = spec.unflatten(theta)
    keys = [k for k in phi if k.startswith("head.")] if cfg.name == "anil" else list(phi)
    for _ in range(steps):
        sub = {k: phi[k] for k in keys}
        rest = {k: phi[k] for k in phi if k not in keys}
        g = grad(lambda s_: wmean(ce(model, {**rest, **s_}, x_spt, y_spt), u))(sub)
        phi = {**rest, **{k: sub[k] - cfg.inner_lr * g[k] for k in keys}}
    return phi


def ref_task_values(learner, spec, theta, x_spt, y_spt, u, x_qry, y_qry, steps=None) -> Tensor:
    """Per-query-instance losses after unrolled adaptation ``[Q]``."""
    return ce(learner.model, ref_adapt(learner, spec, theta, x_spt, y_spt, u, steps), x_qry, y_qry)


def ref_task_loss(learner, spec, theta, x_spt, y_spt, u, x_qry, y_qry, v, steps=None) -> Tensor:
    return wmean(ref_task_values(learner, spec, theta, x_spt, y_spt, u, x_qry, y_qry, steps), v)


def _vmap_tasks(fn: Callable, theta: Tensor, batch: TaskBatch, extra: tuple = ()):
    """``fn(theta, x_spt, y_spt, u, x_qry, y_qry, v, *extra)`` for every task, vmapped."""
    args = batch.task_args()
    return vmap(fn, in_dims=(None,) + (0,) * (len(args) + len(extra)))(theta, *args, *extra)


def ref_F_unrolled(learner, spec, batch: TaskBatch, delta_reg: float, index=None, steps=None) -> Callable:
    """``theta -> (1/|index|) sum_k w_k L_Q^k(theta) + (delta_reg/2)||theta||^2``."""
    sub = batch if index is None else batch[torch.as_tensor(index)]

    def one(th, x_spt, y_spt, u, x_qry, y_qry, v):
        return ref_task_loss(learner, spec, th, x_spt, y_spt, u, x_qry, y_qry, v, steps)

    def F_(theta: Tensor) -> Tensor:
        losses = _vmap_tasks(one, theta, sub)
        return (sub.w * losses).sum() / len(sub) + 0.5 * delta_reg * (theta ** 2).sum()

    return F_


def ref_f_unrolled(learner, spec, test: TaskBatch, steps=None) -> Callable:
    """The evaluation function: mean (v-weighted) query loss of the test tasks after adaptation."""

    def one(th, x_spt, y_spt, u, x_qry, y_qry, v):
        return ref_task_loss(learner, spec, th, x_spt, y_spt, u, x_qry, y_qry, v, steps)

    return lambda theta: _vmap_tasks(one, theta, test).mean()


def unrolled_objective(learner, spec, batch: TaskBatch, delta_reg: float) -> Callable:
    """``theta -> (F, grad F, hess F)`` by torch.func on the hand-built unrolled ``F``."""
    F_ = ref_F_unrolled(learner, spec, batch, delta_reg)
    gF, hF = grad(F_), hessian(F_)

    def fgh(theta: Tensor, need_hess: bool = True):
        return F_(theta).detach(), gF(theta), (hF(theta) if need_hess else None)

    return fgh


# -- implicit (iMAML) ---------------------------------------------------------------------
NEWTON_ITERS = 12


def ref_inner_solve(learner, spec, theta: Tensor, x_spt, y_spt, u, iters: int = NEWTON_ITERS) -> Tensor:
    """``argmin_phi (1/|S|) sum_j u_j l(phi; z_j) + (eta/2)||phi - theta||^2``: ``iters`` Newton
    steps from ``theta`` (vmap-safe; callers check the residual with :func:`ref_inner_residual`)."""
    model, eta = learner.model, learner.cfg.eta
    theta = theta.detach()

    def obj(p: Tensor) -> Tensor:
        return wmean(ce(model, spec.unflatten(p), x_spt, y_spt), u) + 0.5 * eta * ((p - theta) ** 2).sum()

    p = theta.clone()
    for _ in range(iters):
        p = p - torch.linalg.solve(hessian(obj)(p), grad(obj)(p))
    return p


def ref_inner_residual(learner, spec, theta, phi, x_spt, y_spt, u) -> Tensor:
    """``||grad of the proximal objective at phi||``."""
    g = grad(lambda p: wmean(ce(learner.model, spec.unflatten(p), x_spt, y_spt), u))(phi)
    return (g + learner.cfg.eta * (phi - theta)).norm()


def ref_implicit_parts(learner, spec, theta, x_spt, y_spt, u, x_qry, y_qry, v, with_hess: bool = False):
    """Dense implicit quantities of one task at the exact argmin (vmap-safe):
    ``(phi, L_Q, D_lam L_Q, residual[, exact total Hessian, J^T H_Q J])``."""
    model, eta = learner.model, learner.cfg.eta
    phi = ref_inner_solve(learner, spec, theta, x_spt, y_spt, u)
    inner = lambda p: wmean(ce(model, spec.unflatten(p), x_spt, y_spt), u)  # noqa: E731
    qloss = lambda p: wmean(ce(model, spec.unflatten(p), x_qry, y_qry), v)  # noqa: E731
    eye = torch.eye(phi.shape[-1], dtype=DT)
    hin = hessian(inner)(phi) + eta * eye
    gq = grad(qloss)(phi)
    j = eta * torch.linalg.inv(hin)  # J = d phi / d lam (symmetric)
    total = j @ gq
    res = ref_inner_residual(learner, spec, theta.detach(), phi, x_spt, y_spt, u)
    if not with_hess:
        return phi, qloss(phi), total, res
    q = torch.linalg.solve(hin, gq)
    hq = hessian(qloss)(phi)
    mq = hessian(lambda p: grad(inner)(p) @ q)(phi)  # d_phi (H_in(phi) q): the third-order term
    hess = j @ (hq - mq) @ j
    return phi, qloss(phi), total, res, (hess + hess.T) / 2, j @ hq @ j


def _check_residual(res: Tensor) -> None:
    if float(res.max()) > 1e-11:
        raise AssertionError(f"reference inner Newton did not converge: residual {float(res.max()):.2e}")


def ref_implicit_tasks(learner, spec, theta, batch: TaskBatch, with_hess: bool = False):
    """:func:`ref_implicit_parts` for every task of ``batch`` (stacked)."""
    out = _vmap_tasks(lambda th, *a: ref_implicit_parts(learner, spec, th, *a, with_hess=with_hess), theta, batch)
    _check_residual(out[3])
    return out


def ref_implicit_objective(learner, spec, batch: TaskBatch, delta_reg: float) -> Callable:
    """``theta -> (F, grad F, hess F)`` of the implicit meta-objective at exact inner solutions."""
    n = len(batch)
    keep = torch.nonzero(batch.w).squeeze(-1)
    sub = batch[keep]

    def fgh(theta: Tensor, need_hess: bool = True):
        out = ref_implicit_tasks(learner, spec, theta, sub, need_hess)
        w = sub.w
        f = (w * out[1]).sum() / n + 0.5 * delta_reg * (theta ** 2).sum()
        g = (w[:, None] * out[2]).sum(0) / n + delta_reg * theta
        h = None
        if need_hess:
            h = (w[:, None, None] * out[4]).sum(0) / n + delta_reg * torch.eye(len(theta), dtype=DT)
        return f.detach(), g.detach(), h

    return fgh


def ref_implicit_eval(learner, spec, test: TaskBatch) -> Callable:
    """``theta -> (f, D f)`` for implicit mode: mean test query loss at exact inner solutions."""

    def f(theta: Tensor):
        out = ref_implicit_tasks(learner, spec, theta, test)
        return out[1].mean().detach(), out[2].mean(0).detach()

    return f


# ---------------------------------------------------------------------------------------
# full-batch Newton trainer
# ---------------------------------------------------------------------------------------
def newton_minimize(fgh: Callable, theta0: Tensor, tol: float = 1e-10, max_iter: int = 50) -> tuple[Tensor, int]:
    """Damped Newton on ``F`` until ``||grad F|| < tol``; returns ``(theta*, iterations)``.

    ``fgh(theta, need_hess) -> (F, grad F, hess F or None)``. Eigenvalues of the Hessian are
    clipped from below (descent direction far from the optimum); Armijo backtracking on ``F``.
    """
    theta = theta0.detach().clone()
    f, g, h = fgh(theta, True)
    for it in range(max_iter):
        if float(g.norm()) < tol:
            return theta, it
        evals, evecs = torch.linalg.eigh(h)
        evals = evals.clamp_min(1e-3 * float(evals.abs().max()))
        step = evecs @ ((evecs.T @ g) / evals)
        t = 1.0
        while True:
            f2, g2, _ = fgh(theta - t * step, False)
            if f2 <= f - 1e-4 * t * float(g @ step) or g2.norm() < g.norm() or t < 1e-8:
                break
            t /= 2
        theta = theta - t * step
        f, g, h = fgh(theta, True)
    raise AssertionError(f"Newton did not converge: |grad F| = {float(g.norm()):.2e} after {max_iter} iterations")


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------
def spearman(a: Tensor, b: Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.detach().numpy(), b.detach().numpy()).statistic)


def pearson(a: Tensor, b: Tensor) -> float:
    return float(np.corrcoef(a.detach().numpy(), b.detach().numpy())[0, 1])


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))
