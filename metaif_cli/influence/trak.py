"""TRAK without the inner level, computed by traker (Park et al. 2023; method §4).

The paper's "TRAK" baseline: TRAK's datamodel scores for the meta-learner's network at
``lam`` (and, with ``trak.num_checkpoints > 1``, at saved training checkpoints, averaged
as traker averages an ensemble), ignoring adaptation.

**What a training example is** (as :mod:`metaif_cli.influence.ekfac_if`): the **query
instances** of the training tasks, the only data of the meta-objective without the inner
level; TRAK's kernel ``X^T X`` is built from their projected gradients only (a traker
score computer restricted to those rows). **Support instances** are featurized too and
scored against that kernel as extra training points at ``lam`` (as ``direct_if`` does),
so they never change the query and task scores. Every instance's output function is
TRAK's margin ``log(p / (1 - p))`` of its label, computed with the network applied to
the instance's own set (its task's query or support set), so batch norm sees the batch it
sees in training.

**Scores and sign.** traker's score ``tau(j, t)`` of training example ``j`` and target
``t`` (a query instance of an evaluation task) estimates how much including ``j`` raises
``t``'s margin: positive = helpful. A margin change ``dm`` changes the cross-entropy by
``-(1 - p_t) dm``; so removing ``j`` changes the mean evaluation loss by about
``a_j = (1/N_test) sum_t (1 - p_t) tau(j, t)`` (``p_t`` the target's probability of its
label at ``lam``). In metaif's ``pred_delta_test_loss`` (negative = harmful) that is,
again **with no sign flip**:

- query instance ``j`` of task ``k``: ``w_k a_j``; support instance: ``w_k a_j``;
- task ``k``: ``sum_j v_kj a_j``, the sum over its query instances.

The scale is TRAK's own: traker normalises ``(X^T X)^{-1}`` by its mean absolute entry,
so magnitudes compare within this method only (rankings and sums of removed units are
what the pruning and LDS protocols use).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metaif_cli.errors import MetaifError
from metaif_cli.influence.baseline_config import TrakConfig
from metaif_cli.influence.compute import ScoreOutput
from metaif_cli.influence.ekfac_if import network_at
from metaif_cli.influence.problem import UnitScores
from metaif_cli.meta.params import Params
from metaif_cli.meta.tasks import TaskBatch

log = logging.getLogger(__name__)


def _margin(model: nn.Module, weights, buffers, x_ctx: Tensor, y_ctx: Tensor, pos: Tensor) -> Tensor:
    """TRAK's margin of instance ``pos`` of its set ``x_ctx [M, C, H, W]`` (one instance, vmap-safe)."""
    logits = functional_call(model, (weights, buffers), (x_ctx,))  # [M, ways]
    pick = (torch.arange(x_ctx.shape[0], device=pos.device) == pos).to(logits.dtype)  # [M]
    row = pick @ logits  # [ways]
    label = (pick * y_ctx.to(logits.dtype)).sum()
    is_label = torch.arange(row.shape[0], device=row.device).to(row.dtype) == label
    correct = (row * is_label.to(row.dtype)).sum()
    return correct - torch.logsumexp(torch.where(is_label, torch.full_like(row, -math.inf), row), -1)


def _make_model_output():
    from trak.modelout_functions import AbstractModelOutput

    class SetMargin(AbstractModelOutput):
        """traker's output contract for an instance seen inside its own set: ``(x_ctx, y_ctx, pos)``."""

        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, x_ctx, y_ctx, pos) -> Tensor:
            return _margin(model, weights, buffers, x_ctx, y_ctx, pos)

        def get_out_to_loss_grad(self, model, weights, buffers, batch) -> Tensor:
            x_ctx, y_ctx, pos = batch
            m = vmap(_margin, in_dims=(None, None, None, 0, 0, 0))(model, weights, buffers, x_ctx, y_ctx, pos)
            return (1 - torch.sigmoid(m)).detach().unsqueeze(-1)  # 1 - p, as traker's image task

    return SetMargin()


def _kernel_on_first_rows(rows: int):
    from trak.score_computers import BasicScoreComputer

    class FirstRowsKernel(BasicScoreComputer):
        """traker's score computer with ``X^T X`` from the first ``rows`` training rows only."""

        def get_xtx(self, grads: Tensor) -> Tensor:
            return super().get_xtx(grads[:rows])

    return FirstRowsKernel


def _state(net: nn.Module, params: Params) -> dict[str, Tensor]:
    """A full float32 state dict of ``net`` with ``params`` in place (``lam`` may cover part of it)."""
    return {**{k: v.detach() for k, v in net.state_dict().items()}, **{k: v.float() for k, v in params.items()}}


def _has_fast_jl() -> bool:
    try:
        import fast_jl  # noqa: F401
    except ImportError:
        return False
    return True


def _kept_projector(base):
    class KeptBasicProjector(base):
        """traker's CPU projector that keeps its matrix after featurizing: traker frees it in
        ``finalize_features`` and, with a single block and an unchanged model id, never draws
        it again for scoring (traker 0.3.2)."""

        def free_memory(self) -> None:
            pass

    return KeptBasicProjector


def set_batches(tasks, role: str, chunk: int):
    """``(x_ctx, y_ctx, pos)`` for every ``role`` instance of ``tasks``, ``chunk`` tasks at a time.

    ``tasks``: a :class:`TaskBatch` or a pool gathering each chunk's images (float32) on indexing.
    """
    for start in range(0, len(tasks), chunk):
        part = tasks[start : start + chunk]
        xs, ys = (part.x_qry, part.y_qry) if role == "query" else (part.x_spt, part.y_spt)
        xs = xs.float()
        k, m = ys.shape
        x_ctx = xs[:, None].expand(k, m, *xs.shape[1:]).reshape(k * m, *xs.shape[1:])  # [k*M, M, C, H, W]
        y_ctx = ys[:, None].expand(k, m, m).reshape(k * m, m)
        pos = torch.arange(m, device=ys.device).repeat(k)
        yield x_ctx, y_ctx, pos


def target_probabilities(model: nn.Module, tasks, chunk: int = 32) -> Tensor:
    """Probability of each query instance's label within its set, ``[T * Q]`` (float64), ``chunk`` tasks at a time."""
    out = []
    with torch.no_grad():
        for start in range(0, len(tasks), chunk):
            part = tasks[start : start + chunk]
            logits = vmap(model)(part.x_qry)  # [t, Q, ways]
            out.append(torch.softmax(logits.double(), -1).gather(-1, part.y_qry[..., None]).reshape(-1))
    return torch.cat(out)


def trak_influence(model: nn.Module, checkpoints: list[Params], train: TaskBatch, test: TaskBatch, *,
                   cfg: TrakConfig, support: bool = True, seed: int = 0, chunk: int = 32,
                   progress: bool = False) -> ScoreOutput:
    """TRAK scores of every task, query and support instance of ``train`` for ``f`` over ``test``.

    Args:
        model: the meta-learner's network (copies are loaded with each checkpoint).
        checkpoints: parameter dicts, the trained ``lam`` first; all are featurized (traker's
            model ids) and their scores averaged.
        train, test: training tasks (with their weights) and evaluation tasks.
        cfg: the ``trak.*`` settings.
        support: also score the support instances (else NaN).
        seed: the projection's seed.
        chunk: tasks per featurization batch.

    Returns:
        A :class:`ScoreOutput` in metaif's ``pred_delta_test_loss`` convention (module docstring).
    """
    try:
        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise MetaifError("method=trak needs traker; install the extra: pip install -e '.[baselines]'") from e

    times: dict[str, float] = {}
    lam = checkpoints[0]
    device = next(iter(lam.values())).device
    dev = "cuda" if device.type == "cuda" else "cpu"
    f32 = {k: v.float() for k, v in lam.items()}
    net = network_at(model, f32)
    grad_wrt = list(lam)
    n, q = train.y_qry.shape
    s_size = train.y_spt.shape[1]
    n_q = n * q
    n_train = n_q + (n * s_size if support else 0)
    num_params = sum(v.numel() for v in lam.values())
    proj_dim = int(min(cfg.proj_dim, num_params, n_q))
    if proj_dim < cfg.proj_dim:
        log.info("trak.proj_dim lowered from %d to %d (parameters %d, query instances %d)", cfg.proj_dim, proj_dim,
                 num_params, n_q)
    projector = None  # on CUDA with fast_jl installed: traker's own CudaProjector
    if dev == "cpu" or not _has_fast_jl():
        # traker's BasicProjector, in one block where it fits in 256 MB (drawn once, not per batch)
        block = max(1, min(proj_dim, 2 ** 26 // max(num_params, 1)))
        kind = ProjectionType.normal if dev == "cpu" else ProjectionType.rademacher
        projector = _kept_projector(BasicProjector)(grad_dim=num_params, proj_dim=proj_dim, seed=seed,
                                                    proj_type=kind, device=dev, block_size=block)
    with tempfile.TemporaryDirectory(prefix="metaif-trak-") as tmp:
        traker = TRAKer(model=net, task=_make_model_output(), train_set_size=n_train, save_dir=str(Path(tmp)),
                        load_from_save_dir=True, device=dev, projector=projector, proj_dim=proj_dim,
                        use_half_precision=False, projector_seed=seed, grad_wrt=grad_wrt,
                        lambda_reg=cfg.lambda_reg, score_computer=_kernel_on_first_rows(n_q),
                        logging_level=logging.WARNING)
        t0 = time.perf_counter()
        for model_id, params in enumerate(checkpoints):
            traker.load_checkpoint(_state(net, params), model_id=model_id)
            roles = [("query", train.y_qry)] + ([("support", train.y_spt)] if support else [])
            for role, _ in roles:
                for batch in set_batches(train, role, chunk):
                    traker.featurize(batch=batch, num_samples=batch[2].shape[0])
        traker.finalize_features()
        times["trak_featurize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_targets = test.y_qry.numel()
        for model_id, params in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name="test", checkpoint=_state(net, params),
                                            model_id=model_id, num_targets=n_targets)
            for batch in set_batches(test, "query", chunk):
                traker.score(batch=batch, num_samples=batch[2].shape[0])
        tau = torch.as_tensor(np.array(traker.finalize_scores(exp_name="test")), dtype=torch.float64)  # [N, T]
        times["trak_score"] = time.perf_counter() - t0
    p = target_probabilities(network_at(model, lam), test, chunk).cpu()  # [T * Q]
    a = tau @ (1 - p) / n_targets  # [N]
    if not torch.isfinite(a).all():
        raise MetaifError("trak produced NaN or inf scores: X^T X is singular; set trak.lambda_reg > 0 or lower "
                          "trak.proj_dim")
    w, v = train.w.detach().double().cpu(), train.v.detach().double().cpu()
    a_q = a[:n_q].reshape(n, q)
    task_scores = (v * a_q).sum(1)
    query = w[:, None] * a_q
    if support:
        support_scores = w[:, None] * a[n_q:].reshape(n, s_size)
    else:
        support_scores = torch.full((n, s_size), float("nan"), dtype=torch.float64)
    out = ScoreOutput(UnitScores(task_scores, query, support_scores), seconds=times)
    out.info = {"proj_dim": proj_dim, "num_checkpoints": len(checkpoints), "lambda_reg": cfg.lambda_reg,
                "training_examples": "query instances"}
    return out
