"""``hessian.form=gauss_newton`` (method §2) against an explicit ``J^T H J`` (float64, tiny).

- unrolled (MAML, ANIL), Direct-IF (no adaptation) and implicit (iMAML): the dense matrix of
  the problem's products equals ``(1/m) sum_k w_k J_k^T H_k J_k + delta_reg I`` with ``J_k``
  built by ``torch.func.jacrev`` through an independent inner level, and is positive
  semi-definite;
- where the query residuals vanish (each query input repeated with every label, weighted by
  its predicted probabilities at ``lam``) it equals the exact total Hessian;
- with ``auto_damping`` the damping is ``hessian.damping * lambda_max(G)``.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import hessian, jacrev

import influence_helpers as H
from metaif_cli.influence import compute
from metaif_cli.influence.config import HessianConfig, SolverConfig
from metaif_cli.meta.tasks import TaskBatch
from metaif_cli.models.networks import logits
from metaif_cli.score.config import ScoreConfig

DT = torch.float64
DELTA_REG = 0.01
SHAPE = (1, 4, 4)


def dense(problem, theta, form, index=None) -> torch.Tensor:
    index = torch.arange(len(problem.train)) if index is None else torch.as_tensor(index)
    eye = torch.eye(len(theta), dtype=DT)
    return torch.stack([problem.hvp(theta, e, index, form) for e in eye], 1)


def softmax_hessian(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Block-diagonal Hessian of ``(1/Q) sum_j v_j CE(z_j, .)`` w.r.t. the flat logits ``[Q*C, Q*C]``."""
    p = torch.softmax(z, -1)
    blocks = [(v[j] / len(v)) * (torch.diag(p[j]) - torch.outer(p[j], p[j])) for j in range(len(v))]
    return torch.block_diag(*blocks)


def setup(meta: str, steps=None):
    model = H.make_model("mlp", hidden=3, layers=1, image_shape=SHAPE, ways=3, seed=0)
    learner = H.make_learner(model, meta, steps=2, lr=0.4, eta=2.0)
    spec, theta = H.lam_of(model, head_only=meta == "imaml")
    train = H.random_tasks(3, shots=2, queries=2, image_shape=SHAPE, seed=1)
    test = H.random_tasks(2, shots=2, queries=2, image_shape=SHAPE, seed=2)
    opts = {"steps": steps} if steps is not None else {}
    return model, learner, spec, theta, train, test, opts


def ref_jacobian(model, learner, spec, theta, x_spt, y_spt, u, x_qry, steps=None) -> torch.Tensor:
    """``d (query logits after adaptation) / d lam`` ``[Q*C, P]``, independent inner level."""
    if learner.cfg.mode == "implicit":
        phi = H.ref_inner_solve(learner, spec, theta, x_spt, y_spt, u)
        inner = lambda p: H.wmean(H.ce(model, spec.unflatten(p), x_spt, y_spt), u)  # noqa: E731
        eta = learner.cfg.eta
        jphi = eta * torch.linalg.inv(hessian(inner)(phi) + eta * torch.eye(len(phi), dtype=DT))
        return jacrev(lambda p: logits(model, spec.unflatten(p), x_qry).flatten())(phi) @ jphi
    return jacrev(lambda th: logits(model, H.ref_adapt(learner, spec, th, x_spt, y_spt, u, steps),
                                    x_qry).flatten())(theta)


def ref_logits(model, learner, spec, theta, x_spt, y_spt, u, x_qry, steps=None) -> torch.Tensor:
    if learner.cfg.mode == "implicit":
        phi = H.ref_inner_solve(learner, spec, theta, x_spt, y_spt, u)
        return logits(model, spec.unflatten(phi), x_qry)
    return logits(model, H.ref_adapt(learner, spec, theta, x_spt, y_spt, u, steps), x_qry)


def ref_gauss_newton(model, learner, spec, theta, batch, steps=None) -> torch.Tensor:
    total = torch.zeros(len(theta), len(theta), dtype=DT)
    for k in range(len(batch)):
        x_spt, y_spt, u, x_qry, y_qry, v, w = H.task(batch, k)
        j = ref_jacobian(model, learner, spec, theta, x_spt, y_spt, u, x_qry, steps)
        z = ref_logits(model, learner, spec, theta, x_spt, y_spt, u, x_qry, steps)
        total += w * j.T @ softmax_hessian(z, v) @ j
    return total / len(batch) + DELTA_REG * torch.eye(len(theta), dtype=DT)


CASES = [("maml", None), ("anil", None), ("maml", 0), ("imaml", None)]
IDS = ["maml", "anil", "direct", "imaml"]


@pytest.mark.parametrize("meta, steps", CASES, ids=IDS)
def test_gauss_newton_equals_explicit_jt_h_j_and_is_psd(meta, steps):
    model, learner, spec, theta, train, test, opts = setup(meta, steps)
    problem = H.make_problem(learner, spec, train, test, DELTA_REG, **opts)
    g = dense(problem, theta, "gauss_newton")
    ref = ref_gauss_newton(model, learner, spec, theta, train, steps)
    assert float((g - ref).norm() / ref.norm()) < 1e-9
    assert float((g - g.T).norm() / g.norm()) < 1e-10
    assert float(torch.linalg.eigvalsh((g + g.T) / 2).min()) >= DELTA_REG * (1 - 1e-8)


def residual_free(model, learner, spec, theta, batch: TaskBatch) -> TaskBatch:
    """Each query input repeated with every label ``c``, weight ``C p_c`` at ``lam``: ``dL/dz = 0``."""
    xs, ys, vs = [], [], []
    ways = int(batch.y_qry.max()) + 1
    for k in range(len(batch)):
        x_spt, y_spt, u, x_qry, *_ = H.task(batch, k)
        p = torch.softmax(ref_logits(model, learner, spec, theta, x_spt, y_spt, u, x_qry), -1).detach()
        xs.append(x_qry.repeat_interleave(ways, 0))
        ys.append(torch.arange(ways).repeat(len(x_qry)))
        vs.append(ways * p.flatten())
    return TaskBatch(batch.x_spt, batch.y_spt, batch.u, torch.stack(xs), torch.stack(ys), torch.stack(vs), batch.w)


@pytest.mark.parametrize("meta", ["maml", "imaml"])
def test_gauss_newton_equals_exact_where_query_residuals_vanish(meta):
    model, learner, spec, theta, train, test, opts = setup(meta)
    train = residual_free(model, learner, spec, theta, train)
    problem = H.make_problem(learner, spec, train, test, DELTA_REG, **opts)
    g = dense(problem, theta, "gauss_newton")
    exact = dense(problem, theta, "exact")
    assert float((g - exact).norm() / exact.norm()) < 1e-8
    # and the construction matters: with the original labels the two differ
    plain = H.make_problem(learner, spec, setup(meta)[4], test, DELTA_REG)
    gap = dense(plain, theta, "gauss_newton") - dense(plain, theta, "exact")
    assert float(gap.norm()) > 1e-3


def test_auto_damping_is_a_fraction_of_the_largest_eigenvalue():
    model, learner, spec, theta, train, test, opts = setup("anil")
    problem = H.make_problem(learner, spec, train, test, DELTA_REG)
    cfg = ScoreConfig(hessian=HessianConfig(form="gauss_newton", damping=0.05, auto_damping=True,
                                            lanczos_iters=len(theta)),
                      solver=SolverConfig(name="cg", tol=1e-10, max_iter=200), progress=False)
    b = problem.eval_grad(theta)[1].mean(0)
    res, curv = compute.solve_ihvp(problem, theta, b, cfg)
    g = dense(problem, theta, "gauss_newton")
    top = float(torch.linalg.eigvalsh((g + g.T) / 2)[-1])
    assert curv.damping == pytest.approx(0.05 * top, rel=1e-6)
    x = torch.linalg.solve(g + curv.damping * torch.eye(len(theta), dtype=DT), b)
    assert float((res.x - x).norm() / x.norm()) < 1e-8


def test_default_damping_follows_the_form():
    """Unset ``hessian.damping``: 0.1 of ``lambda_max`` for ``gauss_newton`` with ``auto_damping``
    (the default chosen by the LDS benchmark), 0.01 absolute otherwise; a set value is kept."""
    from metaif_cli.errors import MetaifError

    assert HessianConfig().damping is None and HessianConfig().base_damping() == 0.1
    assert HessianConfig(auto_damping=False).base_damping() == 0.01
    assert HessianConfig(form="exact").base_damping() == 0.01
    assert HessianConfig(damping=0.05).base_damping() == 0.05
    assert HessianConfig(form="exact", damping=0.0).base_damping() == 0.0
    with pytest.raises(MetaifError, match="hessian.damping"):
        HessianConfig(damping=-1.0)


def test_default_lanczos_steps_follow_the_form():
    """Unset ``hessian.lanczos_iters``: 8 steps choose the damping of ``gauss_newton`` with
    ``auto_damping`` (``lambda_max`` only), 20 for every other case; a set value is kept."""
    from metaif_cli.errors import MetaifError

    assert HessianConfig().lanczos_iters is None and HessianConfig().damping_iters() == 8
    assert HessianConfig(auto_damping=False).damping_iters() == 20
    assert HessianConfig(form="exact").damping_iters() == 20
    assert HessianConfig(lanczos_iters=5).damping_iters() == 5
    with pytest.raises(MetaifError, match="hessian.lanczos_iters"):
        HessianConfig(lanczos_iters=0)


def test_default_lanczos_steps_give_the_damping_and_solve_of_a_full_basis():
    """The 8-step default against ``len(theta)`` steps (exact Ritz values): the same damping to
    the accuracy of the largest Ritz value, and ``s`` equal to the dense solve at that damping."""
    model, learner, spec, theta, train, test, opts = setup("anil")
    problem = H.make_problem(learner, spec, train, test, DELTA_REG)
    b = problem.eval_grad(theta)[1].mean(0)
    solver = SolverConfig(name="cg", tol=1e-10, max_iter=200)
    short, curv_short = compute.solve_ihvp(problem, theta, b, ScoreConfig(solver=solver, progress=False))
    full, curv_full = compute.solve_ihvp(problem, theta, b, ScoreConfig(
        hessian=HessianConfig(lanczos_iters=len(theta)), solver=solver, progress=False))
    assert curv_short.damping <= curv_full.damping * (1 + 1e-9)  # Ritz values lie inside the spectrum
    assert curv_short.damping == pytest.approx(curv_full.damping, rel=0.05)
    g = dense(problem, theta, "gauss_newton")
    x = torch.linalg.solve(g + curv_short.damping * torch.eye(len(theta), dtype=DT), b)
    assert short.converged and float((short.x - x).norm() / x.norm()) < 1e-8
    assert float((short.x - full.x).norm() / full.x.norm()) < 0.05
