"""Leave-one-out retraining: the ground truth influence scores approximate (method §5, E4).

For a seeded sample of units (``num_units``, drawn with the prune ``seed``):

- ``cold``: retrain from the original initialisation, seed and batch order for the
  original budget with the unit's weight 0; baseline = the trained ``lam*`` (the same
  retraining with the weight 1).
- ``warm``: start at ``lam*`` and train ``warm_steps`` more steps without the unit;
  baseline = the same warm continuation *with* the unit (same steps, same batch order,
  fresh optimiser state), so optimiser drift cancels: what an influence function
  approximates best (Bae et al. 2022).

``actual_delta_test_loss = f(lam_retrained) - f(lam_baseline)`` with ``f`` the
evaluation function of the scores (:func:`metaif_cli.score.methods.build_problem`: mean query
loss after adaptation on the first ``evaluation.num_tasks`` meta-test tasks), and
``actual_delta_lam = lam_retrained - lam_baseline``, compared with ``pred_delta_lam``
by cosine and norm ratio. Retrainings live in ``retrains/loo-cold-<unit>/`` and
``retrains/loo-warm<steps>-<unit>/`` (``...-baseline`` for the warm baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from metaif_cli import constants as C
from metaif_cli.io import load_torch
from metaif_cli.meta.params import FlatSpec, Params
from metaif_cli.reports.agreement import vector_agreement
from metaif_cli.prune.launch import RetrainJob
from metaif_cli.prune.seeds import SeedVariant, with_seeds
from metaif_cli.prune.units import Unit
from metaif_cli.prune.update import IFEditor, retrain_job
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.methods import build_problem
from metaif_cli.score.run import LoadedRun

Launch = Callable[[list[RetrainJob]], list[dict]]


def sample_units(units: list[Unit], num: int | None, seed: int) -> list[Unit]:
    """``num`` units drawn without replacement with ``seed`` (all when ``num`` is None or too large), in pool order."""
    if num is None or num >= len(units):
        return list(units)
    pick = np.sort(np.random.default_rng(seed).choice(len(units), size=num, replace=False))
    return [units[i] for i in pick]


def loo_dir(root: Path, mode: str, unit: Unit | None, warm_steps: int) -> Path:
    """``loo-cold-task-3``, ``loo-warm200-support-3-0``, ``loo-warm200-baseline``."""
    name = "baseline" if unit is None else unit.id.replace(":", "-")
    return root / (f"loo-cold-{name}" if mode == "cold" else f"loo-warm{warm_steps}-{name}")


class EvalFunction:
    """``f(lam)``: the evaluation function the scores use (mean over evaluation tasks)."""

    def __init__(self, run: LoadedRun, cfg: ScoreConfig) -> None:
        self.problem = build_problem(run, cfg)
        self.spec = FlatSpec.of(run.lam)
        self.device, self.dtype = run.exp.device, run.exp.dtype

    def __call__(self, lam: Params) -> float:
        return float(self._values(lam).mean())

    def values(self, lam: Params) -> np.ndarray:
        """``f`` on each evaluation task ``[T]`` (float64)."""
        return self._values(lam).detach().double().cpu().numpy()

    def _values(self, lam: Params) -> torch.Tensor:
        theta = self.spec.flatten({k: v.to(self.device, self.dtype) for k, v in lam.items()})
        return self.problem.eval_grad(theta)[0]


def load_lam(run_dir: Path) -> Params:
    """The final ``lam`` of a finished (re)training."""
    return load_torch(Path(run_dir) / C.MODEL_PT, "rerun the same metaif prune-and-retrain command to retrain it",
                      keys=("lam",))["lam"]


@dataclass
class LooRetrains:
    """Outcome of one mode: ``delta_f [m]``, ``delta_lam [m, P]`` and the retraining seconds (sum)."""

    mode: str
    units: list[Unit]
    delta_f: np.ndarray
    delta_lam: np.ndarray
    seconds: float


def run_loo(run: LoadedRun, cfg: ScoreConfig, units: list[Unit], mode: str, root: Path, warm_steps: int,
            launch: Launch, f: EvalFunction | None = None, progress: bool = False,
            variants: list[SeedVariant] | None = None) -> LooRetrains:
    """Retrain without each unit (``cold`` or ``warm``) and measure the changes against the baseline.

    ``variants`` (``retrain_seeds``): repeat every retraining and its baseline with these batch
    orders and average: ``delta_f`` is the mean over seeds of ``f`` without the unit minus the
    mean with it, ``delta_lam`` the mean of the per-seed differences. Variant 0 (the default
    and only one) is the run's own; its cold baseline is ``lam*`` itself.
    """
    f = f or EvalFunction(run, cfg)
    spec = FlatSpec.of(run.lam)
    warm = mode == "warm"
    variants = variants or [SeedVariant(0)]
    init, steps = (run.lam, warm_steps) if warm else (None, None)

    def where(unit: Unit | None, v: SeedVariant) -> Path:
        base = loo_dir(root, mode, unit, warm_steps)
        return base.with_name(base.name + v.suffix)

    jobs = [with_seeds(retrain_job(run, [u], where(u, v), init, steps, progress), v) for v in variants for u in units]
    jobs += [with_seeds(retrain_job(run, [], where(None, v), init, steps, progress), v) for v in variants
             if warm or v.index > 0]
    results = launch(jobs)
    base_f, base_flat = [], []
    for v in variants:
        lam = (load_lam(where(None, v)) if warm or v.index > 0
               else {k: t.detach().cpu() for k, t in run.lam.items()})
        base_f.append(f(lam))
        base_flat.append(spec.flatten(lam).double())
    delta_f, delta_lam = [], []
    for u in units:
        lams = [load_lam(where(u, v)) for v in variants]
        delta_f.append(float(np.mean([f(lam) for lam in lams]) - np.mean(base_f)))
        delta_lam.append(torch.stack([spec.flatten(lam).double() - b for lam, b in zip(lams, base_flat)])
                         .mean(0).numpy())
    seconds = float(sum(r["train_seconds"] for r in results))
    return LooRetrains(mode, units, np.array(delta_f), np.stack(delta_lam) if delta_lam else np.zeros((0, 0)), seconds)


def loo_table(retrains: LooRetrains, pred_scores: pd.Series, editor: IFEditor) -> pd.DataFrame:
    """Rows of ``loo_results.csv`` for one mode; ``pred_scores``: ``pred_delta_test_loss`` by unit id."""
    pred_lam = np.stack([editor.delta_lam([u]).double().cpu().numpy() for u in retrains.units])  # [m, P]
    cos, ratio = vector_agreement(pred_lam, retrains.delta_lam)
    return pd.DataFrame({
        "unit_id": [u.id for u in retrains.units],
        "unit": [u.kind for u in retrains.units],
        "pred_delta_test_loss": pred_scores.loc[[u.id for u in retrains.units]].to_numpy(dtype=float),
        "actual_delta_test_loss": retrains.delta_f,
        "retrain": retrains.mode,
        "cos_delta_lam": cos,
        "norm_ratio_delta_lam": ratio,
    })
