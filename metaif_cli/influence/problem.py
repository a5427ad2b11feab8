"""The weighted bilevel problem in flat coordinates: total gradients, total-Hessian products
and unit scores (method §1-3).

A problem holds the training tasks with their weights (``w``, ``u``, ``v``), the
evaluation tasks, and the meta-learner. ``theta`` is the flat vector of ``lam``.
Three derivative modes share one interface:

- ``unrolled`` (MAML, ANIL): autodiff through the ``K`` inner steps, exact for what was
  trained; HVPs forward-over-reverse;
- ``direct`` (baseline Direct-IF): no adaptation at all, ``phi = lam``;
- ``implicit`` (iMAML): see :mod:`metaif_cli.influence.implicit`.

Scores are ``s^T d_{w_e} grad_lam F`` for every unit ``e`` (method §3): for a task
``(1/n) s^T D L_Q^k``, for a query instance ``(w_k/(n|Q|)) s^T D l_j``, for a support
instance ``(w_k/n) d/du_j [s^T D L_Q^k]``: one forward-mode product per task gives the
task and all its query scores, one reverse pass over ``u`` all its support scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from metaif_cli.influence import gauss_newton
from metaif_cli.influence.outer import instance_values, weighted_mean
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.meta.params import FlatSpec
from metaif_cli.meta.tasks import TaskBatch
from metaif_cli.models.networks import logits
from metaif_cli.progress import bar as progress_bar
from metaif_cli.progress import finish, load_jvp_decompositions


@dataclass
class UnitScores:
    """``s^T d_{w_e} grad F`` for all units: ``task [n]``, ``query [n,Q]``, ``support [n,S]``."""

    task: Tensor
    query: Tensor
    support: Tensor


class Problem:
    """Shared state and task iteration; subclasses implement the per-task mathematics."""

    def __init__(self, learner: MetaLearner, spec: FlatSpec, train: TaskBatch, test: TaskBatch, *,
                 n: int, delta_reg: float, eval_kind: str = "mean_loss", chunk: int = 32,
                 support: bool = True) -> None:
        self.learner, self.spec, self.train, self.test = learner, spec, train, test
        self.n, self.delta_reg, self.eval_kind, self.chunk = n, delta_reg, eval_kind, chunk
        self.support = support  # False: unit_scores skips support instances (NaN), the costly part
        self.use_vmap = learner.cfg.vmap
        self.rank, self.world = 0, 1  # set by the caller under torchrun
        self.progress = False  # a bar over the unit pass (set by the caller)
        load_jvp_decompositions()  # before the first jvp: without torch's own deprecation warning

    def _reduce(self, local: Tensor) -> Tensor:
        """Sum a per-process partial result over all processes (identity without torchrun)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(local)
        return local

    def hvp(self, theta: Tensor, vec: Tensor, index: Tensor, form: str) -> Tensor:
        """``(1/|index|) sum_k w_k H_k vec + delta_reg vec`` over training tasks ``index``.

        Under torchrun each process sums its share of ``index`` and the parts are all-reduced.
        """
        index = torch.as_tensor(index)
        local = self._hvp_sum(theta, vec, index[self.rank :: self.world], form)
        return self._reduce(local) / len(index) + self.delta_reg * vec

    def gamma(self, theta: Tensor, index: Tensor) -> float:
        """``(1/|index|) sum_k w_k ||d_phi L_Q^k||_1`` (the paper's Gamma before the scale ``c``)."""
        index = torch.as_tensor(index)
        local = self._gamma_sum(theta, index[self.rank :: self.world])
        return float(self._reduce(local) / len(index))

    # -- iteration over tasks, vmapped in chunks where correct ------------------------------
    def map_tasks(self, fn: Callable, batch: TaskBatch, *shared: Tensor, index: Sequence[int] | Tensor | None = None,
                  with_weight: bool = False, desc: str | None = None) -> list:
        """Apply ``fn(*shared, *task_args[, w])`` to every task (or ``index``); stack outputs.

        ``desc``: show a bar (in tasks) under that name when ``self.progress`` is set.
        """
        return _cat(list(self._chunks(fn, batch, shared, index, with_weight, desc)))

    def sum_tasks(self, fn: Callable, batch, *shared: Tensor, index: Sequence[int] | Tensor | None = None,
                  with_weight: bool = False) -> Tensor | tuple:
        """``sum_k fn(...)`` over the tasks, added chunk by chunk: memory of one chunk's outputs, never ``[n, P]``.

        Equal to ``map_tasks(...).sum(0)`` bit for bit when the tasks fit one chunk, else to rounding.
        """
        total = None
        for out in self._chunks(fn, batch, shared, index, with_weight, None):
            part = tuple(o.sum(0) for o in out) if isinstance(out, tuple) else out.sum(0)
            if total is None:
                total = part
            else:
                total = tuple(a + b for a, b in zip(total, part)) if isinstance(part, tuple) else total + part
        return total

    def _chunks(self, fn: Callable, batch, shared: tuple, index, with_weight: bool, desc: str | None):
        """``fn`` on ``self.chunk`` tasks at a time; ``batch`` (a TaskBatch or a PoolTasks) gathers each chunk."""
        idx = torch.arange(len(batch)) if index is None else torch.as_tensor(index)
        bar = progress_bar(total=len(idx), desc=desc, unit="task", enabled=bool(desc) and self.progress, leave=False)
        for start in range(0, len(idx), self.chunk):
            part = batch[idx[start : start + self.chunk].to(batch.w.device)]
            args = part.task_args() + ((part.w,) if with_weight else ())
            if self.use_vmap:
                yield vmap(fn, in_dims=(None,) * len(shared) + (0,) * len(args))(*shared, *args)
            else:
                rows = [fn(*shared, *(a[i] for a in args)) for i in range(len(part))]
                yield _stack(rows)
            bar.update(len(part))
        finish(bar)

    # -- to implement -----------------------------------------------------------------------
    def eval_grad(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Per-evaluation-task ``f_t`` ``[T]`` and total gradients ``D f_t`` ``[T, P]``
        (``evaluation.kind=per_task`` and tests; otherwise :meth:`eval_mean_grad`)."""
        raise NotImplementedError

    def eval_mean_grad(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``f = mean_t f_t`` (0-d) and ``D f`` ``[P]``, accumulated task chunk by chunk (no ``[T, P]``)."""
        raise NotImplementedError

    def _hvp_sum(self, theta: Tensor, vec: Tensor, index: Tensor, form: str) -> Tensor:
        """``sum_{k in index} w_k H_k vec`` (``form``: ``exact``, ``no_third_order`` or ``gauss_newton``)."""
        raise NotImplementedError

    def _gamma_sum(self, theta: Tensor, index: Tensor) -> Tensor:
        """``sum_{k in index} w_k ||d_phi L_Q^k||_1`` as a 0-d tensor."""
        raise NotImplementedError

    def unit_scores(self, theta: Tensor, s: Tensor, index: Tensor | None = None) -> UnitScores:
        """``s^T d_{w_e} grad F`` for every task and instance of ``index`` (default all).

        Support scores are NaN when ``self.support`` is false: their reverse pass over ``u``
        costs about twice the forward-mode product that gives the task and query scores.
        """
        raise NotImplementedError

    def weight_gradient(self, theta: Tensor, task: int, role: str | None, position: int | None) -> Tensor:
        """``d_{w_e} grad_lam F`` for one unit (flat ``[P]``): input of ``pred_delta_lam``."""
        raise NotImplementedError

    def task_losses(self, theta: Tensor) -> Tensor:
        """``L_Q^k`` after adaptation for every training task ``[n]`` (the ``loss`` baseline)."""
        raise NotImplementedError


class UnrolledProblem(Problem):
    """MAML/ANIL (``steps=None``: the trained inner loop) or Direct-IF (``steps=0``)."""

    def __init__(self, *args, steps: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = steps

    def _phi(self, theta, x_spt, y_spt, u) -> Tensor:
        return self.spec.flatten(self.learner.adapt(self.spec.unflatten(theta), x_spt, y_spt, u, self.steps))

    def _values(self, theta, x_spt, y_spt, u, x, y, kind="mean_loss") -> Tensor:
        """Per-instance outer values after adaptation, ``[Q]``."""
        phi = self.learner.adapt(self.spec.unflatten(theta), x_spt, y_spt, u, self.steps)
        return instance_values(self.learner, phi, x, y, kind)

    def _task_loss(self, theta, x_spt, y_spt, u, x_qry, y_qry, v, kind="mean_loss") -> Tensor:
        return weighted_mean(self._values(theta, x_spt, y_spt, u, x_qry, y_qry, kind), v)

    def _eval_value_and_grad(self, th, x_spt, y_spt, u, x_qry, y_qry, v):
        """``(f_t, D f_t)`` of one test task, the evaluation kind of this problem."""
        g, value = torch.func.grad_and_value(self._task_loss)(th, x_spt, y_spt, u, x_qry, y_qry, v, self.eval_kind)
        return value, g

    def eval_grad(self, theta):
        values, grads = self.map_tasks(self._eval_value_and_grad, self.test, theta)
        return values, grads

    def eval_mean_grad(self, theta):
        value, g = self.sum_tasks(self._eval_value_and_grad, self.test, theta)
        return value / len(self.test), g / len(self.test)

    def _task_hvp(self, form: str) -> Callable:
        if form == "gauss_newton":
            def gn(th, vec, x_spt, y_spt, u, x_qry, y_qry, v, w):
                z_fn = lambda t: logits(self.learner.model, self.learner.adapt(  # noqa: E731
                    self.spec.unflatten(t), x_spt, y_spt, u, self.steps), x_qry)
                return w * gauss_newton.product(z_fn, th, vec, v)
            return gn
        if form == "exact":
            def exact(th, vec, x_spt, y_spt, u, x_qry, y_qry, v, w):
                return w * jvp(lambda t: grad(self._task_loss)(t, x_spt, y_spt, u, x_qry, y_qry, v), (th,), (vec,))[1]
            return exact

        def gauss(th, vec, x_spt, y_spt, u, x_qry, y_qry, v, w):
            # J^T (d2_phi L_Q) J vec: the no-third-order total Hessian (method §2)
            phi_fn = lambda t: self._phi(t, x_spt, y_spt, u)  # noqa: E731
            phi, jv = jvp(phi_fn, (th,), (vec,))
            qloss = lambda p: weighted_mean(  # noqa: E731
                instance_values(self.learner, self.spec.unflatten(p), x_qry, y_qry), v)
            hq = jvp(grad(qloss), (phi,), (jv,))[1]
            return w * vjp(phi_fn, th)[1](hq)[0]
        return gauss

    def _hvp_sum(self, theta, vec, index, form):
        if len(index) == 0:
            return torch.zeros_like(vec)
        return self.sum_tasks(self._task_hvp(form), self.train, theta, vec, index=index, with_weight=True)

    def _gamma_sum(self, theta, index):
        def l1(th, x_spt, y_spt, u, x_qry, y_qry, v, w):
            phi = self._phi(th, x_spt, y_spt, u)
            qloss = lambda p: weighted_mean(  # noqa: E731
                instance_values(self.learner, self.spec.unflatten(p), x_qry, y_qry), v)
            return w * grad(qloss)(phi).abs().sum()
        if len(index) == 0:
            return theta.new_zeros(())
        return self.sum_tasks(l1, self.train, theta, index=index, with_weight=True)

    def unit_scores(self, theta, s, index=None):
        n = self.n
        direct = self.steps == 0

        def one(th, sv, x_spt, y_spt, u, x_qry, y_qry, v, w):
            q = v.shape[0]

            def directional(u_):
                d = jvp(lambda t: self._values(t, x_spt, y_spt, u_, x_qry, y_qry), (th,), (sv,))[1]  # [Q]
                return weighted_mean(d, v), d

            if direct:  # Direct-IF: support instances scored like training points at lam
                task_dir, d = directional(u)
                ds = jvp(lambda t: self.learner.instance_losses(self.spec.unflatten(t), x_spt, y_spt), (th,), (sv,))[1]
                support = w * ds / (n * u.shape[0])
            elif self.support:
                gu, (task_dir, d) = torch.func.grad_and_value(directional, has_aux=True)(u)
                support = w * gu / n
            else:
                task_dir, d = directional(u)
                support = torch.full_like(u, float("nan"))
            return task_dir / n, w * d / (n * q), support

        task, query, support = self.map_tasks(one, self.train, theta, s, index=index, with_weight=True,
                                              desc="unit pass")
        return UnitScores(task, query, support)

    def weight_gradient(self, theta, task, role, position):
        t = self.train[task]
        args = [a[0] for a in t.task_args()]
        w, n = t.w[0], self.n
        if role is None:
            return grad(self._task_loss)(theta, *args) / n
        x_spt, y_spt, u, x_qry, y_qry, v = args
        if role == "query":
            return w * grad(lambda th: self._values(th, x_spt, y_spt, u, x_qry, y_qry)[position])(theta) / (n * v.shape[0])
        if self.steps == 0:
            loss_j = lambda th: self.learner.instance_losses(self.spec.unflatten(th), x_spt, y_spt)[position]  # noqa
            return w * grad(loss_j)(theta) / (n * u.shape[0])
        e = torch.zeros_like(u)
        e[position] = 1.0
        g_of_u = lambda u_: grad(self._task_loss)(theta, x_spt, y_spt, u_, x_qry, y_qry, v)  # noqa: E731
        return w * jvp(g_of_u, (u,), (e,))[1] / n

    def task_losses(self, theta):
        def one(th, x_spt, y_spt, u, x_qry, y_qry, v):
            return self._task_loss(th, x_spt, y_spt, u, x_qry, y_qry, v).detach()
        return self.map_tasks(one, self.train, theta)


def _stack(rows: list):
    if isinstance(rows[0], tuple):
        return tuple(torch.stack([r[i] for r in rows]) for i in range(len(rows[0])))
    return torch.stack(rows)


def _cat(parts: list):
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)
