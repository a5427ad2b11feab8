"""Implicit-mode (iMAML) total derivatives and scores (method §2-3; paper Thm 4.1, Prop. 4.8).

For each task the inner problem is solved to ``inner_tol``; with ``H_in = grad2_phi L_I + eta I``
(``L_I`` the weighted support loss) and ``J = eta H_in^{-1}`` (symmetric):

- total gradient ``D_lam L = eta H_in^{-1} d_phi L_Q``;
- total-Hessian product, exact: ``eta H_in^{-1} [H_Q (J v) - T(J v, q)]`` with
  ``q = H_in^{-1} d_phi L_Q`` and ``T(x, y) = d_phi (x^T grad2 L_I y)`` (the third-order
  term, from the derivative of ``J``); ``no_third_order`` drops ``T``; ``gauss_newton``
  replaces ``H_Q`` by the logits' ``J_z^T H_z J_z`` (:mod:`gauss_newton`);
- support instance ``j`` (two stages): inner-IF ``-H_in^{-1} b_j / |S|`` with
  ``b_j = d_phi l(z_j)``, outer change ``P_j = a^T H_in^{-1} b_j`` and
  ``s^T D_lam P_j = eta r^T d_phi P_j`` with ``r = H_in^{-1} s``, where
  ``r^T d_phi P_j = t^T b_j + q^T H_j r - m^T b_j``, ``t = H_in^{-1} H_Q r``,
  ``m = H_in^{-1} T(q, r)`` (the third-order part, kept when ``support_third_order``).
  The score is ``-(w_k / (n |S|)) s^T D_lam P_j``.

Every inner linear system is solved by CG to ``cg_tol`` (``inner_solver="cg"``), or by a
per-task EK-FAC approximation of ``H_in`` with ``eta`` added to its eigenvalues
(``inner_solver="ekfac"``, :mod:`metaif_cli.influence.inner_ekfac`, paper section 5.1).
The worst relative residual of the CG solves and of the inner problems (gradient norm of
the proximal objective) is recorded in ``max_residual`` and reported in ``score.json``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp

from metaif_cli.influence import gauss_newton
from metaif_cli.influence.inner_ekfac import ekfac_inner_solver
from metaif_cli.influence.outer import instance_values, weighted_mean
from metaif_cli.influence.problem import Problem, UnitScores
from metaif_cli.influence.solvers import solve_cg
from metaif_cli.meta.implicit import inner_hvp
from metaif_cli.models.networks import logits
from metaif_cli.progress import bar as progress_bar

PHI_CACHE = 1024  # inner solutions kept per theta: enough for the evaluation and Hessian tasks


class ImplicitProblem(Problem):
    """iMAML's bilevel problem, task by task (CG with tolerances does not vmap)."""

    def __init__(self, *args, inner_tol: float = 1e-8, inner_max_iter: int = 500, cg_tol: float = 1e-8,
                 cg_max_iter: int = 200, support_third_order: bool = True, inner_solver: str = "cg",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inner_solver = inner_solver
        self.inner_tol, self.inner_max_iter = inner_tol, inner_max_iter
        self.cg_tol, self.cg_max_iter = cg_tol, cg_max_iter
        self.third = support_third_order
        self.max_residual = 0.0
        self._theta: Tensor | None = None
        self._phi: dict[tuple[str, int], Tensor] = {}

    # -- per-task pieces ------------------------------------------------------------------
    def _args(self, split: str, k: int) -> tuple[Tensor, ...]:
        batch = self.train if split == "train" else self.test
        return tuple(a[0] for a in batch[k].task_args())  # one task gathered (a PoolTasks converts its images)

    def phi(self, theta: Tensor, split: str, k: int) -> Tensor:
        """The inner solution of task ``k`` solved to ``inner_tol`` (cached per ``theta``)."""
        if self._theta is None or not torch.equal(self._theta, theta):
            self._theta, self._phi = theta.detach().clone(), {}
        if (split, k) not in self._phi:
            x_spt, y_spt, u = self._args(split, k)[:3]
            lam = self.spec.unflatten(theta.detach())
            eta, lr = self.learner.cfg.eta, self.learner.cfg.inner_lr

            def prox_grad(p: Tensor) -> Tensor:
                g = grad(lambda q: self.learner.inner_loss(self.spec.unflatten(q), x_spt, y_spt, u))(p)
                return g + eta * (p - theta.detach())

            p = self.spec.flatten(lam)
            for _ in range(self.inner_max_iter):
                g = prox_grad(p)
                if g.norm() <= self.inner_tol * (1 + p.norm()):
                    break
                p = (p - lr * g).detach()
            # the implicit derivatives hold at the exact argmin: record how far from it we are
            self.max_residual = max(self.max_residual, float(prox_grad(p).norm() / (1 + p.norm())))
            if len(self._phi) >= PHI_CACHE:  # memory: a [P] vector per task; the first ones (evaluation
                return p  # and Hessian tasks, reused by every product) stay, the unit pass's are not kept
            self._phi[(split, k)] = p
        return self._phi[(split, k)]

    def _solver(self, phi: Tensor, x_spt, y_spt, u):
        if self.inner_solver == "ekfac":
            return ekfac_inner_solver(self.learner.model, self.spec, phi, x_spt, y_spt, u, self.learner.cfg.eta)
        hin = inner_hvp(self.learner, self.spec.unflatten(phi), x_spt, y_spt, u)

        def solve(b: Tensor) -> Tensor:
            res = solve_cg(hin, b, 0.0, max_iter=self.cg_max_iter, tol=self.cg_tol)
            self.max_residual = max(self.max_residual, res.residual)
            return res.x
        return solve

    def _qvalues(self, x, y, kind="mean_loss"):
        return lambda p: instance_values(self.learner, self.spec.unflatten(p), x, y, kind)

    def _hess(self, fn, phi: Tensor, vec: Tensor) -> Tensor:
        """``grad2 fn(phi) vec`` for a scalar ``fn``."""
        return jvp(grad(fn), (phi,), (vec,))[1]

    def _third(self, phi: Tensor, x_spt, y_spt, u, a: Tensor, b: Tensor) -> Tensor:
        """``T(a, b) = d_phi (a^T grad2 L_I(phi) b)``."""
        inner = lambda p: self.learner.inner_loss(self.spec.unflatten(p), x_spt, y_spt, u)  # noqa: E731
        return grad(lambda p: jvp(grad(inner), (p,), (a,))[1] @ b)(phi)

    # -- Problem interface ------------------------------------------------------------------
    def _eval_terms(self, theta):
        """``(f_t, D f_t)`` for each evaluation task in turn."""
        eta = self.learner.cfg.eta
        for t in range(len(self.test)):
            x_spt, y_spt, u, x_qry, y_qry, v = self._args("test", t)
            phi = self.phi(theta, "test", t)
            f = lambda p: weighted_mean(self._qvalues(x_qry, y_qry, self.eval_kind)(p), v)  # noqa: E731
            yield f(phi).detach(), eta * self._solver(phi, x_spt, y_spt, u)(grad(f)(phi))

    def eval_grad(self, theta):
        values, grads = zip(*self._eval_terms(theta))
        return torch.stack(values), torch.stack(grads)

    def eval_mean_grad(self, theta):
        value, total = 0.0, None
        for f, g in self._eval_terms(theta):
            value, total = value + f, (g if total is None else total + g)
        return value / len(self.test), total / len(self.test)

    def _task_parts(self, theta, k):
        x_spt, y_spt, u, x_qry, y_qry, v = self._args("train", k)
        phi = self.phi(theta, "train", k)
        qloss = lambda p: weighted_mean(self._qvalues(x_qry, y_qry)(p), v)  # noqa: E731
        return phi, qloss, self._solver(phi, x_spt, y_spt, u), (x_spt, y_spt, u, x_qry, y_qry, v)

    def _hvp_sum(self, theta, vec, index, form):
        eta, out = self.learner.cfg.eta, torch.zeros_like(vec)
        for k in torch.as_tensor(index).tolist():
            phi, qloss, solve, (x_spt, y_spt, u, x_qry, _, v) = self._task_parts(theta, k)
            jv = eta * solve(vec)
            if form == "gauss_newton":
                z_fn = lambda p: logits(self.learner.model, self.spec.unflatten(p), x_qry)  # noqa: E731
                out += self.train.w[k] * eta * solve(gauss_newton.product(z_fn, phi, jv, v))
                continue
            inner = self._hess(qloss, phi, jv)
            if form == "exact":
                inner = inner - self._third(phi, x_spt, y_spt, u, jv, solve(grad(qloss)(phi)))
            out += self.train.w[k] * eta * solve(inner)
        return out

    def _gamma_sum(self, theta, index):
        total = theta.new_zeros(())
        for k in torch.as_tensor(index).tolist():
            phi, qloss, _, _ = self._task_parts(theta, k)
            total = total + self.train.w[k] * grad(qloss)(phi).abs().sum()
        return total

    def unit_scores(self, theta, s, index=None):
        eta, n = self.learner.cfg.eta, self.n
        index = torch.arange(len(self.train)) if index is None else torch.as_tensor(index)
        tasks, queries, supports = [], [], []
        for k in progress_bar(index.tolist(), desc="unit pass", unit="task", enabled=self.progress, leave=False):
            phi, qloss, solve, (x_spt, y_spt, u, x_qry, y_qry, v) = self._task_parts(theta, k)
            w = self.train.w[k]
            r = solve(s)
            d = eta * jvp(self._qvalues(x_qry, y_qry), (phi,), (r,))[1]  # [Q]: s^T D l_j
            tasks.append(weighted_mean(d, v) / n)
            queries.append(w * d / (n * v.shape[0]))
            if not self.support:
                supports.append(torch.full_like(u, float("nan")))
                continue
            q = solve(grad(qloss)(phi))
            t = solve(self._hess(qloss, phi, r))
            spt = self._qvalues(x_spt, y_spt)
            term = jvp(spt, (phi,), (t,))[1]
            term = term + jvp(lambda p: jvp(spt, (p,), (r,))[1], (phi,), (q,))[1]
            if self.third:
                term = term - jvp(spt, (phi,), (solve(self._third(phi, x_spt, y_spt, u, q, r)),))[1]
            supports.append(-w * eta * term / (n * u.shape[0]))
        return UnitScores(torch.stack(tasks), torch.stack(queries), torch.stack(supports))

    def weight_gradient(self, theta, task, role, position):
        eta, n = self.learner.cfg.eta, self.n
        phi, qloss, solve, (x_spt, y_spt, u, x_qry, y_qry, v) = self._task_parts(theta, task)
        w = self.train.w[task]
        if role is None:
            return eta * solve(grad(qloss)(phi)) / n
        if role == "query":
            lj = lambda p: self._qvalues(x_qry, y_qry)(p)[position]  # noqa: E731
            return w * eta * solve(grad(lj)(phi)) / (n * v.shape[0])
        lj = lambda p: self._qvalues(x_spt, y_spt)(p)[position]  # noqa: E731
        q = solve(grad(qloss)(phi))
        y = solve(grad(lj)(phi))
        dp = self._hess(qloss, phi, y) + self._hess(lj, phi, q)
        if self.third:
            dp = dp - self._third(phi, x_spt, y_spt, u, q, y)
        return -w * eta * solve(dp) / (n * u.shape[0])

    def task_losses(self, theta):
        return torch.stack([self._task_parts(theta, k)[1](self.phi(theta, "train", k)).detach()
                            for k in range(len(self.train))])
