"""Support-instance scores of every meta-learner and order against leave-one-out retraining
(method §3; issue 10: first order must not cut the dependence on the support weights).

Tiny float64 problems (fixed random body, meta-learned head, outer L2). Second order and
iMAML retrain by Newton on ``F``; first order retrains by Newton on the first-order
stationarity condition ``(1/n) sum_k w_k grad_phi L_Q(phi_k(lam; u)) + delta lam = 0`` (what
first-order training converges to), with the full Jacobian. Scores must be non-zero and
agree in sign with the actual change of the test loss for the units of largest score.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch.func import grad, jacfwd

import influence_helpers as H
from metaif_cli.influence import compute
from metaif_cli.influence.config import HessianConfig, SolverConfig
from metaif_cli.meta.config import MetaConfig
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.score.config import ScoreConfig

DT = torch.float64
DELTA = 0.05
N_TRAIN, N_TEST, N_CHECK = 6, 3, 4


def _cfg() -> ScoreConfig:
    return ScoreConfig(hessian=HessianConfig(damping=0.0, auto_damping=False),
                       solver=SolverConfig(name="dense", tol=1e-8), progress=False)


def _fo_root(learner_so: MetaLearner, spec, batch, theta0: torch.Tensor) -> torch.Tensor:
    """Newton on the first-order stationarity condition (full Jacobian, through the inner steps)."""
    model = learner_so.model

    def g_fo(theta: torch.Tensor) -> torch.Tensor:
        total = DELTA * theta
        for k in range(len(batch)):
            x_spt, y_spt, u, x_qry, y_qry, v, w = H.task(batch, k)
            phi = H.ref_adapt(learner_so, spec, theta, x_spt, y_spt, u)
            gq = grad(lambda p: H.wmean(H.ce(model, p, x_qry, y_qry), v))(phi)
            total = total + w * spec.flatten(gq) / len(batch)
        return total

    theta = theta0.clone()
    for _ in range(30):
        g = g_fo(theta)
        if float(g.norm()) < 1e-12:
            return theta
        theta = theta - torch.linalg.solve(jacfwd(g_fo)(theta), g)
    raise AssertionError(f"first-order Newton did not converge: {float(g_fo(theta).norm()):.2e}")


@lru_cache(maxsize=None)
def study(meta: str, first_order: bool):
    model = H.make_model("mlp", hidden=8, layers=1, image_shape=(1, 8, 8), ways=3, seed=0)
    if meta == "imaml":
        learner = MetaLearner(model, MetaConfig(name="imaml", inner_lr=0.4, eta=2.0))
    else:
        learner = MetaLearner(model, MetaConfig(name=meta, first_order=first_order, inner_steps=2, inner_lr=0.3))
    so = MetaLearner(model, MetaConfig(name=meta, inner_steps=2, inner_lr=0.3)) if meta != "imaml" else learner
    spec, theta0 = H.lam_of(model, head_only=True)
    train = H.digits_tasks(N_TRAIN, seed=1, classes=range(6))
    test = H.digits_tasks(N_TEST, seed=2, classes=range(6, 10))
    if meta == "imaml":
        fit = lambda b, th: H.newton_minimize(H.ref_implicit_objective(learner, spec, b, DELTA), th, tol=1e-12)[0]  # noqa
        f = lambda th: float(H.ref_implicit_eval(learner, spec, test)(th)[0])  # noqa: E731
    elif first_order:
        fit = lambda b, th: _fo_root(so, spec, b, th)  # noqa: E731
        f = lambda th: float(H.ref_f_unrolled(so, spec, test)(th))  # noqa: E731
    else:
        fit = lambda b, th: H.newton_minimize(H.unrolled_objective(so, spec, b, DELTA), th, tol=1e-12)[0]  # noqa
        f = lambda th: float(H.ref_f_unrolled(so, spec, test)(th))  # noqa: E731
    lam = fit(train, theta0)
    opts = dict(inner_tol=1e-12, cg_tol=1e-11) if meta == "imaml" else {}
    problem = H.make_problem(learner, spec, train, test, DELTA, **opts)
    support = compute.influence(problem, lam, _cfg()).scores.support  # [n, S]
    f0 = f(lam)
    order = support.flatten().abs().argsort(descending=True)[:N_CHECK]
    checks = []
    for flat in order.tolist():
        k, j = divmod(flat, support.shape[1])
        u = train.u.clone()
        u[k, j] = 0.0
        checks.append((k, j, float(support[k, j]), f(fit(train.with_weights(u=u), lam)) - f0))
    return support, checks


CASES = [("maml", False), ("maml", True), ("anil", False), ("anil", True),
         pytest.param("imaml", False, marks=pytest.mark.slow)]


@pytest.mark.parametrize("meta, first_order", CASES)
def test_support_scores_are_nonzero_and_match_loo_signs(meta, first_order):
    support, checks = study(meta, first_order)
    assert bool((support.abs() > 0).all()), support
    assert float(support.abs().max()) > 1e-6
    agree = [(s > 0) == (d > 0) for _, _, s, d in checks]
    assert all(agree), checks


@pytest.mark.parametrize("meta", ["maml", "anil"])
def test_first_order_keeps_training_values(meta):
    """The fix changes no forward value and no first-order meta-gradient (training is unchanged)."""
    model = H.make_model("mlp", hidden=6, layers=1, image_shape=(1, 8, 8), ways=3, seed=0)
    spec, theta = H.lam_of(model)
    lam = spec.unflatten(theta)
    batch = H.digits_tasks(1, seed=3)
    x_spt, y_spt, u, x_qry, y_qry, v, _ = H.task(batch, 0)
    fo = MetaLearner(model, MetaConfig(name=meta, first_order=True, inner_steps=3, inner_lr=0.5))
    so = MetaLearner(model, MetaConfig(name=meta, inner_steps=3, inner_lr=0.5))
    phi, phi_so = fo.adapt(lam, x_spt, y_spt, u), so.adapt(lam, x_spt, y_spt, u)
    for k in lam:
        assert torch.equal(phi[k], phi_so[k]), k
    g, _ = fo.task_grad(lam, x_spt, y_spt, u, x_qry, y_qry, v)
    expected = grad(lambda p: H.wmean(H.ce(model, p, x_qry, y_qry), v))(phi_so)
    if meta == "anil":  # the body acts on the query logits directly, not through the head's steps
        expected = {**grad(lambda b: H.wmean(H.ce(model, {**phi_so, **b}, x_qry, y_qry), v))(
            {k: t for k, t in lam.items() if not k.startswith("head.")}),
            **{k: t for k, t in expected.items() if k.startswith("head.")}}
    for k in lam:
        torch.testing.assert_close(g[k], expected[k], rtol=1e-12, atol=1e-14)


def test_direct_if_on_imaml_is_not_detached():
    """Direct-IF (``steps=0``: no adaptation) on an iMAML run equals Direct-IF on a MAML learner:
    ``phi = lam`` keeps its derivatives in every mode (it used to be a detached copy, so ``D f = 0``)."""
    model = H.make_model("mlp", hidden=6, layers=1, image_shape=(1, 8, 8), ways=3, seed=0)
    spec, theta = H.lam_of(model, head_only=True)
    train, test = H.digits_tasks(4, seed=1), H.digits_tasks(2, seed=2)
    out = {}
    for name in ("imaml", "maml"):
        learner = MetaLearner(model, MetaConfig(name=name))
        problem = H.make_problem(MetaLearner(model, MetaConfig(name="maml")), spec, train, test, DELTA)
        problem = type(problem)(learner, spec, train, test, n=len(train), delta_reg=DELTA, steps=0)
        out[name] = compute.influence(problem, theta, _cfg()).scores
    assert float(out["imaml"].task.abs().min()) > 0
    for field in ("task", "query", "support"):
        torch.testing.assert_close(getattr(out["imaml"], field), getattr(out["maml"], field), rtol=1e-12, atol=0)
