"""Influence functions (method §2-3) against independent float64 references.

- total gradients = central finite differences of the meta-objective (unrolled; implicit with
  the inner problem solved by Newton to machine precision);
- total-Hessian products (exact, no third order, Gamma) = dense ``torch.func`` Hessians of a
  hand-built ``F`` (implicit: dense implicit-function formulas and finite differences);
- every iHVP solver = the dense solve on the real problem's HVP, with the true residual;
- unit scores = their explicit formulas, ``s^T weight_gradient`` = score, loop = vmap;
- scores and predicted parameter changes = real leave-one-out retraining to convergence on
  a strongly convex problem (fixed random body, meta-learned head, outer L2);
- Direct-IF = the classic influence function by hand; error handling.

The helpers in ``influence_helpers.py`` re-implement the mathematics of docs/method.md; only the
network forward pass is shared with the code under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import pytest
import torch
from torch.func import grad, hessian, jacrev

import influence_helpers as H
from metaif_cli.errors import MetaifError
from metaif_cli.influence import compute
from metaif_cli.influence.problem import UnitScores, UnrolledProblem
from metaif_cli.influence.config import HessianConfig, SolverConfig
from metaif_cli.score.config import ScoreConfig

DT = torch.float64
DELTA_REG = 0.01


def score_cfg(form: str = "exact", damping: float = 0.0, solver: str = "dense", gamma_scale: float = 1.0,
              num_tasks: int | None = None, auto_damping: bool = False, seed: int = 0, **solver_kw) -> ScoreConfig:
    """A score config with the damping given exactly (``auto_damping`` off unless asked)."""
    solver_kw.setdefault("tol", 1e-8)
    hess = HessianConfig(form=form, damping=damping, gamma_scale=gamma_scale, num_tasks=num_tasks,
                         auto_damping=auto_damping)
    return ScoreConfig(hessian=hess, solver=SolverConfig(name=solver, **solver_kw), seed=seed, progress=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm())


def rand_vec(p: int, seed: int) -> torch.Tensor:
    v = torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return v / v.norm()


# ---------------------------------------------------------------------------------------
# setups
# ---------------------------------------------------------------------------------------
UNROLLED = {
    "maml-mlp": ("maml", dict(name="mlp", hidden=4, layers=1)),
    "anil-mlp": ("anil", dict(name="mlp", hidden=4, layers=1)),
    "maml-cnn4bn": ("maml", dict(name="cnn4", norm="batch", hidden=2, layers=2)),
    "anil-cnn4bn": ("anil", dict(name="cnn4", norm="batch", hidden=2, layers=2)),
}


@dataclass
class Setup:
    learner: object
    spec: object
    theta: torch.Tensor
    train: object
    test: object
    problem: object
    cache: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.train)


@lru_cache(maxsize=None)
def unrolled_setup(key: str, vmap: bool = True) -> Setup:
    """3 training tasks with random weights in [0.5, 1.5], 2 test tasks, 3-way 2-shot 3-query, K=2."""
    meta, arch = UNROLLED[key]
    model = H.make_model(**arch, seed=0)
    learner = H.make_learner(model, meta, steps=2, lr=0.4, vmap=vmap)
    spec, theta = H.lam_of(model)
    train, test = H.random_tasks(3, seed=1), H.random_tasks(2, seed=2)
    # chunk=2: vmap over a chunk of 2 and a chunk of 1
    problem = H.make_problem(learner, spec, train, test, DELTA_REG, chunk=2)
    return Setup(learner, spec, theta, train, test, problem)


@lru_cache(maxsize=None)
def implicit_setup() -> Setup:
    """iMAML on the head of a fixed random mlp body (smooth, strongly convex inner problems)."""
    model = H.make_model("mlp", hidden=8, layers=1, seed=0)
    learner = H.make_learner(model, "imaml", lr=0.5, eta=1.0)
    spec, theta = H.lam_of(model, head_only=True)
    theta = theta + 0.3 * torch.randn(len(theta), generator=torch.Generator().manual_seed(5), dtype=DT)
    train, test = H.random_tasks(3, seed=1), H.random_tasks(2, seed=2)
    problem = H.make_problem(learner, spec, train, test, DELTA_REG, inner_tol=1e-12, cg_tol=1e-12)
    return Setup(learner, spec, theta, train, test, problem)


def ref_unrolled_hessian(st: Setup, index: tuple[int, ...] | None) -> torch.Tensor:
    key = ("hess", index)
    if key not in st.cache:
        st.cache[key] = hessian(H.ref_F_unrolled(st.learner, st.spec, st.train, DELTA_REG, index))(st.theta)
    return st.cache[key]


@pytest.fixture(scope="module", params=list(UNROLLED))
def unrolled(request) -> Setup:
    return unrolled_setup(request.param)


@pytest.fixture(scope="module")
def implicit() -> Setup:
    return implicit_setup()


# ---------------------------------------------------------------------------------------
# 1. total gradients
# ---------------------------------------------------------------------------------------
def test_unrolled_eval_grad_matches_finite_differences(unrolled):
    st = unrolled
    values, grads = st.problem.eval_grad(st.theta)  # [T], [T, P]
    assert values.shape == (len(st.test),) and grads.shape == (len(st.test), len(st.theta))
    eps = 1e-6
    for t in range(len(st.test)):
        f_t = lambda th: H.ref_task_loss(st.learner, st.spec, th, *H.task(st.test, t)[:6])  # noqa: E731
        assert float(values[t]) == pytest.approx(float(f_t(st.theta)), rel=1e-12)
        torch.testing.assert_close(grads[t], grad(f_t)(st.theta), rtol=1e-9, atol=1e-12)
        for seed in range(3):
            v = rand_vec(len(st.theta), seed)
            fd = float(f_t(st.theta + eps * v) - f_t(st.theta - eps * v)) / (2 * eps)
            assert float(grads[t] @ v) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_implicit_eval_grad_matches_finite_differences_of_exact_inner_solution(implicit):
    st = implicit
    values, grads = st.problem.eval_grad(st.theta)
    ref = H.ref_implicit_tasks(st.learner, st.spec, st.theta, st.test)
    torch.testing.assert_close(values, ref[1], rtol=1e-10, atol=1e-12)
    eps = 1e-5
    for seed in range(3):
        v = rand_vec(len(st.theta), seed)
        fp = H.ref_implicit_tasks(st.learner, st.spec, st.theta + eps * v, st.test)[1]
        fm = H.ref_implicit_tasks(st.learner, st.spec, st.theta - eps * v, st.test)[1]
        torch.testing.assert_close(grads @ v, (fp - fm) / (2 * eps), rtol=1e-7, atol=1e-10)
    assert st.problem.max_residual <= 1e-11


# ---------------------------------------------------------------------------------------
# 2. total-Hessian products
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [None, (2, 0)], ids=["all", "subset"])
def test_unrolled_exact_hvp_matches_dense_hessian(unrolled, index):
    st = unrolled
    hd = ref_unrolled_hessian(st, index)
    idx = torch.arange(st.n) if index is None else torch.tensor(index)
    for seed in range(2):
        v = rand_vec(len(st.theta), seed)
        hv = st.problem.hvp(st.theta, v, idx, "exact")
        assert rel(hv, hd @ v) < 1e-9


def test_unrolled_exact_hvp_matches_finite_differences(unrolled):
    """The the known trap of method §2: batch norm under third-order derivatives; check H v against FD of grad F."""
    st = unrolled
    g = grad(H.ref_F_unrolled(st.learner, st.spec, st.train, DELTA_REG))
    v, eps = rand_vec(len(st.theta), 7), 1e-5
    fd = (g(st.theta + eps * v) - g(st.theta - eps * v)) / (2 * eps)
    assert rel(st.problem.hvp(st.theta, v, torch.arange(st.n), "exact"), fd) < 1e-6


def _gauss_newton_and_gamma(st: Setup, index: tuple[int, ...]) -> tuple[torch.Tensor, float]:
    """``(1/|index|) sum_k w_k J_k^T H_Q^k J_k + delta_reg I`` and ``mean_k w_k ||d_phi L_Q^k||_1``."""
    p = len(st.theta)
    gn, gam = DELTA_REG * torch.eye(p, dtype=DT), 0.0
    for k in index:
        x_spt, y_spt, u, x_qry, y_qry, v, w = H.task(st.train, k)
        adapt = lambda th: st.spec.flatten(H.ref_adapt(st.learner, st.spec, th, x_spt, y_spt, u))  # noqa: E731
        j = jacrev(adapt)(st.theta)  # [P, P]
        phi = adapt(st.theta)
        qloss = lambda ph: H.wmean(H.ce(st.learner.model, st.spec.unflatten(ph), x_qry, y_qry), v)  # noqa: E731
        gn = gn + w * j.T @ hessian(qloss)(phi) @ j / len(index)
        gam += float(w * grad(qloss)(phi).abs().sum()) / len(index)
    return gn, gam


@pytest.mark.parametrize("index", [(0, 1, 2), (1, 2)], ids=["all", "subset"])
def test_unrolled_no_third_order_and_gamma_forms(unrolled, index):
    st = unrolled
    gn, gam = _gauss_newton_and_gamma(st, index)
    idx = torch.tensor(index)
    v = rand_vec(len(st.theta), 3)
    assert rel(st.problem.hvp(st.theta, v, idx, "no_third_order"), gn @ v) < 1e-9
    assert st.problem.gamma(st.theta, idx) == pytest.approx(gam, rel=1e-10)
    c = 0.37
    hvp, _, gamma = compute.make_hvp(st.problem, st.theta, score_cfg(form="gamma", gamma_scale=c), idx)
    assert gamma == pytest.approx(c * gam, rel=1e-10)
    assert rel(hvp(v), gn @ v + c * gam * v) < 1e-9
    # the exact form really differs here (third-order terms are not negligible)
    assert rel(st.problem.hvp(st.theta, v, idx, "exact"), gn @ v) > 1e-3


@pytest.mark.parametrize("index", [(0, 1, 2), (2, 0)], ids=["all", "subset"])
def test_implicit_hvp_forms(implicit, index):
    st = implicit
    sub = st.train[torch.tensor(index)]
    fgh = H.ref_implicit_objective(st.learner, st.spec, sub, DELTA_REG)
    _, _, h_ref = fgh(st.theta)
    out = H.ref_implicit_tasks(st.learner, st.spec, st.theta, sub, with_hess=True)
    w = sub.w
    gn = (w[:, None, None] * out[5]).sum(0) / len(index) + DELTA_REG * torch.eye(len(st.theta), dtype=DT)
    idx = torch.tensor(index)
    v, eps = rand_vec(len(st.theta), 1), 1e-5
    hv = st.problem.hvp(st.theta, v, idx, "exact")
    assert rel(hv, h_ref @ v) < 1e-9
    fd = (fgh(st.theta + eps * v, False)[1] - fgh(st.theta - eps * v, False)[1]) / (2 * eps)
    assert rel(hv, fd) < 1e-7
    assert rel(st.problem.hvp(st.theta, v, idx, "no_third_order"), gn @ v) < 1e-9
    gq = torch.stack([grad(lambda p: H.wmean(H.ce(st.learner.model, st.spec.unflatten(p), *H.task(sub, i)[3:5]),
                                                 H.task(sub, i)[5]))(out[0][i]) for i in range(len(index))])
    gam = float((w * gq.abs().sum(1)).sum() / len(index))
    assert st.problem.gamma(st.theta, idx) == pytest.approx(gam, rel=1e-9)
    assert rel(hv, gn @ v) > 1e-4  # the third-order term matters


# ---------------------------------------------------------------------------------------
# 3. iHVP solvers on the real problem
# ---------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def solver_case() -> tuple[Setup, torch.Tensor, torch.Tensor, float]:
    """maml-mlp: dense H (reference), b = D f, and a damping giving a condition number ~5."""
    st = unrolled_setup("maml-mlp")
    hd = ref_unrolled_hessian(st, None)
    ev = torch.linalg.eigvalsh(hd)
    damping = max(0.0, -float(ev[0])) + 0.5 * float(ev.abs().max())
    b = st.problem.eval_grad(st.theta)[1].mean(0)
    return st, hd, b, damping


def _true_residual(hd, damping, x, b) -> float:
    return float(((hd + damping * torch.eye(len(b), dtype=DT)) @ x - b).norm() / b.norm())


@pytest.mark.parametrize("name, kw, tol", [
    ("dense", {}, 1e-10),
    ("cg", dict(max_iter=500, tol=1e-11), 1e-8),
    ("neumann", dict(terms=150, tol=1e-8), 1e-7),
])
def test_solvers_match_dense_on_real_hvp(name, kw, tol):
    st, hd, b, damping = solver_case()
    x_ref = torch.linalg.solve(hd + damping * torch.eye(len(b), dtype=DT), b)
    res, _ = compute.solve_ihvp(st.problem, st.theta, b, score_cfg(damping=damping, solver=name, **kw))
    assert rel(res.x, x_ref) < tol
    assert res.converged and res.method == name
    assert res.residual == pytest.approx(_true_residual(hd, damping, res.x, b), rel=1e-3, abs=1e-12)


def test_lissa_loose_and_exact_when_not_subsampled():
    st, hd, b, damping = solver_case()
    x_ref = torch.linalg.solve(hd + damping * torch.eye(len(b), dtype=DT), b)
    cfg = score_cfg(damping=damping, solver="lissa", depth=60, repeats=3, lissa_tasks=2, tol=1.0,
                    allow_unconverged=True)
    res, _ = compute.solve_ihvp(st.problem, st.theta, b, cfg)
    assert rel(res.x, x_ref) < 0.5 and H.cosine(res.x, x_ref) > 0.9
    assert res.residual == pytest.approx(_true_residual(hd, damping, res.x, b), rel=1e-8)
    # all tasks in every step: LiSSA is the Neumann series
    full = score_cfg(damping=damping, solver="lissa", depth=79, repeats=1, lissa_tasks=st.n, tol=1e-5)
    neu = score_cfg(damping=damping, solver="neumann", terms=80, tol=1e-5)
    x_l = compute.solve_ihvp(st.problem, st.theta, b, full)[0].x
    x_n = compute.solve_ihvp(st.problem, st.theta, b, neu)[0].x
    assert rel(x_l, x_n) < 1e-10 and rel(x_l, x_ref) < 1e-5


def test_unconverged_solver_reports_its_true_residual():
    st, hd, b, damping = solver_case()
    res, _ = compute.solve_ihvp(st.problem, st.theta, b, score_cfg(damping=damping, solver="neumann", terms=5,
                                                                   allow_unconverged=True))
    true = _true_residual(hd, damping, res.x, b)
    assert not res.converged and true > 1e-2
    assert res.residual == pytest.approx(true, rel=1e-8)


def test_hessian_subsample_uses_its_tasks():
    st, _, b, _ = solver_case()
    cfg = score_cfg(damping=0.5, num_tasks=2, seed=3)
    idx = compute.hessian_index(st.n, cfg)
    assert len(idx) == 2
    hd = ref_unrolled_hessian(st, tuple(idx.tolist()))
    x = compute.solve_ihvp(st.problem, st.theta, b, cfg)[0].x
    assert rel(x, torch.linalg.solve(hd + 0.5 * torch.eye(len(b), dtype=DT), b)) < 1e-9


def test_auto_damping_makes_the_damped_hessian_positive_definite():
    st, hd, b, _ = solver_case()
    lam_min = float(torch.linalg.eigvalsh(hd)[0])
    assert lam_min < 0  # indefinite at this (untrained) theta
    cfg = score_cfg(damping=0.05, auto_damping=True, solver="cg", max_iter=1000, tol=1e-10)
    res, curv = compute.solve_ihvp(st.problem, st.theta, b, cfg)
    assert curv.eigenvalue_min >= lam_min - 1e-9  # Ritz values lie inside the spectrum
    assert curv.damping == pytest.approx(0.05 + 2.0 * max(0.0, -curv.eigenvalue_min), rel=1e-12)
    x_ref = torch.linalg.solve(hd + curv.damping * torch.eye(len(b), dtype=DT), b)
    assert rel(res.x, x_ref) < 1e-8


# ---------------------------------------------------------------------------------------
# 4. unit scores against explicit formulas
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["maml-mlp", "anil-cnn4bn"])
def test_unrolled_unit_scores_explicit_formulas(key):
    st = unrolled_setup(key)
    s = rand_vec(len(st.theta), 11)
    sc = st.problem.unit_scores(st.theta, s)
    n, eps = st.n, 1e-5
    assert sc.task.shape == (n,) and sc.query.shape == (n, 9) and sc.support.shape == (n, 6)
    for k in range(n):
        x_spt, y_spt, u, x_qry, y_qry, v, w = H.task(st.train, k)
        loss_u = lambda th, u_: H.ref_task_loss(st.learner, st.spec, th, x_spt, y_spt, u_, x_qry, y_qry, v)  # noqa
        assert float(sc.task[k]) == pytest.approx(float(s @ grad(loss_u)(st.theta, u)) / n, rel=1e-9, abs=1e-14)
        jac = jacrev(lambda th: H.ref_task_values(st.learner, st.spec, th, x_spt, y_spt, u, x_qry, y_qry))(st.theta)
        torch.testing.assert_close(sc.query[k], w * (jac @ s) / (n * len(v)), rtol=1e-9, atol=1e-14)
        for j in range(len(u)):
            e = torch.zeros_like(u)
            e[j] = eps
            fd = float(s @ grad(loss_u)(st.theta, u + e) - s @ grad(loss_u)(st.theta, u - e)) / (2 * eps)
            assert float(sc.support[k, j]) == pytest.approx(float(w) * fd / n, rel=1e-6, abs=1e-11)
    part = st.problem.unit_scores(st.theta, s, index=torch.tensor([2, 0]))
    torch.testing.assert_close(part.task, sc.task[[2, 0]], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(part.support, sc.support[[2, 0]], rtol=1e-12, atol=1e-15)


def test_implicit_unit_scores_explicit_formulas(implicit):
    st = implicit
    s = rand_vec(len(st.theta), 12)
    sc = st.problem.unit_scores(st.theta, s)
    n, eps, eta = st.n, 1e-5, st.learner.cfg.eta
    model = st.learner.model
    for k in range(n):
        x_spt, y_spt, u, x_qry, y_qry, v, w = H.task(st.train, k)

        def total(u_):
            out = H.ref_implicit_parts(st.learner, st.spec, st.theta, x_spt, y_spt, u_, x_qry, y_qry, v)
            assert float(out[3]) < 1e-11
            return out

        phi, _, dl, _ = total(u)
        assert float(sc.task[k]) == pytest.approx(float(s @ dl) / n, rel=1e-9, abs=1e-14)
        hin = hessian(lambda p: H.wmean(H.ce(model, st.spec.unflatten(p), x_spt, y_spt), u))(phi)
        hin = hin + eta * torch.eye(len(phi), dtype=DT)
        jl = jacrev(lambda p: H.ce(model, st.spec.unflatten(p), x_qry, y_qry))(phi)  # [Q, P]: d_phi l_j
        d_query = jl @ torch.linalg.solve(hin, eta * s)  # s^T D l_j (J symmetric)
        torch.testing.assert_close(sc.query[k], w * d_query / (n * len(v)), rtol=1e-9, atol=1e-14)
        for j in range(len(u)):
            e = torch.zeros_like(u)
            e[j] = eps
            fd = float(s @ total(u + e)[2] - s @ total(u - e)[2]) / (2 * eps)
            assert float(sc.support[k, j]) == pytest.approx(float(w) * fd / n, rel=1e-6, abs=1e-11)


@pytest.mark.parametrize("mode", ["maml-mlp", "anil-cnn4bn", "implicit", "direct"])
def test_weight_gradient_consistent_with_unit_scores(mode):
    if mode == "implicit":
        st = implicit_setup()
        problem = st.problem
    else:
        st = unrolled_setup("maml-mlp" if mode == "direct" else mode)
        problem = st.problem if mode != "direct" else UnrolledProblem(
            st.learner, st.spec, st.train, st.test, n=st.n, delta_reg=DELTA_REG, steps=0)
    s = rand_vec(len(st.theta), 13)
    sc = problem.unit_scores(st.theta, s)
    for k in range(st.n):
        g = problem.weight_gradient(st.theta, k, None, None)
        assert float(s @ g) == pytest.approx(float(sc.task[k]), rel=1e-8, abs=1e-13)
        for j in (0, 4):
            g = problem.weight_gradient(st.theta, k, "query", j)
            assert float(s @ g) == pytest.approx(float(sc.query[k, j]), rel=1e-8, abs=1e-13)
        for j in (1, 5):
            g = problem.weight_gradient(st.theta, k, "support", j)
            assert float(s @ g) == pytest.approx(float(sc.support[k, j]), rel=1e-7, abs=1e-13)


@pytest.mark.parametrize("key", ["maml-mlp", "anil-cnn4bn"])
def test_looped_equals_vmapped(key):
    a, b = unrolled_setup(key, True), unrolled_setup(key, False)
    assert a.problem.use_vmap and not b.problem.use_vmap
    th, idx = a.theta, torch.tensor([2, 0, 1])
    s = rand_vec(len(th), 14)
    sa, sb = a.problem.unit_scores(th, s), b.problem.unit_scores(th, s)
    for f in ("task", "query", "support"):
        torch.testing.assert_close(getattr(sa, f), getattr(sb, f), rtol=1e-10, atol=1e-14)
    for x, y in zip(a.problem.eval_grad(th), b.problem.eval_grad(th)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)
    for form in ("exact", "no_third_order"):
        torch.testing.assert_close(a.problem.hvp(th, s, idx, form), b.problem.hvp(th, s, idx, form),
                                   rtol=1e-10, atol=1e-14)
    assert a.problem.gamma(th, idx) == pytest.approx(b.problem.gamma(th, idx), rel=1e-12)
    ref = torch.stack([H.ref_task_loss(a.learner, a.spec, th, *H.task(a.train, k)[:6]) for k in range(a.n)])
    torch.testing.assert_close(a.problem.task_losses(th), ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.problem.task_losses(th), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key", ["maml-mlp", "anil-cnn4bn", "implicit"])
def test_task_only_pass_equals_full_pass(key):
    """``unit=task`` skips the support reverse pass: task and query scores unchanged, support NaN."""
    st = implicit_setup() if key == "implicit" else unrolled_setup(key)
    s = rand_vec(len(st.theta), 15)
    full = st.problem.unit_scores(st.theta, s)
    st.problem.support = False
    try:
        fast = st.problem.unit_scores(st.theta, s)
    finally:
        st.problem.support = True
    torch.testing.assert_close(fast.task, full.task, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fast.query, full.query, rtol=1e-12, atol=1e-15)
    assert torch.isnan(fast.support).all() and fast.support.shape == full.support.shape


def test_implicit_support_scores_without_third_order_term(implicit):
    """``support_third_order=False`` drops exactly ``m^T b_j`` (method §3, two-stage support IF)."""
    st = implicit
    model, eta, n = st.learner.model, st.learner.cfg.eta, st.n
    problem = H.make_problem(st.learner, st.spec, st.train, st.test, DELTA_REG, inner_tol=1e-12, cg_tol=1e-12,
                             support_third_order=False)
    s = rand_vec(len(st.theta), 15)
    full, part = st.problem.unit_scores(st.theta, s), problem.unit_scores(st.theta, s)
    torch.testing.assert_close(part.task, full.task, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(part.query, full.query, rtol=1e-10, atol=1e-15)
    for k in range(n):
        x_spt, y_spt, u, x_qry, y_qry, v, w = H.task(st.train, k)
        phi = H.ref_inner_solve(st.learner, st.spec, st.theta, x_spt, y_spt, u)
        inner = lambda p: H.wmean(H.ce(model, st.spec.unflatten(p), x_spt, y_spt), u)  # noqa: E731
        qloss = lambda p: H.wmean(H.ce(model, st.spec.unflatten(p), x_qry, y_qry), v)  # noqa: E731
        hin = hessian(inner)(phi) + eta * torch.eye(len(phi), dtype=DT)
        r, q = torch.linalg.solve(hin, s), torch.linalg.solve(hin, grad(qloss)(phi))
        t = torch.linalg.solve(hin, hessian(qloss)(phi) @ r)
        m = torch.linalg.solve(hin, hessian(lambda p: grad(inner)(p) @ q)(phi) @ r)
        spt = lambda p: H.ce(model, st.spec.unflatten(p), x_spt, y_spt)  # noqa: E731
        b = jacrev(spt)(phi)  # [S, P]
        hjr = jacrev(lambda p: jacrev(spt)(p) @ r)(phi) @ q  # q^T H_j r for every j
        scale = -w * eta / (n * len(u))
        torch.testing.assert_close(part.support[k], scale * (b @ t + hjr), rtol=1e-8, atol=1e-14)
        torch.testing.assert_close(full.support[k], scale * (b @ t + hjr - b @ m), rtol=1e-8, atol=1e-14)
        assert rel(part.support[k], full.support[k]) > 1e-3  # the third-order part matters here


@pytest.mark.parametrize("vmap", [True, False], ids=["vmap", "loop"])
def test_margin_evaluation_gradient_matches_finite_differences(vmap):
    st = unrolled_setup("maml-mlp", vmap)
    problem = UnrolledProblem(st.learner, st.spec, st.train, st.test, n=st.n, delta_reg=DELTA_REG,
                              eval_kind="margin")
    values, grads = problem.eval_grad(st.theta)

    def margin(th, t):
        x_spt, y_spt, u, x_qry, y_qry, v, _ = H.task(st.test, t)
        z = H.logits(st.learner.model, H.ref_adapt(st.learner, st.spec, th, x_spt, y_spt, u), x_qry)
        true = z.gather(1, y_qry[:, None])[:, 0]
        wrong = torch.where(torch.nn.functional.one_hot(y_qry, z.shape[1]).bool(), -torch.inf, z).amax(1)
        return H.wmean(wrong - true, v)

    eps = 1e-6
    for t in range(len(st.test)):
        assert float(values[t]) == pytest.approx(float(margin(st.theta, t)), rel=1e-12)
        v = rand_vec(len(st.theta), 20 + t)
        fd = float(margin(st.theta + eps * v, t) - margin(st.theta - eps * v, t)) / (2 * eps)
        assert float(grads[t] @ v) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_per_task_evaluation_and_shards_are_consistent():
    """``train_by_test[:, t]`` scores against test task ``t`` alone; their mean is the task score
    (``f`` is the mean of the ``f_t``); a shard's scores are the rows of the full pass."""
    from metaif_cli.influence.config import EvaluationConfig

    st = unrolled_setup("maml-mlp")
    problem = UnrolledProblem(st.learner, st.spec, st.train, st.test, n=st.n, delta_reg=DELTA_REG,
                              eval_kind="per_task")
    hd = ref_unrolled_hessian(st, None)
    dense = DenseHvp(problem, st.theta, hd)
    cfg = score_cfg(damping=2.0)
    cfg.evaluation = EvaluationConfig(kind="per_task")
    out = compute.influence(dense, st.theta, cfg)
    assert out.train_by_test.shape == (st.n, len(st.test))
    torch.testing.assert_close(out.train_by_test.mean(1), out.scores.task, rtol=1e-10, atol=1e-15)
    a = hd + 2.0 * torch.eye(len(st.theta), dtype=DT)
    for t in range(len(st.test)):
        f_t = lambda th: H.ref_task_loss(st.learner, st.spec, th, *H.task(st.test, t)[:6])  # noqa: E731
        s_t = torch.linalg.solve(a, grad(f_t)(st.theta))
        torch.testing.assert_close(out.train_by_test[:, t], problem.unit_scores(st.theta, s_t).task,
                                   rtol=1e-9, atol=1e-15)
    shard = compute.influence(dense, st.theta, score_cfg(damping=2.0), index=torch.tensor([1, 2]))
    torch.testing.assert_close(shard.scores.support, out.scores.support[1:], rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------------------------------
# 7. Direct-IF
# ---------------------------------------------------------------------------------------
def test_direct_if_equals_classic_influence_by_hand():
    st = unrolled_setup("anil-mlp")
    model, n, damping = st.learner.model, st.n, 0.5
    direct = UnrolledProblem(st.learner, st.spec, st.train, st.test, n=n, delta_reg=DELTA_REG, steps=0)
    losses = lambda th, x, y: H.ce(model, st.spec.unflatten(th), x, y)  # noqa: E731 (no adaptation)

    def F_(th):
        tot = sum(H.task(st.train, k)[6] * H.wmean(losses(th, *H.task(st.train, k)[3:5]), H.task(st.train, k)[5])
                  for k in range(n))
        return tot / n + 0.5 * DELTA_REG * (th ** 2).sum()

    def f(th):
        return torch.stack([H.wmean(losses(th, *H.task(st.test, t)[3:5]), H.task(st.test, t)[5])
                            for t in range(len(st.test))]).mean()

    hd = hessian(F_)(st.theta)
    s = torch.linalg.solve(hd + damping * torch.eye(len(st.theta), dtype=DT), grad(f)(st.theta))
    out = compute.influence(direct, st.theta, score_cfg(damping=damping))
    assert rel(out.s, s) < 1e-9
    assert out.eval_value == pytest.approx(float(f(st.theta)), rel=1e-12)
    for k in range(n):
        x_spt, y_spt, u, x_qry, y_qry, v, w = H.task(st.train, k)
        jq = jacrev(losses)(st.theta, x_qry, y_qry)  # [Q, P]
        js = jacrev(losses)(st.theta, x_spt, y_spt)  # [S, P]
        assert float(out.scores.task[k]) == pytest.approx(float(s @ (v @ jq) / len(v)) / n, rel=1e-8)
        torch.testing.assert_close(out.scores.query[k], w * (jq @ s) / (n * len(v)), rtol=1e-8, atol=1e-14)
        torch.testing.assert_close(out.scores.support[k], w * (js @ s) / (n * len(u)), rtol=1e-8, atol=1e-14)


# ---------------------------------------------------------------------------------------
# 8. bad input
# ---------------------------------------------------------------------------------------
def test_unconverged_solve_is_refused_unless_allowed():
    st, hd, b, damping = solver_case()
    with pytest.raises(MetaifError, match="residual"):
        compute.solve_ihvp(st.problem, st.theta, b, score_cfg(damping=damping, solver="cg", max_iter=1, tol=1e-10))
    res, _ = compute.solve_ihvp(st.problem, st.theta, b, score_cfg(damping=damping, solver="cg", max_iter=1,
                                                                   tol=1e-10, allow_unconverged=True))
    assert not res.converged and res.iterations == 1
    assert res.residual == pytest.approx(_true_residual(hd, damping, res.x, b), rel=1e-8) and res.residual > 1e-10


@pytest.mark.parametrize("mode", ["unrolled", "implicit"])
def test_nan_theta_is_refused(mode):
    if mode == "unrolled":
        st = unrolled_setup("maml-mlp")
        problem = st.problem
    else:
        st = implicit_setup()
        problem = H.make_problem(st.learner, st.spec, st.train, st.test, DELTA_REG, inner_max_iter=3,
                                 cg_max_iter=3)
    theta = st.theta.clone()
    theta[3] = float("nan")
    with pytest.raises(MetaifError, match="NaN"):
        compute.influence(problem, theta, score_cfg(damping=0.1))


# ---------------------------------------------------------------------------------------
# 5-6. leave-one-out retraining to convergence
# ---------------------------------------------------------------------------------------
class DenseHvp:
    """Delegates to a problem; its HVPs at ``theta`` come from a matrix built once from the problem's
    own HVPs (``P`` calls). Linear in ``vec``, so solvers see the same operator, only cheaper."""

    def __init__(self, problem, theta: torch.Tensor, matrix: torch.Tensor | None = None) -> None:
        self.inner, self.theta, self.mats = problem, theta, {}
        if matrix is not None:  # a reference matrix of the exact form over all tasks
            self.mats[(tuple(range(problem.n)), "exact")] = matrix

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def matrix(self, index: torch.Tensor, form: str) -> torch.Tensor:
        key = (tuple(torch.as_tensor(index).tolist()), form)
        if key not in self.mats:
            eye = torch.eye(len(self.theta), dtype=DT)
            self.mats[key] = torch.stack([self.inner.hvp(self.theta, e, index, form) for e in eye], 1)
        return self.mats[key]

    def hvp(self, theta, vec, index, form):
        assert torch.equal(theta, self.theta)
        return self.matrix(index, form) @ vec


@dataclass
class LooStudy:
    units: list  # (role, task, position)
    pred: torch.Tensor  # score = predicted delta test loss
    actual: torch.Tensor  # f(lam*_{-e}) - f(lam*)
    cos: list  # cosine(pred_delta_lam, actual delta lam)
    ratio: list  # ||pred_delta_lam|| / ||actual delta lam||
    scores: UnitScores
    retrain: object  # weights -> delta f
    infinitesimal: list  # (unit, score, derivative of f after retraining at weight 1 - eps, cosine)
    h_rel_err: float  # problem's exact total Hessian vs the reference
    summary: dict = field(default_factory=dict)


N_LOO, N_INST = 10, 10


@lru_cache(maxsize=None)
def loo_study(meta: str) -> LooStudy:
    model = H.make_model("mlp", hidden=8, layers=1, image_shape=(1, 8, 8), ways=3, seed=0)
    if meta == "imaml":
        learner = H.make_learner(model, "imaml", lr=0.4, eta=2.0)
    else:
        learner = H.make_learner(model, meta, steps=2, lr=0.2)
    spec, theta0 = H.lam_of(model, head_only=True)  # lam = head; the random body stays fixed
    train = H.digits_tasks(N_LOO, seed=1, classes=range(6))
    test = H.digits_tasks(6, seed=2, classes=range(6, 10))
    delta = 0.05
    if meta == "imaml":
        fgh_of = lambda b: H.ref_implicit_objective(learner, spec, b, delta)  # noqa: E731
        f = lambda th: float(H.ref_implicit_eval(learner, spec, test)(th)[0])  # noqa: E731
    else:
        fgh_of = lambda b: H.unrolled_objective(learner, spec, b, delta)  # noqa: E731
        f = lambda th: float(H.ref_f_unrolled(learner, spec, test)(th))  # noqa: E731
    lam, _ = H.newton_minimize(fgh_of(train), theta0, tol=1e-12)
    h_ref = fgh_of(train)(lam)[2]
    f0 = f(lam)

    opts = dict(inner_tol=1e-12, cg_tol=1e-11) if meta == "imaml" else {}
    real = H.make_problem(learner, spec, train, test, delta, **opts)
    problem = DenseHvp(real, lam)
    h_rel_err = rel(problem.matrix(torch.arange(N_LOO), "exact"), h_ref)
    cfg = score_cfg(damping=0.0)  # delta_reg is the convexifier
    out = compute.influence(problem, lam, cfg)
    sc = out.scores

    def weights(role, k, j, value):
        if role == "task":
            return train.with_weights(w=train.w.clone().index_fill_(0, torch.tensor([k]), value))
        t = (train.v if role == "query" else train.u).clone()
        t[k, j] = value
        return train.with_weights(**{"v" if role == "query" else "u": t})

    def retrain(batch):
        th, _ = H.newton_minimize(fgh_of(batch), lam, tol=1e-12)
        return th, f(th) - f0

    def score_of(role, k, j):
        return float(sc.task[k] if role == "task" else getattr(sc, role)[k, j])

    gen = torch.Generator().manual_seed(0)
    units = [("task", k, None) for k in range(N_LOO)]
    units += [("query", int(i) // 9, int(i) % 9) for i in torch.randperm(N_LOO * 9, generator=gen)[:N_INST]]
    units += [("support", int(i) // 6, int(i) % 6) for i in torch.randperm(N_LOO * 6, generator=gen)[:N_INST]]
    pred, actual, cos, ratio = [], [], [], []
    for role, k, j in units:
        th, d = retrain(weights(role, k, j, 0.0))
        wg = real.weight_gradient(lam, k, None if role == "task" else role, j)
        pdl = compute.solve_ihvp(problem, lam, wg, cfg)[0].x
        pred.append(score_of(role, k, j))
        actual.append(d)
        cos.append(H.cosine(pdl, th - lam))
        ratio.append(float(pdl.norm() / (th - lam).norm()))
    infinitesimal = []
    eps = 1e-3
    for role, k, j in (units[0], units[N_LOO], units[N_LOO + N_INST]):
        th, d = retrain(weights(role, k, j, 1.0 - eps))
        wg = real.weight_gradient(lam, k, None if role == "task" else role, j)
        pdl = compute.solve_ihvp(problem, lam, wg, cfg)[0].x
        infinitesimal.append(((role, k, j), score_of(role, k, j), d / eps, H.cosine(pdl, th - lam),
                              float(pdl.norm() * eps / (th - lam).norm())))
    study = LooStudy(units, torch.tensor(pred, dtype=DT), torch.tensor(actual, dtype=DT), cos, ratio, sc,
                     lambda role, k, j: retrain(weights(role, k, j, 0.0))[1], infinitesimal, h_rel_err)
    for role in ("task", "query", "support"):
        m = torch.tensor([u[0] == role for u in units])
        study.summary[role] = dict(spearman=H.spearman(study.pred[m], study.actual[m]),
                                   pearson=H.pearson(study.pred[m], study.actual[m]),
                                   min_cos=min(c for c, u in zip(cos, units) if u[0] == role),
                                   max_angle_deg=math.degrees(math.acos(min(1.0, min(
                                       c for c, u in zip(cos, units) if u[0] == role)))))
    print(f"\nLOO {meta}: {study.summary}\ninfinitesimal: {infinitesimal}\nH rel err {h_rel_err:.2e}")
    return study


@pytest.fixture(scope="module", params=["anil", pytest.param("imaml", marks=pytest.mark.slow)])
def loo(request) -> LooStudy:
    return loo_study(request.param)


def test_loo_reference_hessian_matches_problem(loo):
    assert loo.h_rel_err < 1e-9


def test_loo_infinitesimal_removal_is_exact(loo):
    """Retraining at weight ``1 - eps``: the scores and pred_delta_lam are the exact derivatives."""
    for unit, score, deriv, cos, ratio in loo.infinitesimal:
        assert deriv == pytest.approx(score, rel=2e-3, abs=1e-7), unit
        assert cos > 1 - 1e-6 and ratio == pytest.approx(1.0, abs=2e-3), unit


@pytest.mark.parametrize("role", ["task", "query", "support"])
def test_loo_scores_and_parameter_changes(loo, role):
    s = loo.summary[role]
    assert s["spearman"] >= 0.95, s
    assert s["min_cos"] >= math.cos(math.radians(10)), s


def test_loo_sign_convention(loo):
    """Removing the most negative (harmful) unit lowers the test loss after retraining; the most
    positive raises it."""
    sc = loo.scores
    for role, t in (("task", sc.task), ("query", sc.query), ("support", sc.support)):
        lo, hi = int(t.argmin()), int(t.argmax())
        cols = t.shape[1] if t.dim() == 2 else 1
        for flat, sign in ((lo, -1), (hi, 1)):
            k, j = (flat, None) if t.dim() == 1 else (flat // cols, flat % cols)
            assert sign * float(t.flatten()[flat]) > 0
            d = loo.retrain(role, k, j)
            assert sign * d > 0, (role, k, j, float(t.flatten()[flat]), d)
