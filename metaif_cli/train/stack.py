"""Stacks of models for batched retraining: parameters, optimiser state, evaluation (method §1 and §5).

K retrainings of one run differ only in their pool weights, batch order and initialisation
(method §5: a removal is a weight of 0), so they can share one pass as a stack: every
parameter gets a leading model dimension ``[K, ...]``. This module holds the conversions
between the stack and its members, so that each member's checkpoints are byte-compatible
with the single-run loop (:mod:`metaif_cli.train.loop`):

- :func:`stack_params` / :func:`member_params`: parameter dicts to and from the stack;
- :func:`stack_optimizer_state` / :func:`member_optimizer_state`: ``torch.optim`` state dicts
  (Adam's ``exp_avg``/``exp_avg_sq`` get the model dimension; the step count is shared,
  so a stack only ever holds members at the same step);
- :func:`member_initial_params`: the seeded initialisation of a member's ``model.init_seed``;
- :func:`evaluate_stack`: the metrics of :func:`metaif_cli.train.loop.evaluate_split` for every
  member, with ``vmap`` over the models (a plain loop where vmap cannot run).
"""

from __future__ import annotations

import logging

import torch
from torch.func import vmap

from metaif_cli.meta.params import Params
from metaif_cli.models.networks import build_model, params_of
from metaif_cli.reports.intervals import mean_ci95
from metaif_cli.train.config import TrainConfig
from metaif_cli.train.experiment import Experiment

log = logging.getLogger(__name__)


def stack_params(members: list[Params]) -> Params:
    """``K`` parameter dicts -> one dict of ``[K, ...]`` tensors (fresh memory)."""
    return {k: torch.stack([m[k] for m in members]) for k in members[0]}


def member_params(stack: Params, i: int) -> Params:
    """Member ``i`` of a stack, detached and on the CPU (as checkpoints hold it)."""
    return {k: t[i].detach().cpu().clone() for k, t in stack.items()}


def member_initial_params(exp: Experiment, cfg: TrainConfig) -> Params:
    """``lam`` at initialisation for ``cfg``'s init seed (the run's own model when the seeds agree)."""
    if cfg.init_seed == exp.cfg.init_seed:
        return exp.initial_params()
    model = build_model(cfg.model, exp.dataset.image_shape, cfg.dataset.ways, cfg.init_seed)
    return params_of(model.to(device=exp.device, dtype=exp.dtype), exp.dtype, exp.device)


def stack_optimizer_state(states: list[dict]) -> dict:
    """Members' ``optimizer.state_dict()`` -> the state dict of the optimiser over the stack."""
    first = states[0]
    stacked: dict = {}
    for key, entry in first["state"].items():
        stacked[key] = {}
        for name, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                stacked[key][name] = torch.stack([s["state"][key][name] for s in states])
            else:  # Adam's step: equal in every member of a stack
                stacked[key][name] = value
    return {"state": stacked, "param_groups": first["param_groups"]}


def member_optimizer_state(state: dict, i: int) -> dict:
    """Member ``i``'s share of the stack's optimiser state, in ``torch.optim``'s own format."""
    out: dict = {}
    for key, entry in state["state"].items():
        out[key] = {name: (value[i].clone() if torch.is_tensor(value) and value.dim() > 0
                           else (value.clone() if torch.is_tensor(value) else value))
                    for name, value in entry.items()}
    groups = [{k: (list(v) if isinstance(v, list) else v) for k, v in g.items()} for g in state["param_groups"]]
    return {"state": out, "param_groups": groups}


class MemberOptimizer:
    """What :func:`metaif_cli.train.loop.train_state` reads of an optimiser, for one member."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _metrics(split: str, losses: torch.Tensor, accs: torch.Tensor) -> dict[str, float]:
    acc, acc_ci = mean_ci95(accs.double().cpu().numpy())
    loss, loss_ci = mean_ci95(losses.double().cpu().numpy())
    return {f"{split}_acc": acc, f"{split}_acc_ci95": acc_ci, f"{split}_loss": loss, f"{split}_loss_ci95": loss_ci}


def evaluate_stack(exp: Experiment, stack: Params, split: str, use_vmap: bool = True) -> list[dict[str, float]]:
    """``evaluate_split(exp, member, split)`` for every member of ``stack``."""
    batch = exp.pools[split].batch(exp.images, dtype=exp.dtype)
    size = next(iter(stack.values())).shape[0]
    if use_vmap:
        try:
            losses, accs = vmap(lambda lam: exp.learner.evaluate(lam, batch))(stack)
            return [_metrics(split, losses[i], accs[i]) for i in range(size)]
        except RuntimeError as exc:  # a user model vmap cannot batch: evaluate one member at a time
            log.warning("evaluating the stack one model at a time: vmap over models failed (%s)", exc)
    out = []
    for i in range(size):
        losses, accs = exp.learner.evaluate({k: t[i] for k, t in stack.items()}, batch)
        out.append(_metrics(split, losses, accs))
    return out
