"""Trajectory influence: the exact first-order effect of every unit's weight on ``f(lam_T)``
through the recorded training run (method §5; Hara et al. 2019, SGD-influence; Bae et al.
2024, SOURCE).

Training is a chain ``z_{t+1} = Phi_t(z_t; w, u, v)`` of outer steps (state ``z = (lam, m, v)``:
parameters and Adam's moments; :mod:`metaif_cli.influence.trajectory_step`), each on the
meta-batch the seeded generator drew. One reverse-mode pass gives every weight's derivative:
the adjoint starts at ``a_T = (D f(lam_T), 0, 0)`` and moves back by ``a_t = (dPhi_t/dz_t)^T
a_{t+1}``, and each step adds ``(dPhi_t/d(w, u, v))^T a_{t+1}`` to the weights of the tasks in
its batch. Removal moves a weight from 1 to 0, so

    pred_delta_test_loss(e) = -d f(lam_T) / d w_e.

Memory stays at one segment: the run is cut at the states the caller knows (saved checkpoints,
and step 0), and, when ``segment`` is given, into pieces of at most ``segment`` steps (their
starting states replayed forward without graphs, once per gap). Segments are processed last
first: replay forward keeping each step's ``vjp``, then pull the adjoint back through them.
Where a replayed segment ends at a known state, the largest difference between the two is
reported (``replay_error``; 0 when the replay reproduces the run).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import vjp

from metaif_cli.checks import positive
from metaif_cli.errors import MetaifError
from metaif_cli.influence.problem import UnitScores
from metaif_cli.influence.trajectory_step import OptimSpec, OptState, make_step
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.meta.params import Params
from metaif_cli.meta.tasks import TaskBatch
from metaif_cli.progress import bar as progress_bar
from metaif_cli.progress import finish

log = logging.getLogger(__name__)

@dataclass
class TrajectoryConfig:
    """``method=trajectory`` settings (``trajectory.*``). ``segment``: at most this many steps'
    graphs held in memory at once (null: everything between two saved checkpoints; a smaller
    value replays each gap once more without graphs to find the segment starts). ``auto`` (the
    default): as many steps as the score's ``chunk_budget_mb`` holds, a step holding one
    meta-batch of tasks (:func:`metaif_cli.influence.chunking.task_bytes`); the scores do not
    depend on it."""

    segment: Any = "auto"  # "auto", null or a whole number of steps (Any: Hydra takes all three)

    def __post_init__(self) -> None:
        if self.segment is not None and self.segment != "auto":
            if isinstance(self.segment, bool) or not isinstance(self.segment, int):
                raise MetaifError(f"trajectory.segment={self.segment!r} is not valid; use auto, null or a whole "
                                  "number of steps such as trajectory.segment=20")
            positive("trajectory.segment", self.segment)


EvalGrad = Callable[[Params], tuple[float, Params]]  # lam -> (f(lam), D f(lam))


@dataclass
class RecordedRun:
    """What a training run did: the learner, all training tasks with their weights (``train``),
    the task indices of every step's meta-batch (``schedule``), the optimiser, and the states
    known (``states[step]``; step 0 at least)."""

    learner: MetaLearner
    train: TaskBatch
    schedule: list[Tensor]
    optim: OptimSpec
    states: dict[int, OptState]

    @property
    def steps(self) -> int:
        return len(self.schedule)


@dataclass
class TrajectoryResult:
    """``scores`` (``-d f / d weight``), ``f(lam_T)``, the replayed ``lam_T``, the largest
    difference between a replayed and a known state, the segments, and timings."""

    scores: UnitScores
    eval_value: float
    lam_final: Params
    replay_error: float
    segments: list[tuple[int, int]]
    seconds: dict[str, float] = field(default_factory=dict)


def plan_segments(known: list[int], steps: int, segment: int | None) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` pieces of ``[0, steps)``: cut at every known state below
    ``steps``, then into pieces of at most ``segment`` steps."""
    cuts = sorted({s for s in known if 0 <= s < steps})
    if not cuts or cuts[0] != 0:
        raise MetaifError("trajectory influence needs the state at step 0 (the initialisation)")
    out = []
    for a, b in zip(cuts, cuts[1:] + [steps]):
        size = b - a if segment is None else segment
        out += [(s, min(s + size, b)) for s in range(a, b, size)]
    return out


def _detach(z):
    return tuple({k: t.detach() for k, t in d.items()} for d in z)


def _max_diff(a: Params, b: Params) -> float:
    return max(float((a[k] - b[k].to(a[k])).abs().max()) for k in a) if a else 0.0


class _Replay:
    """Forward replay of the run from known states (no graphs) with a cache of segment starts."""

    def __init__(self, run: RecordedRun) -> None:
        self.run = run
        self.cache: dict[int, tuple[tuple[Params, Params, Params], int]] = {}
        self.error = 0.0

    def step_fn(self, t: int, count: int):
        batch = self.run.train[self.run.schedule[t].to(self.run.train.w.device)]
        return make_step(self.run.learner, self.run.optim, batch, count), batch

    def start(self, a: int, starts: list[int]) -> tuple[tuple[Params, Params, Params], int]:
        """``(z_a, Adam count at a)``; forward-replays the gap holding ``a`` when ``a`` is not known."""
        if a in self.run.states:
            st = self.run.states[a]
            return st.tensors(), st.opt_step
        if a not in self.cache:
            k = max(s for s in self.run.states if s < a)
            st = self.run.states[k]
            z, count = st.tensors(), st.opt_step
            nxt = min([s for s in self.run.states if s > k] + [self.run.steps])
            stops = {s for s in starts if k < s < nxt}
            for t in range(k, max(stops)):
                fn, b = self.step_fn(t, count + 1)
                z, count = _detach(fn(*z, b.w, b.u, b.v)), count + 1
                if t + 1 in stops:
                    self.cache[t + 1] = (z, count)
        return self.cache.pop(a)

    def check(self, step: int, lam: Params) -> None:
        if step in self.run.states:
            self.error = max(self.error, _max_diff(lam, self.run.states[step].lam))


def trajectory_scores(run: RecordedRun, eval_grad: EvalGrad, segment: int | None = None,
                      progress: bool = False) -> TrajectoryResult:
    """``-d f(lam_T) / d w_e`` for every task, support and query weight by one reverse pass."""
    if segment is not None and segment < 1:
        raise MetaifError(f"trajectory.segment must be a positive number of steps; got {segment}")
    train = run.train
    segments = plan_segments(list(run.states), run.steps, segment)
    starts = [a for a, _ in segments]
    replay = _Replay(run)
    d_w, d_u, d_v = (torch.zeros_like(t) for t in (train.w, train.u, train.v))
    adjoint, eval_value, lam_final = None, math.nan, {}
    times = {"forward": 0.0, "reverse": 0.0, "eval_grad": 0.0}
    bar = progress_bar(total=run.steps, desc="trajectory", enabled=progress)
    for a, b in reversed(segments):
        t0 = time.perf_counter()
        z, count = replay.start(a, starts)
        pulls = []
        for t in range(a, b):
            count += 1
            fn, batch = replay.step_fn(t, count)
            out, pull = vjp(fn, *z, batch.w, batch.u, batch.v)
            pulls.append((run.schedule[t].to(train.w.device), pull))
            z = _detach(out)
        replay.check(b, z[0])
        times["forward"] += time.perf_counter() - t0
        if adjoint is None:  # the last segment: start the adjoint at D f(lam_T)
            t0 = time.perf_counter()
            lam_final = z[0]
            eval_value, df = eval_grad(lam_final)
            adjoint = ({k: df[k].to(z[0][k]) for k in z[0]},
                       {k: torch.zeros_like(t) for k, t in z[1].items()},
                       {k: torch.zeros_like(t) for k, t in z[2].items()})
            times["eval_grad"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for idx, pull in reversed(pulls):
            a_lam, a_m, a_v, g_w, g_u, g_v = pull(adjoint)
            d_w.index_add_(0, idx, g_w)
            d_u.index_add_(0, idx, g_u)
            d_v.index_add_(0, idx, g_v)
            adjoint = _detach((a_lam, a_m, a_v))
            bar.update(1)
        del pulls
        times["reverse"] += time.perf_counter() - t0
    finish(bar)
    if not all(torch.isfinite(t).all() for t in (d_w, d_u, d_v)):
        raise MetaifError("trajectory influence produced NaN or inf: the recorded run diverged or is broken; "
                          "check its metrics.csv, or score in dtype=float64")
    scores = UnitScores(task=-d_w, query=-d_v, support=-d_u)
    return TrajectoryResult(scores, eval_value, lam_final, replay.error, segments, times)
