"""The meta-learners (method §1-2) against hand formulas and numerical oracles, in float64.

- one inner SGD step equals its closed form (softmax cross-entropy gradients by hand);
- ANIL adapts ``head.*`` only; first-order MAML/ANIL drop exactly the second-order term;
- looped and vmapped meta-gradients agree;
- meta-Hessian-vector products (forward-over-reverse) agree with central finite
  differences of the meta-gradient for every model option, and the "Known trap" of
  ``torch.nn.functional.batch_norm`` is shown;
- iMAML's implicit meta-gradient equals differentiating through a long inner solve.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp

from metaif_cli.errors import MetaifError
from metaif_cli.meta.config import MetaConfig
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.meta.params import FlatSpec, Params
from metaif_cli.meta.tasks import TaskBatch
from metaif_cli.models.config import ModelConfig
from metaif_cli.models.networks import BatchNormPrimitive, MetaModel, params_of

pytestmark = pytest.mark.usefixtures("float64")

CPU = torch.device("cpu")


def _lam(model: MetaModel) -> Params:
    return params_of(model, torch.float64, CPU)


def _task(batch: TaskBatch, i: int = 0) -> tuple[Tensor, ...]:
    """``(x_spt, y_spt, u, x_qry, y_qry, v)`` of task ``i``."""
    return tuple(t[i] for t in batch.task_args())


def _flat(params: Params) -> Tensor:
    return FlatSpec.of(params).flatten(params)


def _rel_err(a: Params, b: Params) -> float:
    """``||a - b|| / ||b||`` over all keys."""
    fa, fb = _flat(a), _flat({k: b[k] for k in a})
    return float(torch.linalg.norm(fa - fb) / torch.linalg.norm(fb))


def _unit_direction(lam: Params, seed: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in lam.items()}
    norm = torch.linalg.norm(_flat(v))
    return {k: t / norm for k, t in v.items()}


# ------------------------------------------------------------------ one inner step by hand


def _hand_step(lam: Params, x: Tensor, y: Tensor, u: Tensor, alpha: float, ways: int, head_only: bool) -> Params:
    """One SGD step on ``(1/S) sum_j u_j CE(W2 relu(W1 x_j + b1) + b2, y_j)``, gradients by hand."""
    w1, b1, w2, b2 = lam["body.1.weight"], lam["body.1.bias"], lam["head.weight"], lam["head.bias"]
    s = x.shape[0]
    xf = x.reshape(s, -1)  # [S, D_in]
    a = xf @ w1.T + b1  # [S, H]
    h = a.clamp(min=0)
    z = h @ w2.T + b2  # [S, ways]
    p = torch.exp(z - z.max(dim=1, keepdim=True).values)
    p = p / p.sum(dim=1, keepdim=True)
    onehot = torch.eye(ways, dtype=x.dtype)[y]
    dz = u[:, None] * (p - onehot) / s  # d loss / d logits, [S, ways]
    grads = {"head.weight": dz.T @ h, "head.bias": dz.sum(0)}
    if not head_only:
        da = (dz @ w2) * (a > 0).to(x.dtype)  # [S, H]
        grads.update({"body.1.weight": da.T @ xf, "body.1.bias": da.sum(0)})
    return {k: t - alpha * grads[k] if k in grads else t for k, t in lam.items()}


@pytest.mark.parametrize("meta", ["maml", "anil"])
def test_one_inner_step_matches_closed_form(meta, tiny_model_factory, tiny_tasks):
    model = tiny_model_factory("mlp", layers=1, hidden=5)
    lam = _lam(model)
    assert set(lam) == {"body.1.weight", "body.1.bias", "head.weight", "head.bias"}
    batch = tiny_tasks(n=1, unit_weights=False)
    x, y, u = batch.x_spt[0], batch.y_spt[0], batch.u[0]
    alpha = 0.7
    learner = MetaLearner(model, MetaConfig(name=meta, inner_steps=1, inner_lr=alpha))
    phi = learner.adapt(lam, x, y, u)
    expected = _hand_step(lam, x, y, u, alpha, ways=3, head_only=meta == "anil")
    assert set(phi) == set(lam)
    for k in lam:
        torch.testing.assert_close(phi[k], expected[k], rtol=1e-12, atol=1e-12)
        assert not torch.equal(phi[k], lam[k]) or (meta == "anil" and k.startswith("body."))


def test_anil_adapts_only_the_head(tiny_model_factory, tiny_tasks):
    model = tiny_model_factory("cnn4", norm="batch", hidden=4)
    lam = _lam(model)
    x, y, u, *_ = _task(tiny_tasks(n=1))
    phi = MetaLearner(model, MetaConfig(name="anil", inner_steps=3, inner_lr=0.5)).adapt(lam, x, y, u)
    assert set(phi) == set(lam)
    for k in lam:
        if k.startswith("body."):
            assert torch.equal(phi[k], lam[k]), k
        else:
            assert k.startswith("head.")
            assert not torch.allclose(phi[k], lam[k]), k


# ------------------------------------------------------------------ first order


@pytest.mark.parametrize("meta", ["maml", "anil"])
def test_first_order_drops_the_second_order_term(meta, tiny_model_factory, tiny_tasks):
    """First-order: ``D_lam L_Q = grad_phi L_Q(phi)`` (identity Jacobian), unlike second order."""
    model = tiny_model_factory("mlp", norm="batch", hidden=6)
    lam = _lam(model)
    x_spt, y_spt, u, x_qry, y_qry, v = _task(tiny_tasks(n=1, unit_weights=False))
    fo = MetaLearner(model, MetaConfig(name=meta, first_order=True, inner_steps=2, inner_lr=0.5))
    so = MetaLearner(model, MetaConfig(name=meta, first_order=False, inner_steps=2, inner_lr=0.5))

    phi = fo.adapt(lam, x_spt, y_spt, u)
    phi_so = so.adapt(lam, x_spt, y_spt, u)
    for k in lam:  # the forward pass is the same; only derivatives differ
        torch.testing.assert_close(phi[k], phi_so[k], rtol=0, atol=0)

    def query_loss(p: Params) -> Tensor:
        return (v * fo.instance_losses(p, x_qry, y_qry)).sum() / v.shape[0]

    expected = grad(query_loss)(phi)
    g_fo, loss_fo = fo.task_grad(lam, x_spt, y_spt, u, x_qry, y_qry, v)
    g_so, loss_so = so.task_grad(lam, x_spt, y_spt, u, x_qry, y_qry, v)
    assert _rel_err(g_fo, expected) < 1e-12
    torch.testing.assert_close(loss_fo, loss_so)
    assert _rel_err(g_so, g_fo) > 1e-3  # the second-order term is not negligible here


# ------------------------------------------------------------------ loop vs vmap

MODEL_OPTIONS = [
    dict(name="mlp", norm="none"),
    dict(name="mlp", norm="batch"),
    dict(name="cnn4", norm="batch", pool="max"),
    dict(name="cnn4", norm="group", pool="stride"),
]


@pytest.mark.parametrize("meta", ["maml", "anil", "imaml"])
@pytest.mark.parametrize("model_opts", MODEL_OPTIONS, ids=lambda o: "-".join(o.values()))
def test_looped_and_vmapped_meta_gradients_agree(meta, model_opts, tiny_model_factory, tiny_tasks):
    model = tiny_model_factory(**model_opts)
    lam = _lam(model)
    batch = tiny_tasks(n=3, unit_weights=False)
    cfg = MetaConfig(name=meta, inner_steps=2, inner_lr=0.3, cg_iters=5)
    learner = MetaLearner(model, cfg)
    g_vmap, l_vmap = learner.meta_gradient(lam, batch, use_vmap=True)
    g_loop, l_loop = learner.meta_gradient(lam, batch, use_vmap=False)
    assert set(g_vmap) == set(lam)
    torch.testing.assert_close(l_vmap, l_loop, rtol=1e-10, atol=1e-12)
    assert _rel_err(g_vmap, g_loop) < 1e-10
    assert float(torch.linalg.norm(_flat(g_loop))) > 0


# ------------------------------------------------------------------ meta-HVP vs finite differences


def _meta_hvp_error(model: MetaModel, batch: TaskBatch, seed: int = 1, eps: float = 1e-6) -> float:
    """Relative error of forward-over-reverse ``H v`` against central differences of ``D_lam L_Q``.

    Second-order MAML with 2 inner steps. The direction has unit norm and ``eps`` is small
    so that no ReLU or max-pool kink is crossed (a crossing makes the difference quotient
    meaningless, not the HVP wrong); float64 keeps the rounding error near 1e-10.
    """
    learner = MetaLearner(model, MetaConfig(name="maml", inner_steps=2, inner_lr=0.5))
    lam = _lam(model)
    args = _task(batch)
    v = _unit_direction(lam, seed)

    def meta_grad(p: Params) -> Params:
        return grad(learner.task_loss)(p, *args)

    _, hv = jvp(meta_grad, (lam,), (v,))
    g_plus = meta_grad({k: lam[k] + eps * v[k] for k in lam})
    g_minus = meta_grad({k: lam[k] - eps * v[k] for k in lam})
    fd = {k: (g_plus[k] - g_minus[k]) / (2 * eps) for k in lam}
    return _rel_err(hv, fd)


HVP_OPTIONS = [dict(name="mlp", norm=n) for n in ("batch", "group", "none")] + [
    dict(name="cnn4", norm=n, pool=p) for n in ("batch", "group", "none") for p in ("max", "avg", "stride")
] + [dict(name="mlp", norm=n, activation=a) for n in ("batch", "none") for a in ("gelu", "softplus", "tanh")] + [
    dict(name="cnn4", norm="batch", pool="avg", activation=a) for a in ("gelu", "softplus", "tanh")
]


@pytest.mark.parametrize("model_opts", HVP_OPTIONS, ids=lambda o: "-".join(o.values()))
def test_meta_hvp_matches_finite_differences(model_opts, tiny_model_factory, tiny_tasks):
    model = tiny_model_factory(**model_opts)
    assert _meta_hvp_error(model, tiny_tasks(n=1, unit_weights=False)) < 1e-5


@pytest.mark.parametrize("activation", ["gelu", "softplus", "tanh"])
def test_smooth_activation_replaces_every_relu(activation, tiny_model_factory):
    for name in ("mlp", "cnn4"):
        model = tiny_model_factory(name=name, activation=activation, pool="avg")
        kinds = {type(m).__name__ for m in model.modules()}
        assert "ReLU" not in kinds and "MaxPool2d" not in kinds
        assert {"gelu": "GELU", "softplus": "Softplus", "tanh": "Tanh"}[activation] in kinds


def test_unknown_activation_is_refused_naming_the_choices():
    with pytest.raises(MetaifError, match="model.activation.*relu, gelu, softplus, tanh"):
        ModelConfig(activation="swish")


class BuiltinBatchNorm(nn.Module):
    """Batch norm through ``torch.nn.functional.batch_norm`` (batch statistics, no running stats)."""

    def __init__(self, weight: Tensor, bias: Tensor, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


def _with_builtin_batch_norm(model: MetaModel) -> MetaModel:
    """The same network and parameters (same names), with the primitive batch norms swapped."""
    swapped = 0
    for i, layer in enumerate(model.body):
        if isinstance(layer, BatchNormPrimitive):
            model.body[i] = BuiltinBatchNorm(layer.weight, layer.bias, layer.eps)
            swapped += 1
    assert swapped > 0
    return model


@pytest.mark.parametrize("name", ["mlp", "cnn4"])
def test_known_trap_builtin_batch_norm(name, tiny_model_factory, tiny_tasks):
    """method §2 "Known trap": F.batch_norm's third-order derivatives are wrong, the primitive norm's are not.

    Recorded on torch 2.14.1: the meta-HVP error of the builtin is ~0.6 (mlp) and ~0.66 (cnn4),
    the primitive's ~1e-10. The vmap half of the trap (functorch issue 534) does not show
    here: with batch statistics and no running buffers, looped and vmapped meta-gradients
    through F.batch_norm agree to 1e-15, so only the HVP part is asserted.
    """
    batch = tiny_tasks(n=1, unit_weights=False)
    primitive = tiny_model_factory(name, norm="batch")
    lam = _lam(primitive)
    builtin = _with_builtin_batch_norm(tiny_model_factory(name, norm="batch"))
    # same function: the two models agree in value and first derivatives
    x = batch.x_spt[0]
    torch.testing.assert_close(primitive(x), builtin(x))
    assert _meta_hvp_error(primitive, batch) < 1e-5
    err = _meta_hvp_error(builtin, batch)
    # On torch 2.14 the builtin deviates by O(1) (~0.6 here). Should a later torch fix it,
    # this assertion fails and the primitive norm could be retired: revisit models.py then.
    assert err > 1e-2, f"F.batch_norm now passes the finite-difference check (error {err:.1e})"


# ------------------------------------------------------------------ iMAML: implicit vs unrolled


def _tanh_model(hidden: int = 6, ways: int = 3, seed: int = 0) -> MetaModel:
    """A smooth one-layer net (tanh): its proximal inner problem has no ReLU kinks to stall on."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh())
        return MetaModel(body, hidden, ways).to(torch.float64)


def test_imaml_implicit_gradient_matches_long_unrolled_solve(tiny_tasks):
    """``eta H_in^{-1} d_phi L_Q`` (CG) equals autodiff through 150 proximal gradient steps.

    The network is smooth (tanh): with ReLU the minimiser of the proximal problem of a
    tiny net can sit on a kink, where gradient steps cycle and neither side is defined.
    """
    model = _tanh_model()
    lam = _lam(model)
    x_spt, y_spt, u, x_qry, y_qry, v = _task(tiny_tasks(n=1, unit_weights=False))
    eta, lr, steps = 1.0, 0.3, 150
    learner = MetaLearner(model, MetaConfig(name="imaml", eta=eta, inner_lr=lr, inner_steps=steps, cg_iters=60))
    spec = FlatSpec.of(lam)
    flat_lam = spec.flatten(lam)

    def prox_loss(flat_phi: Tensor, anchor: Tensor) -> Tensor:
        data = learner.inner_loss(spec.unflatten(flat_phi), x_spt, y_spt, u)
        return data + 0.5 * eta * ((flat_phi - anchor) ** 2).sum()

    # precondition: the inner solve used by task_grad has converged to a stationary point
    phi = spec.flatten(learner.adapt(lam, x_spt, y_spt, u))
    assert float(torch.linalg.norm(grad(prox_loss)(phi, flat_lam))) < 1e-7

    g_implicit, loss = learner.task_grad(lam, x_spt, y_spt, u, x_qry, y_qry, v)

    # oracle: plain autograd through the whole unrolled solve (create_graph at every step)
    anchor = flat_lam.clone().requires_grad_(True)
    p = anchor
    for _ in range(steps):
        (g,) = torch.autograd.grad(prox_loss(p, anchor), p, create_graph=True)
        p = p - lr * g
    unrolled_loss = (v * learner.instance_losses(spec.unflatten(p), x_qry, y_qry)).sum() / v.shape[0]
    (g_unrolled,) = torch.autograd.grad(unrolled_loss, anchor)

    assert _rel_err(g_implicit, spec.unflatten(g_unrolled)) < 1e-5
    torch.testing.assert_close(loss, unrolled_loss.detach())


def test_run_saved_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """A run directory written before ``model.activation`` existed holds a ReLU run: the same command
    reuses it, another activation is refused as a run with different settings."""
    import json

    from metaif_cli import constants as C
    from metaif_cli.train.config import TrainConfig
    from metaif_cli.train.experiment import config_dict
    from metaif_cli.train.preflight import check_run_dir

    old = config_dict(TrainConfig())
    del old["model"]["activation"]
    (tmp_path / C.TRAIN_CONFIG_JSON).write_text(json.dumps(old))
    check_run_dir(tmp_path, TrainConfig())
    with pytest.raises(MetaifError, match="model.activation differ"):
        check_run_dir(tmp_path, TrainConfig(model=ModelConfig(activation="tanh")))
