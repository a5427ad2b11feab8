"""EK-FAC influence functions without the inner level, computed by kronfluence (method §4).

The paper's "EK-FAC IF" baseline: the classic influence function applied to the
meta-learner's network at ``lam`` as if meta-training were ordinary supervised training,
with the Hessian replaced by kronfluence's eigenvalue-corrected Kronecker-factored
Gauss-Newton (George et al. 2018; Grosse et al. 2023).

**What a training example is.** Without the inner level the meta-objective of method
§1 becomes ``F(lam) = (1/n) sum_k w_k (1/|Q|) sum_j v_kj l(lam; z_kj) +
(delta_reg/2)||lam||^2``: the query instances of the training tasks are the only data in
it (support sets only act through the adaptation, which is dropped). So the training
examples are the **query instances**, and kronfluence fits its factors on them (each
weighted by ``w_k v_kj``), one task's query set per batch so that batch norm sees the
same batch as in training. This is the same objective as ``direct_if`` (``steps=0``), so
the two differ only in the Hessian (EK-FAC Gauss-Newton against the exact one).
**Support instances** are not in ``F``; like ``direct_if``, they are scored as extra
training points at ``lam`` against the same factors (their gradient, not their effect
through adaptation), one task's support set per batch.

**Scores and sign.** kronfluence's pairwise score of training example ``j`` and query
(test) example ``t`` is ``g_t^T (G + damping)^{-1} g_j``: positive = helpful (upweighting
``j`` lowers ``t``'s loss). With ``f`` the mean query loss of the evaluation tasks at
``lam`` (``direct_if``'s ``f``), ``D f = (1/N_test) sum_t g_t``; kronfluence sums the
query gradients (``aggregate_query_gradients``), so ``a_j = score_j / N_test`` is
``D f^T (G + damping)^{-1} g_j``. Removing ``j`` (its weight 1 -> 0) moves ``lam`` by
``+(1/(n|Q|)) H^{-1} g_j`` and ``f`` by ``+a_j/(n|Q|)``. Hence, with metaif's
``pred_delta_test_loss`` (negative = harmful; method §3), **no sign flip**, only a
scale:

- query instance ``j`` of task ``k``: ``w_k a_j / (n |Q|)``;
- task ``k``: ``sum_j v_kj a_j / (n |Q|)``, the sum of its query-instance scores at
  unit weights (``d/dw_k`` of ``grad F``);
- support instance ``j``: ``w_k a_j / (n |S|)`` (as ``direct_if``).

``G`` is averaged over the ``n |Q|`` query instances, the scale of metaif's ``H``; the
damping is ``ekfac.damping + delta_reg`` (or kronfluence's heuristic). Only ``Linear``
and ``Conv2d`` layers are tracked by kronfluence: normalisation parameters get no score
contribution (EK-FAC's usual restriction).

Factors, scores and kronfluence's argument files live under ``work_dir`` (the score
directory) named after a fingerprint of ``lam`` and the data, and are reused on rerun.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from metaif_cli.errors import MetaifError
from metaif_cli.influence.baseline_config import EkfacConfig
from metaif_cli.influence.compute import ScoreOutput
from metaif_cli.data.compact import to_float
from metaif_cli.data.gather import PoolTasks
from metaif_cli.influence.problem import UnitScores
from metaif_cli.meta.params import Params
from metaif_cli.meta.tasks import TaskBatch

log = logging.getLogger(__name__)


class InstanceDataset(Dataset):
    """The instances of one role of a set of tasks, task-major: items ``(x, y, weight)``.

    ``images [N, C, H, W]`` (compact or float) and ``rows [T, M]`` (the instances' rows in
    it): each item's image is gathered and converted to ``dtype`` when it is read, so the
    pool's images are never copied whole (:mod:`metaif_cli.data.compact`).
    """

    def __init__(self, images: Tensor, rows: Tensor, y: Tensor, weight: Tensor, dtype: torch.dtype) -> None:
        self.images, self.dtype = images, dtype
        self.rows = rows.reshape(-1).to(images.device)  # [T * M]
        self.y = y.reshape(-1)
        self.weight = weight.reshape(-1)

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return to_float(self.images[self.rows[i]], self.dtype), self.y[i], self.weight[i]


def instance_dataset(tasks: TaskBatch | PoolTasks, role: str, weight: Tensor | None = None) -> InstanceDataset:
    """Query or support instances of ``tasks`` with per-instance loss weights (default 1)."""
    y = tasks.y_qry if role == "query" else tasks.y_spt
    if isinstance(tasks, PoolTasks):
        images, rows, dtype = tasks.images, tasks.image_rows(role), tasks.dtype
    else:
        x = tasks.x_qry if role == "query" else tasks.x_spt
        images, rows, dtype = x.reshape(-1, *x.shape[2:]), torch.arange(y.numel()), x.dtype  # [T * M, C, H, W]
    ones = torch.ones(y.shape, dtype=dtype, device=y.device)
    return InstanceDataset(images, rows, y, ones if weight is None else weight, dtype)


def _query_sums(tasks: TaskBatch | PoolTasks, chunk: int = 32) -> Tensor:
    """Pixel sum of every query image, ``[T, Q]``, ``chunk`` tasks at a time (a fingerprint of the data)."""
    return torch.cat([tasks[a : a + chunk].x_qry.sum((2, 3, 4)) for a in range(0, len(tasks), chunk)])


def _make_task(tracked: list[str] | None):
    from kronfluence.task import Task

    class WeightedCrossEntropy(Task):
        """kronfluence's contract for the meta-learner's network: weighted per-instance cross-entropy."""

        def get_influence_tracked_modules(self) -> list[str] | None:
            return tracked

        def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> Tensor:
            x, y, weight = batch
            out = model(x)  # [B, ways]
            if sample:  # labels from the model: the true Fisher (= Gauss-Newton for cross-entropy)
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(out.detach().double(), -1), 1).flatten()
            return (weight * F.cross_entropy(out, y, reduction="none")).sum()

        def compute_measurement(self, batch, model: nn.Module) -> Tensor:
            x, y, weight = batch
            return (weight * F.cross_entropy(model(x), y, reduction="none")).sum()

    return WeightedCrossEntropy()


def fingerprint(*tensors: Tensor) -> str:
    """A short hash of tensors (parameters, labels, weights, image sums): names reusable factors."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def network_at(model: nn.Module, lam: Params) -> nn.Module:
    """A copy of ``model`` holding ``lam`` (its dtype and device); parameters not in ``lam`` keep their values."""
    net = copy.deepcopy(model)
    first = next(iter(lam.values()))
    net.to(device=first.device, dtype=first.dtype)
    missing = set(lam) - set(dict(net.named_parameters()))
    if missing:
        raise MetaifError(f"parameters {sorted(missing)} of lam are not in the network; the run's model does not "
                          "match its config")
    net.load_state_dict({k: v.detach().clone() for k, v in lam.items()}, strict=False)
    return net


def tracked_modules(model: nn.Module, lam: Params) -> list[str] | None:
    """``Linear``/``Conv2d`` modules whose parameters all belong to ``lam`` (None: every one)."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    keep = [name for name in names if all(f"{name}.{p}" in lam for p, _ in mod_params(model, name))]
    return None if len(keep) == len(names) else keep


def mod_params(model: nn.Module, name: str):
    return model.get_submodule(name).named_parameters(recurse=False)


def ekfac_influence(model: nn.Module, lam: Params, train: TaskBatch, test: TaskBatch, *, n: int,
                    delta_reg: float, cfg: EkfacConfig, support: bool = True, work_dir: Path | None = None,
                    seed: int = 0, progress: bool = False) -> ScoreOutput:
    """EK-FAC influence of every task, query and support instance of ``train`` on ``f`` over ``test``.

    Args:
        model: the meta-learner's network (its parameters are replaced by ``lam`` in a copy).
        lam: the trained meta-parameters.
        train, test: training tasks (with their weights) and evaluation tasks.
        n: the normaliser of ``F`` (number of training tasks).
        delta_reg: the outer L2 of ``F``, added to the damping.
        cfg: the ``ekfac.*`` settings.
        support: also score the support instances (else NaN).
        work_dir: where kronfluence stores factors, scores and their arguments (reused when
            the fingerprint matches); a temporary directory when None.
        seed: seeds the labels sampled for the true Fisher.

    Returns:
        A :class:`ScoreOutput` in metaif's ``pred_delta_test_loss`` convention (module docstring).
    """
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.utils.dataset import DataLoaderKwargs
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise MetaifError("method=ekfac_if needs kronfluence; install the extra: pip install -e '.[baselines]'") from e
    import tempfile

    times: dict[str, float] = {}
    first = next(iter(lam.values()))
    dtype, device = first.dtype, first.device
    q, s_size = train.y_qry.shape[1], train.y_spt.shape[1]
    n_test = test.y_qry.numel()
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="metaif-ekfac-")
        work_dir = Path(tmp.name)
    key = fingerprint(torch.cat([t.reshape(-1) for t in lam.values()]), train.y_qry, train.w, train.v,
                      _query_sums(train), test.y_qry, _query_sums(test),
                      torch.tensor([float(cfg.use_empirical_fisher), float(cfg.max_examples or 0), seed]))
    task = _make_task(tracked_modules(model, lam))
    net = prepare_model(network_at(model, lam), task)
    analyzer = Analyzer(analysis_name="ekfac_if", model=net, task=task, cpu=device.type == "cpu",
                        output_dir=str(work_dir), disable_tqdm=not progress, log_level=logging.WARNING)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    factor_args = FactorArguments(
        strategy=cfg.strategy, use_empirical_fisher=cfg.use_empirical_fisher,
        covariance_max_examples=cfg.max_examples, lambda_max_examples=cfg.max_examples,
        activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype, eigendecomposition_dtype=torch.float64)
    # sqrt of the weights in the loss: the fitted covariance is then weighted by w_k v_kj, as in H
    fit_weight = (train.w[:, None] * train.v).clamp_min(0).sqrt()
    factors_name = f"query_{cfg.strategy}_{key}"
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        analyzer.fit_all_factors(factors_name=factors_name, dataset=instance_dataset(train, "query", fit_weight),
                                 per_device_batch_size=q, factor_args=factor_args)
    times["ekfac_factors"] = time.perf_counter() - t0

    damping = None if cfg.damping is None else cfg.damping + delta_reg
    score_args = ScoreArguments(damping_factor=damping, aggregate_query_gradients=True,
                                per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype)
    damp_tag = "heuristic" if damping is None else f"{damping:.6g}"
    test_ds = instance_dataset(test, "query")

    def raw_scores(role: str, size: int) -> Tensor:
        """``a_j = D f^T (G + damping)^{-1} g_j`` for every instance of ``role``: ``[n, size]``."""
        name = f"{role}_{damp_tag}_{factors_name}"
        analyzer.compute_pairwise_scores(
            scores_name=name, factors_name=factors_name, query_dataset=test_ds,
            train_dataset=instance_dataset(train, role), per_device_query_batch_size=test.y_qry.shape[1],
            per_device_train_batch_size=size, score_args=score_args)
        scores = analyzer.load_pairwise_scores(name)  # computed now, or found from an earlier run
        return scores["all_modules"].reshape(-1).to(torch.float64).cpu().reshape(len(train), size) / n_test

    t0 = time.perf_counter()
    a_q = raw_scores("query", q)  # [n, Q]
    times["ekfac_scores"] = time.perf_counter() - t0
    w, v = train.w.detach().double().cpu(), train.v.detach().double().cpu()
    task_scores = (v * a_q).sum(1) / (n * q)
    query = w[:, None] * a_q / (n * q)
    if support:
        t0 = time.perf_counter()
        support_scores = w[:, None] * raw_scores("support", s_size) / (n * s_size)
        times["ekfac_support_scores"] = time.perf_counter() - t0
    else:
        support_scores = torch.full((len(train), s_size), float("nan"), dtype=torch.float64)
    if not torch.isfinite(task_scores).all():
        raise MetaifError("ekfac_if produced NaN or inf scores: the trained model or data is broken; set "
                          "ekfac.damping to a positive value or score in dtype=float64")
    if tmp is not None:
        tmp.cleanup()
    out = ScoreOutput(UnitScores(task_scores, query, support_scores), seconds=times)
    out.info = {"factors": str(analyzer.factors_output_dir(factors_name)) if tmp is None else None,
                "strategy": cfg.strategy, "damping": damping, "training_examples": "query instances"}
    return out
