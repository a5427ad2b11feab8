"""Load a finished training run for scoring: ``model.pt``, the saved config, the pools, the
checkpoints (method §3: scores are taken at the trained ``lam``).

Reads the run directory written by ``metaif train`` and rebuilds the experiment through
:func:`metaif_cli.train.experiment.build_experiment`; never retrains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.fingerprint import files_digest
from metaif_cli.influence.chunking import resolve_chunk
from metaif_cli.io import load_torch, read_csv, resolved_path
from metaif_cli.meta.params import FlatSpec, non_finite
from metaif_cli.models.custom import trusted_factory
from metaif_cli.train.config import TrainConfig
from metaif_cli.train.experiment import Experiment, build_experiment, config_from_dict
from metaif_cli.train.finished import load_trained
from metaif_cli.train.preflight import check_data


@dataclass
class LoadedRun:
    """A finished training run rebuilt for scoring."""

    run_dir: Path
    train_cfg: TrainConfig
    exp: Experiment
    lam: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    fingerprint: str = ""  # of model.pt, tasks.csv and data_fingerprint.json (see run_fingerprint)
    tasks: object = None  # tasks.csv as read and checked when the run was loaded


def run_fingerprint(run_dir: Path) -> str:
    """What a run's scores are computed from: its weights and pool weights (``model.pt``), its task pool
    (``tasks.csv``) and its data (``data_fingerprint.json``). A retrained run gives another one."""
    return files_digest(run_dir / name for name in (C.MODEL_PT, C.TASKS_CSV, C.DATA_FINGERPRINT_JSON))


def load_run(run_dir: str | Path, device: str | None = None, dtype: str | None = None, data=None,
             factory: str | None = None) -> LoadedRun:
    """Rebuild experiment, trained ``lam`` and pool weights from a run directory.

    ``run_dir`` may start with ``~``. ``data``: a :class:`~metaif_cli.score.config.RunDataConfig`
    pointing at the run's data elsewhere (a copied run); the images found must be the ones
    the run recorded. ``tasks.csv`` is read and checked here, before any computation. The run's
    ``threads`` setting applies here too: scoring runs the same small networks as training,
    and is timed against it (``scripts/bench_score.py``). A ``model=custom`` run is rebuilt only
    with a factory the caller vouches for (``factory``, the user's ``factory=`` setting) or a
    registered one: the run's own files never choose code to import
    (:func:`metaif_cli.models.custom.trusted_factory`).
    """
    run_dir = Path(resolved_path(run_dir))
    saved = load_trained(run_dir)
    train_cfg = config_from_dict(saved["config"])
    if train_cfg.model.name == "custom":
        train_cfg.model.factory = trusted_factory(train_cfg.model.factory, factory, str(run_dir))
    elif factory:
        raise MetaifError(f"factory={factory!r} applies to model=custom runs only; run {run_dir} uses "
                          f"model={train_cfg.model.name}: drop factory=")
    moved = {k: v for k, v in (("root", getattr(data, "root", None)), ("cache", getattr(data, "cache", None)))
             if v is not None}
    if moved:
        train_cfg = dataclasses.replace(train_cfg, data=dataclasses.replace(train_cfg.data, **moved))
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    exp = build_experiment(train_cfg, device=device, dtype=dtype)
    check_data(run_dir, exp.dataset, train_cfg.data.root,
               "point data.root= at the data the run was trained on, or retrain the run")
    lam = {k: v.to(exp.device, exp.dtype) for k, v in saved["lam"].items()}
    pool = exp.pools["train"]
    ones = {"w": torch.ones(len(pool)), "u": torch.ones(pool.spt_idx.shape), "v": torch.ones(pool.qry_idx.shape)}
    run = LoadedRun(run_dir, train_cfg, exp, lam, saved.get("weights", ones), run_fingerprint(run_dir))
    run.tasks = read_tasks_csv(run)
    return run


TASKS_COLUMNS = ("task_id", "split", "role", "position", "instance_id", "class", "label", "true_label",
                 "corrupted", "task_corrupted")


def read_tasks_csv(run: LoadedRun):
    """The run's ``tasks.csv``, checked against its pools (a truncated or damaged file is refused)."""
    rows = sum(len(p) * (p.spt_idx.shape[1] + p.qry_idx.shape[1]) for p in run.exp.pools.values())
    return read_csv(run.run_dir / C.TASKS_CSV, f"rerun the metaif train command that wrote {run.run_dir} "
                    "to rewrite it", columns=TASKS_COLUMNS, rows=rows)


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``step_<step>.pt`` checkpoint, from its name (None for any other name)."""
    digits = path.stem[len("step_"):]
    return int(digits) if path.stem.startswith("step_") and digits.isdigit() else None


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The run's intermediate checkpoints (``checkpoints/step_<step>.pt``), in step order.

    Every method that reads them (TracIn, TRAK, ensembles, the trajectory replay) lists them here.
    """
    paths = [p for p in (run_dir / C.CHECKPOINT_DIR).glob("step_*.pt") if checkpoint_step(p) is not None]
    return sorted(paths, key=checkpoint_step)


def load_checkpoint(path: Path, fix: str, keys: tuple[str, ...] = ("step", "lam")) -> dict:
    """An intermediate checkpoint (``load_torch``), refused when its ``lam`` is NaN or infinite."""
    saved = load_torch(path, fix, keys=keys)
    bad = non_finite(saved["lam"]) if isinstance(saved.get("lam"), dict) else []
    if bad:
        raise MetaifError(f"{path} holds a diverged checkpoint ({bad[0]} is not finite); retrain the run with a "
                          "lower optim.lr into a new directory")
    return saved


def tracin_checkpoints(run: LoadedRun) -> list[tuple[torch.Tensor, float]]:
    """``(theta_c, lr_c)`` of every intermediate checkpoint kept by training."""
    spec = FlatSpec.of(run.lam)
    out = []
    for path in checkpoint_paths(run.run_dir):
        saved = load_checkpoint(path, "an intermediate checkpoint is only written while training: train again "
                                "into a new directory, or choose another method than tracin", keys=("lam", "lr"))
        out.append((spec.flatten({k: v.to(run.exp.device, run.exp.dtype) for k, v in saved["lam"].items()}),
                    float(saved["lr"])))
    return out


def task_chunk(run: LoadedRun, chunk: int | str, budget_mb: float) -> int:
    """Tasks per vmapped call for this run: ``chunk`` itself, or ``auto`` from the model and ``budget_mb``."""
    d = run.train_cfg.dataset
    return resolve_chunk(chunk, run.exp.model, run.exp.dataset.image_shape, d.ways * (d.shots + d.queries),
                         run.train_cfg.meta.inner_steps, run.exp.dtype, budget_mb)
