"""Batched retraining: K retrainings of one run trained together as a stack of models (method §1 and §5).

A retraining of ``prune-and-retrain`` is the run's own training with some unit weights 0
(method §5) and, for seed-averaged retraining, another meta-batch order
(``optim.batch_seed``) or initialisation (``model.init_seed``). K such retrainings
(*members*) share everything else, so :func:`train_members` trains them in one pass:
parameters get a leading model dimension, every step draws each member's own meta-batch
from its own generator, computes each member's meta-gradient with its own task, support
and query weights under ``torch.func.vmap`` over the models (the learner's
:meth:`~metaif_cli.meta.learner.MetaLearner.meta_gradient`, itself vmapped over tasks), and
takes one step of the run's optimiser (``torch.optim.Adam`` or ``SGD``) over the stacked
tensors, which is elementwise and so the same step each member takes alone.

Each member writes exactly the files of :func:`metaif_cli.train.loop.train` in its own
directory (checkpoints with its own optimiser state, ``metrics.csv``, ``model.pt``,
``results.json``), so a member resumes, or is scored, like a run trained alone, and
either path can finish what the other began. Finished members are skipped; unfinished ones
resume from their last checkpoint, and members at different steps are trained in separate
stacks. ``train_seconds`` of a member is its share (1/K) of the stack's wall time.

Where vmap over models cannot run (a user model whose operations have no batching rule),
the meta-gradients of a stack are computed one member at a time, with a warning; the
optimiser step and the files are the same.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.func import vmap

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.io import clean_stale_temporaries, save_csv, save_torch
from metaif_cli.meta.params import Params
from metaif_cli.meta.tasks import TaskBatch
from metaif_cli.progress import bar as progress_bar
from metaif_cli.train.config import TrainConfig
from metaif_cli.train.experiment import Experiment
from metaif_cli.train.loggers import make_logger
from metaif_cli.train.loop import (PoolWeights, batch_generator, checkpoint_steps, draw_batch, finish,
                                   finished_run_results, init_digest, make_optimizer, resume_state, train_state)
from metaif_cli.train.stack import (MemberOptimizer, evaluate_stack, member_initial_params, member_optimizer_state,
                                    member_params, stack_optimizer_state, stack_params)

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One retraining of a stack: its config (seeds may differ), directory, weights and start.

    ``init_lam``/``steps``: warm start at these parameters for this many outer steps (default:
    the seeded initialisation of ``cfg.init_seed`` and ``optim.steps``).
    """

    cfg: TrainConfig
    run_dir: Path
    weights: PoolWeights
    init_lam: Params | None = None
    steps: int | None = None


@dataclass
class _Live:
    """A member being trained: its view of the experiment, setup, start state and bookkeeping."""

    member: Member
    exp: Experiment
    setup: dict
    steps: int
    lam: Params
    saved: dict | None


def train_members(exp: Experiment, members: list[Member], stop_after: int | None = None,
                  use_vmap: bool = True) -> list[dict | None]:
    """Train (or resume, or skip) every member; return their ``results.json`` contents in order.

    Args:
        exp: the experiment shared by the members (data, pools, learner); its config must
            agree with theirs but for ``optim.batch_seed`` and ``model.init_seed``.
        members: the retrainings; all of them take the same number of steps.
        stop_after: stop every stack after this many steps of this call without finishing
            (a simulated kill: checkpoints already written stay); None for the whole run.
        use_vmap: vmap over models (False: one member at a time; the same numbers).

    Returns ``None`` for a member stopped by ``stop_after`` before its last step.
    """
    results: list[dict | None] = [None] * len(members)
    live: dict[tuple[int, int], list[tuple[int, _Live]]] = {}
    for i, m in enumerate(members):
        m_exp = dataclasses.replace(exp, cfg=m.cfg)
        steps = m.steps or m.cfg.optim.steps
        m.run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(m.run_dir)
        setup = {"steps": steps, "init": init_digest(m.init_lam)}
        done = finished_run_results(m.run_dir, m_exp, m.weights, setup)
        if done is not None:
            results[i] = done
            continue
        saved = resume_state(m.run_dir, m_exp, m.weights, setup)
        lam = m.init_lam if m.init_lam is not None else member_initial_params(exp, m.cfg)
        state = _Live(m, m_exp, setup, steps, {k: v.to(exp.device, exp.dtype) for k, v in lam.items()}, saved)
        live.setdefault((0 if saved is None else int(saved["step"]), steps), []).append((i, state))
    if len(live) > 1:
        log.info("batched retraining: members resume from %d different steps; one stack per step", len(live))
    for (start, _), group in sorted(live.items()):
        outs = _train_stack(exp, [s for _, s in group], start, stop_after, use_vmap)
        for (i, _), out in zip(group, outs):
            results[i] = out
    return results


def _meta_gradients(exp: Experiment, lam: Params, batches: list[TaskBatch], use_vmap: bool):
    """Per-member meta-gradients ``[K, ...]`` and per-task losses ``[K, T]``."""
    if use_vmap:
        fields = [torch.stack([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(TaskBatch)]

        def one(lam_m, *args):
            return exp.learner.meta_gradient(lam_m, TaskBatch(*args))

        return vmap(one)(lam, *fields)
    outs = [exp.learner.meta_gradient({k: t[i] for k, t in lam.items()}, b) for i, b in enumerate(batches)]
    return {k: torch.stack([g[k] for g, _ in outs]) for k in lam}, torch.stack([l for _, l in outs])


def _train_stack(exp: Experiment, group: list[_Live], start: int, stop_after: int | None,
                 use_vmap: bool) -> list[dict | None]:
    """Train members that all stand at step ``start`` to their end (or ``stop_after`` more steps)."""
    cfg, o = exp.cfg, exp.cfg.optim
    pool = exp.pools["train"]
    n, steps, size = len(pool), group[0].steps, len(group)
    lam = stack_params([s.saved["lam"] if s.saved else s.lam for s in group])
    lam = {k: t.to(exp.device, exp.dtype).requires_grad_(False) for k, t in lam.items()}
    opt = make_optimizer(list(lam.values()), exp)
    gens = [batch_generator(s.member.cfg) for s in group]
    metrics: list[list[dict]] = [[] for _ in group]
    elapsed = [0.0] * size
    if start:
        opt.load_state_dict(stack_optimizer_state([s.saved["optimizer"] for s in group]))
        for j, s in enumerate(group):
            gens[j].set_state(s.saved["generator"])
            metrics[j], elapsed[j] = s.saved["metrics"], s.saved["elapsed"]
        log.info("resuming %d retrainings from step %d", size, start)
    weights = [tuple(t.to(exp.device, exp.dtype) for t in (s.member.weights.w, s.member.weights.u,
                                                          s.member.weights.v)) for s in group]
    keep = set(checkpoint_steps(steps, o.num_checkpoints))
    loggers = [make_logger(s.member.cfg.logger, s.member.run_dir, start) for s in group]
    end = steps if stop_after is None else min(steps, start + stop_after)
    bar = progress_bar(range(start, end), initial=start, total=steps, desc=f"meta-train x{size}",
                       enabled=cfg.progress)
    t0 = time.perf_counter()
    for step in bar:
        batches = []
        for j in range(size):
            idx = draw_batch(gens[j], n, o.meta_batch_size)
            dev_idx = idx.to(exp.images.device)
            w, u, v = weights[j]
            batches.append(pool.batch(exp.images, idx, exp.dtype).with_weights(w=w[dev_idx], u=u[dev_idx], v=v[dev_idx]))
        try:
            grads, losses = _meta_gradients(exp, lam, batches, use_vmap)
        except RuntimeError as exc:
            if not use_vmap:
                raise
            log.warning("vmap over models failed (%s); computing the stack one model at a time", exc)
            use_vmap = False
            grads, losses = _meta_gradients(exp, lam, batches, use_vmap)
        task_w = torch.stack([b.w for b in batches])
        member_loss = ((task_w * losses).sum(1) / o.meta_batch_size).tolist()
        for j, loss in enumerate(member_loss):
            if not math.isfinite(loss):
                raise MetaifError(f"training diverged in {group[j].member.run_dir}: loss is {loss} at step "
                                  f"{step + 1}; lower optim.lr or meta.inner_lr")
        for k, t in lam.items():
            t.grad = grads[k] + o.delta_reg * t
        opt.step()
        done = step + 1
        rows = [{"step": done, "train_loss": loss} for loss in member_loss]
        if done % o.eval_every == 0 or done == steps:
            for row, val in zip(rows, evaluate_stack(exp, lam, "val", use_vmap)):
                row.update({k: x for k, x in val.items() if "ci95" not in k})
        lr = opt.param_groups[0]["lr"]
        for j in range(size):
            metrics[j].append(rows[j])
            loggers[j].log(done, {**rows[j], "lr": lr})
        if done in keep or done % o.checkpoint_every == 0 or done == steps:
            _checkpoint(group, lam, opt, gens, metrics, elapsed, time.perf_counter() - t0, done, done in keep,
                        done % o.checkpoint_every == 0 or done == steps)
    wall = time.perf_counter() - t0
    bar.close()
    for lg in loggers:
        lg.close()
    if end < steps:
        return [None] * size
    tests = evaluate_stack(exp, lam, "test", use_vmap)
    return [finish(s.exp, s.member.run_dir, member_params(lam, j), elapsed[j] + wall / size, steps,
                   s.member.weights, s.setup, metrics[j], tests[j]) for j, s in enumerate(group)]


def _checkpoint(group: list[_Live], lam: Params, opt: torch.optim.Optimizer, gens: list[torch.Generator],
                metrics: list[list[dict]], elapsed: list[float], wall: float, done: int, kept: bool,
                last: bool) -> None:
    """Each member's kept checkpoint (``checkpoints/step_*.pt``) and/or resume state, as the single loop writes them."""
    state = opt.state_dict()
    lr = opt.param_groups[0]["lr"]
    for j, s in enumerate(group):
        run_dir, lam_j = s.member.run_dir, member_params(lam, j)
        opt_j = member_optimizer_state(state, j)
        if kept:
            save_torch({"step": done, "lam": lam_j, "lr": lr, "optimizer": opt_j},
                       run_dir / C.CHECKPOINT_DIR / f"step_{done:06d}.pt")
        if last:
            now = elapsed[j] + wall / len(group)
            save_torch(train_state(done, lam_j, MemberOptimizer(opt_j), gens[j], metrics[j], now, s.exp,
                                   s.member.weights, s.setup), run_dir / C.CHECKPOINT_LAST, run_dir / C.CHECKPOINT_PREV)
            save_csv(pd.DataFrame(metrics[j]), run_dir / C.METRICS_CSV)
