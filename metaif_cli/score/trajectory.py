"""``method=trajectory``: rebuild the recorded training run of a run directory (its batch order,
optimiser, and the states saved in ``checkpoints/step_*.pt``) and score every unit by one reverse
pass over it (method §5, trajectory influence; :mod:`metaif_cli.influence.trajectory`).

Runs trained before the checkpoints held the optimiser state are replayed from step 0 (the
seeded initialisation) in segments of ``ceil(sqrt(steps))`` steps, which costs one more forward
pass over the run; warm-started runs (``prune-and-retrain`` warm retrainings) are refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import torch

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_torch
from metaif_cli.influence.chunking import activation_floats, task_bytes
from metaif_cli.influence.compute import ScoreOutput
from metaif_cli.influence.problem import Problem
from metaif_cli.influence.trajectory import RecordedRun, trajectory_scores
from metaif_cli.influence.trajectory_step import OptimSpec, OptState
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.meta.params import FlatSpec, Params
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.run import LoadedRun, checkpoint_paths, load_checkpoint
from metaif_cli.train.loop import batch_schedule

log = logging.getLogger(__name__)


def optim_spec(run: LoadedRun, saved_optimizer: dict | None = None) -> OptimSpec:
    """The run's outer optimiser; Adam's ``betas``/``eps`` from a saved state when there is one."""
    o = run.train_cfg.optim
    if saved_optimizer is None or o.optimizer != "adam":
        return OptimSpec(o.optimizer, o.lr, o.delta_reg)
    group = saved_optimizer["param_groups"][0]
    if group.get("amsgrad") or group.get("maximize") or group.get("weight_decay"):
        raise MetaifError("method=trajectory replays plain Adam only (no amsgrad, maximize or weight_decay)")
    return OptimSpec("adam", float(group["lr"]), o.delta_reg, tuple(group["betas"]), float(group["eps"]))


def _state(saved: dict, names: list[str], device, dtype) -> OptState:
    """A ``checkpoints/step_*.pt`` with its optimiser state -> :class:`OptState`."""
    lam = {k: saved["lam"][k].to(device, dtype) for k in names}
    opt_state = saved["optimizer"]["state"]
    if not opt_state or "exp_avg" not in opt_state.get(0, {}):  # SGD (no state) or Adam before its first step
        return OptState(int(saved["step"]), lam)

    def moments(key: str) -> Params:
        return {k: opt_state[i][key].to(device, dtype) for i, k in enumerate(names)}

    return OptState(int(saved["step"]), lam, moments("exp_avg"), moments("exp_avg_sq"),
                    int(float(opt_state[0]["step"])))


def recorded_run(run: LoadedRun) -> tuple[RecordedRun, bool]:
    """The run as :class:`RecordedRun`, and whether its checkpoints held optimiser states."""
    exp, run_dir = run.exp, Path(run.run_dir)
    last_path = run_dir / C.CHECKPOINT_LAST
    if not last_path.exists():
        raise MetaifError(f"{run_dir} has no {C.CHECKPOINT_LAST}; method=trajectory replays the training run "
                          "and needs the run directory metaif train wrote")
    fix = f"method=trajectory replays the checkpoints metaif train wrote in {run_dir}: train again into a new directory"
    setup = load_torch(last_path, fix).get("setup") or {}
    if setup.get("init") is not None:
        raise MetaifError(f"{run_dir} was warm-started from other parameters; method=trajectory scores runs "
                          "trained from their seeded initialisation")
    steps = int(setup.get("steps") or run.train_cfg.optim.steps)
    init = exp.initial_params()
    names = list(init)
    states = {0: OptState(0, {k: t.detach() for k, t in init.items()})}
    saved_optimizer, complete = None, True
    for path in checkpoint_paths(run_dir):
        saved = load_checkpoint(path, fix)
        if "optimizer" not in saved:
            complete = False
            continue
        if 0 < int(saved["step"]) <= steps:
            states[int(saved["step"])] = _state(saved, names, exp.device, exp.dtype)
            saved_optimizer = saved["optimizer"]
    pool = exp.pools["train"]
    train = exp.tasks("train", weights=run.weights)  # each replayed step gathers its meta-batch alone
    schedule = batch_schedule(run.train_cfg, len(pool), steps)
    return RecordedRun(exp.learner, train, schedule, optim_spec(run, saved_optimizer), states), complete


def auto_segment(run: LoadedRun, budget_mb: float) -> int:
    """Steps whose graphs fit ``budget_mb``: a step holds one meta-batch of tasks (``chunking.task_bytes``)."""
    d, exp = run.train_cfg.dataset, run.exp
    per_task = task_bytes(sum(p.numel() for p in exp.model.parameters()),
                          activation_floats(exp.model, exp.dataset.image_shape),
                          d.ways * (d.shots + d.queries), run.train_cfg.meta.inner_steps,
                          torch.empty((), dtype=exp.dtype).element_size())
    steps = int(max(1, budget_mb * 2**20 // (per_task * run.train_cfg.optim.meta_batch_size)))
    log.info("trajectory.segment=auto: %d steps (chunk_budget_mb %g)", steps, budget_mb)
    return steps


def score_trajectory(run: LoadedRun, cfg: ScoreConfig, problem: Problem) -> ScoreOutput:
    """``pred_delta_test_loss = -d f(lam_T)/d w_e`` for every unit (``problem`` gives ``f`` and ``D f``)."""
    if cfg.evaluation.kind == "per_task":
        raise MetaifError("method=trajectory scores one evaluation function; use evaluation.kind=mean_loss or margin")
    recorded, complete = recorded_run(run)
    segment = cfg.trajectory.segment
    if segment == "auto":
        segment = auto_segment(run, cfg.chunk_budget_mb)
    if not complete and len(recorded.states) == 1:
        segment = segment or math.ceil(math.sqrt(recorded.steps))
        log.warning("%s: the checkpoints hold no optimiser state (trained by an older metaif); replaying from "
                    "step 0 in segments of %d steps (retrain for a faster pass)", run.run_dir, segment)
    if problem.learner.cfg.first_order:  # D f must be the derivative of f, not its first-order approximation
        problem.learner = MetaLearner(problem.learner.model, replace(problem.learner.cfg, first_order=False))
    spec = FlatSpec.of(run.lam)

    def eval_grad(lam: Params) -> tuple[float, Params]:
        value, g = problem.eval_mean_grad(spec.flatten(lam))  # accumulated: no [T, P]
        return float(value), spec.unflatten(g)

    result = trajectory_scores(recorded, eval_grad, segment, cfg.progress)
    drift = max(float((result.lam_final[k] - run.lam[k]).abs().max()) for k in run.lam)
    if drift > 1e-4 * (1 + max(float(t.abs().max()) for t in run.lam.values())):
        log.warning("the replayed final parameters differ from model.pt by %.3g (scoring in another dtype or "
                    "device than training?); the scores are derivatives of the replayed run", drift)
    log.info("trajectory: %d steps in %d segments, replay error %.3g", recorded.steps, len(result.segments),
             result.replay_error)
    info = {"steps": recorded.steps, "segments": len(result.segments), "replay_error": result.replay_error,
               "final_lam_difference": drift}
    return ScoreOutput(result.scores, eval_value=result.eval_value, seconds=result.seconds, info=info)
