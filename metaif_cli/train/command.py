"""``metaif train``: meta-train on a fixed, seeded task pool and write the run directory (SPEC
section 1); the Hydra entry point of the ``train`` command package.

Writes ``tasks.csv``, ``class_split.json``, ``train_config.json``, ``metrics.csv``,
checkpoints (``checkpoint_last.pt``, ``checkpoints/step_*.pt``), ``model.pt``,
``results.json`` and ``training_curves.png`` (names in :mod:`metaif_cli.constants`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from metaif_cli import constants as C
from metaif_cli.data.pool import pools_table
from metaif_cli.hydra_app import output_dir, quiet_libraries, run_hydra_app, to_typed
from metaif_cli.io import save_csv, save_json
from metaif_cli.train.config import TrainConfig
from metaif_cli.train.experiment import build_experiment, config_dict
from metaif_cli.train.loop import train

log = logging.getLogger("metaif.train")

SCHEMAS = {"train_schema": TrainConfig}


def run_train(cfg: TrainConfig, run_dir: Path) -> dict:
    """Build the experiment from ``cfg``, write the pool description, train (or resume)."""
    exp = build_experiment(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(config_dict(cfg), run_dir / C.TRAIN_CONFIG_JSON)
    table = pools_table(exp.pools, exp.dataset)
    save_csv(table, run_dir / C.TASKS_CSV)
    split = {s: sorted(table.loc[table.split == s, "class"].unique().tolist()) for s in exp.pools}
    save_json(split, run_dir / C.SPLIT_JSON)
    results = train(exp, run_dir)
    from metaif_cli.reports.training_plots import plot_training_curves

    plot_training_curves(pd.read_csv(run_dir / C.METRICS_CSV), run_dir / C.TRAINING_CURVES_PNG)
    log.info("run directory: %s", run_dir)
    return results


def _task(cfg) -> float:
    quiet_libraries()
    typed = to_typed(cfg)
    if typed.threads:
        torch.set_num_threads(typed.threads)  # oversubscribed threads slow small models several-fold
    results = run_train(typed, output_dir())
    return float(results["test_acc"])


def main() -> None:
    run_hydra_app(_task, "train", "train", SCHEMAS)
