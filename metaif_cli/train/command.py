"""``metaif train``: meta-train on a fixed, seeded task pool and write the run directory (method
§1); the Hydra entry point of the ``train`` command package.

Writes ``tasks.csv``, ``class_split.json``, ``train_config.json``, ``metrics.csv``,
checkpoints (``checkpoint_last.pt``, ``checkpoints/step_*.pt``), ``model.pt``,
``results.json`` and ``training_curves.png`` (names in :mod:`metaif_cli.constants`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from metaif_cli import constants as C
from metaif_cli.data.pool import pools_table
from metaif_cli.hydra_app import output_dir, quiet_libraries, run_hydra_app, save_hydra_config, to_typed
from metaif_cli.io import read_csv, save_csv, save_json
from metaif_cli.train.config import TrainConfig
from metaif_cli.train.experiment import build_experiment, config_dict
from metaif_cli.ownership import check_foreign, owned_dir
from metaif_cli.train.loop import checkpoint_steps, train
from metaif_cli.train.preflight import check_run_dir, check_sizes, record_data

log = logging.getLogger("metaif.train")

SCHEMAS = {"train_schema": TrainConfig}


def run_train(cfg: TrainConfig, run_dir: Path, before_write: Callable[[], None] | None = None) -> dict:
    """Build the experiment from ``cfg``, write the pool description, train (or resume).

    Everything is checked before the first write (the data and pools are built, and a
    ``run_dir`` holding another run is refused); ``before_write`` runs then (the command
    layer saves Hydra's ``.hydra/`` there).
    """
    with owned_dir(run_dir, "train"):
        return _run_train(cfg, run_dir, before_write)


def _run_train(cfg: TrainConfig, run_dir: Path, before_write: Callable[[], None] | None) -> dict:
    check_foreign(run_dir, "train")
    check_sizes(cfg.dataset)
    exp = build_experiment(cfg)
    check_run_dir(run_dir, cfg, exp.dataset)
    if before_write is not None:
        before_write()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(config_dict(cfg), run_dir / C.TRAIN_CONFIG_JSON)
    record_data(run_dir, exp.dataset)
    table = pools_table(exp.pools, exp.dataset)
    save_csv(table, run_dir / C.TASKS_CSV)
    split = {s: sorted(table.loc[table.split == s, "class"].unique().tolist()) for s in exp.pools}
    save_json(split, run_dir / C.SPLIT_JSON)
    note = cfg.optim.checkpoint_note(checkpoint_steps(cfg.optim.steps, cfg.optim.num_checkpoints))
    if note:
        log.info("%s", note)
    results = train(exp, run_dir)
    from metaif_cli.reports.training_plots import plot_training_curves

    metrics = pd.read_csv(run_dir / C.METRICS_CSV)
    plot_training_curves(metrics, run_dir / C.TRAINING_CURVES_PNG, cfg.dataset.ways)
    log.info("run directory: %s", run_dir)
    warn_if_not_learned(results, cfg.dataset.ways, metrics)
    return results


def warn_if_not_learned(results: dict, ways: int, metrics: pd.DataFrame) -> list[str]:
    """Warn (one line) when the run is at chance or its training loss stayed flat; return the reasons."""
    from metaif_cli.reports.learning import not_learned_advice, not_learned_reasons

    loss = metrics["train_loss"].to_numpy() if "train_loss" in metrics else None
    reasons = not_learned_reasons(float(results["test_acc"]), float(results["test_acc_ci95"]), ways, loss)
    if reasons:
        log.warning("%s", not_learned_advice(reasons))
    return reasons


def _task(cfg) -> float:
    quiet_libraries()
    typed = to_typed(cfg)
    if typed.threads:
        torch.set_num_threads(typed.threads)  # oversubscribed threads slow small models several-fold
    results = run_train(typed, output_dir(), save_hydra_config)
    return validation_accuracy(results, output_dir())


def validation_accuracy(results: dict, run_dir: Path) -> float:
    """What ``metaif train`` returns to Hydra (a sweeper optimises it): the meta-validation
    accuracy at the final step, never the meta-test accuracy (selecting on the test set)."""
    if "val_acc" in results:
        return float(results["val_acc"])
    frame = read_csv(run_dir / C.METRICS_CSV, "rerun the same metaif train command to rewrite it",
                     columns=("step",), complete=())  # a run finished by an older metaif
    return float(frame["val_acc"].dropna().iloc[-1])


def main() -> None:
    run_hydra_app(_task, "train", "train", SCHEMAS)
