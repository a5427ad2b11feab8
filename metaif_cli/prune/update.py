"""Apply a removal: retrain with zero weights, edit the model by influence, or gradient ascent.

- ``retrain``: a :class:`~metaif_cli.prune.launch.RetrainJob` with the original run's
  config (seed, initialisation, batch order, budget) and the removed units' weights 0,
  in ``retrains/<method>-<fraction>/`` so a rerun skips it (method §1).
- ``edit`` (method §3, model editing): ``lam_edit = lam* + (H + delta I)^{-1}
  sum_{e in R} d_{w_e} grad_lam F``, one iHVP for the whole removed set ``R`` with the
  ``score`` settings (method ``if``); for one unit this is ``pred_delta_lam`` of
  :func:`metaif_cli.score.methods.pred_delta_lam`.
- ``grad_ascent`` (method §4): ``grad_ascent_steps`` steps of the run's optimiser
  type with learning rate ``grad_ascent_lr``, ascending the removed units' share of the
  outer objective, ``D(lam) = F(lam; w, u, v) - F(lam; weights without R)`` (for tasks
  ``(1/n) sum_{k in R} L_Q^k``, for query instances their weighted losses, for support
  instances the change of their tasks' query losses when they leave adaptation).

Edited models are evaluated with :func:`metaif_cli.train.loop.evaluate_split` on the
meta-test pool, the function that reports every retraining's accuracy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from metaif_cli.train.experiment import config_dict
from metaif_cli.influence import compute
from metaif_cli.meta.params import FlatSpec, Params
from metaif_cli.prune.launch import RetrainJob
from metaif_cli.prune.units import Unit, weights_without
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.methods import build_problem
from metaif_cli.score.run import LoadedRun
from metaif_cli.train.loop import evaluate_split


def retrain_job(run: LoadedRun, units: list[Unit], run_dir: Path, init_lam: Params | None = None,
                steps: int | None = None, progress: bool = False) -> RetrainJob:
    """Retrain ``run`` without ``units`` in ``run_dir`` (cold, or warm from ``init_lam`` for ``steps``)."""
    config = {**config_dict(run.train_cfg), "progress": progress}
    weights = weights_without(run.weights, units).as_dict()
    dtype = {"float32": torch.float32, "float64": torch.float64}[run.train_cfg.dtype]
    init = None if init_lam is None else {k: v.detach().cpu().to(dtype) for k, v in init_lam.items()}
    return RetrainJob(config, str(run_dir), weights, init, steps)


class IFEditor:
    """Influence-based removal without retraining (method §3): one problem, one damping."""

    def __init__(self, run: LoadedRun, cfg: ScoreConfig) -> None:
        self.run = run
        self.cfg = dataclasses.replace(cfg, method="if")
        self.problem = build_problem(run, self.cfg)
        self.spec = FlatSpec.of(run.lam)
        self.theta = self.spec.flatten(run.lam)
        self._curvature: compute.Curvature | None = None

    @property
    def curvature(self) -> compute.Curvature:
        """The damping of ``H + delta I`` (chosen once, as ``score`` does: Lanczos from ``D f``)."""
        if self._curvature is None:
            self._curvature = compute.choose_damping(self.problem, self.theta, self.cfg)
        return self._curvature

    def delta_lam(self, units: list[Unit]) -> torch.Tensor:
        """``(H + delta I)^{-1} sum_{e in units} d_{w_e} grad F``: flat ``[P]``."""
        total = None
        for unit in units:
            _, task, role, position = unit.ref
            g = self.problem.weight_gradient(self.theta, task, role, position)
            total = g if total is None else total + g
        if total is None:
            return torch.zeros_like(self.theta)
        return compute.solve_ihvp(self.problem, self.theta, total, self.cfg, self.curvature)[0].x.detach()

    def edited(self, units: list[Unit]) -> Params:
        """``lam* + pred_delta_lam(units)``."""
        return self.spec.unflatten(self.theta + self.delta_lam(units))


def grad_ascent(run: LoadedRun, units: list[Unit], steps: int, lr: float) -> Params:
    """``steps`` optimiser steps ascending ``D(lam)``, the removed units' share of ``F``."""
    exp = run.exp
    n = len(exp.pools["train"])
    tasks = torch.tensor(sorted({u.task_id for u in units}))
    batch = exp.pools["train"].batch(exp.images, tasks, exp.dtype)
    full = {k: t[tasks].to(exp.device, exp.dtype) for k, t in run.weights.items()}
    removed = {k: t[tasks].to(exp.device, exp.dtype) for k, t in weights_without(run.weights, units).as_dict().items()}
    with_r, without_r = batch.with_weights(**full), batch.with_weights(**removed)
    lam = {k: v.detach().clone() for k, v in run.lam.items()}
    leaves = list(lam.values())
    opt = (torch.optim.Adam(leaves, lr=lr) if run.train_cfg.optim.optimizer == "adam"
           else torch.optim.SGD(leaves, lr=lr))
    scale = len(tasks) / n  # meta_gradient averages over the batch; F averages over the pool
    for _ in range(steps):
        g_with, _ = exp.learner.meta_gradient(lam, with_r)
        g_without, _ = exp.learner.meta_gradient(lam, without_r)
        for k, t in lam.items():
            t.grad = -scale * (g_with[k] - g_without[k])  # minimise -D
        opt.step()
    return {k: t.detach() for k, t in lam.items()}


def evaluate(run: LoadedRun, lam: Params) -> dict[str, float]:
    """Meta-test loss and accuracy of ``lam`` (95% intervals over test tasks)."""
    return evaluate_split(run.exp, lam, "test")
