"""Write a run directory that ``metaif score`` and ``prune-and-retrain`` accept, from given ``lam``
(method §1: the run directory is the interface between commands).

The directory holds what ``metaif train`` writes except its training history: the saved
config (the meta-learning settings the weights were trained with, used by every retraining),
``tasks.csv`` and ``class_split.json`` (the seeded pools), ``model.pt`` and ``results.json``
(meta-test accuracy of the given weights, ``imported_from`` naming their source). There are
no ``checkpoints/``, so ``method=tracin`` does not apply.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path
from typing import Callable

import torch

import metaif_cli
from metaif_cli import constants as C
from metaif_cli.data.pool import pools_table
from metaif_cli.errors import MetaifError
from metaif_cli.train.config import TrainConfig
from metaif_cli.train.experiment import Experiment, build_experiment, config_dict
from metaif_cli.importer.config import ImportConfig
from metaif_cli.importer.weights import fit_builtin, fit_custom, read_state_dict
from metaif_cli.io import save_csv, save_json, save_torch
from metaif_cli.meta.params import Params, non_finite
from metaif_cli.train.loop import evaluate_split
from metaif_cli.train.preflight import record_data

log = logging.getLogger(__name__)

HYDRA_FILES = (".hydra",)  # what Hydra writes into a run directory before the command starts


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse a directory that already holds files other than Hydra's own."""
    if run_dir.exists():
        held = [p.name for p in run_dir.iterdir() if p.name not in HYDRA_FILES and p.suffix != ".log"]
        if held:
            raise MetaifError(f"run_dir={run_dir} already holds {', '.join(sorted(held)[:5])}; "
                              "choose a new directory")


def lam_from_state_dict(exp: Experiment, state_dict: dict[str, torch.Tensor]) -> Params:
    """Fit a state dict to the experiment's network (built-in or ``model=custom``)."""
    cfg = exp.cfg
    if cfg.model.name == "custom":
        lam = fit_custom(cfg.model, state_dict, exp.dataset.image_shape, cfg.dataset.ways, cfg.seed, exp.dtype)
    else:
        lam = fit_builtin(exp.model, state_dict)
    return {k: v.to(exp.device, exp.dtype) for k, v in lam.items()}


def write_run_dir(exp: Experiment, lam: Params, run_dir: Path, source: dict | None = None) -> dict:
    """Evaluate ``lam`` on the meta-test pool and write the run directory; return ``results.json``.

    Args:
        exp: the experiment of the run (config, data, pools).
        lam: the meta-parameters, named as ``exp.model``'s parameters.
        run_dir: the new directory (must not hold a run).
        source: what the weights are (recorded as ``imported_from`` in ``results.json``).
    """
    check_new_run_dir(run_dir)
    bad = non_finite(lam)
    if bad:
        raise MetaifError(f"the weights hold NaN or infinite values (in {bad[0]}): they diverged; import weights "
                          "saved before the divergence")
    expected = {k: tuple(p.shape) for k, p in exp.model.named_parameters()}
    got = {k: tuple(v.shape) for k, v in lam.items()}
    if expected != got:
        raise MetaifError(f"lam does not fit the network: missing {sorted(set(expected) - set(got))}, "
                          f"unexpected {sorted(set(got) - set(expected))}")
    test = evaluate_split(exp, lam, "test")
    pool = exp.pools["train"]
    weights = {"w": torch.ones(len(pool)), "u": torch.ones(pool.spt_idx.shape), "v": torch.ones(pool.qry_idx.shape)}
    table = pools_table(exp.pools, exp.dataset)
    split = {s: sorted(table.loc[table.split == s, "class"].unique().tolist()) for s in exp.pools}
    save_json(config_dict(exp.cfg), run_dir / C.TRAIN_CONFIG_JSON)
    record_data(run_dir, exp.dataset)
    save_csv(table, run_dir / C.TASKS_CSV)
    save_json(split, run_dir / C.SPLIT_JSON)
    save_torch({"format_version": C.FORMAT_VERSION, "config": config_dict(exp.cfg),
                "lam": {k: v.detach().cpu() for k, v in lam.items()}, "weights": weights,
                "model_args": {"image_shape": list(exp.dataset.image_shape), "ways": exp.cfg.dataset.ways}},
               run_dir / C.MODEL_PT)
    results = {**test, "train_seconds": 0.0, "steps": 0, "seed": exp.cfg.seed, "device": str(exp.device),
               "dtype": str(exp.dtype).replace("torch.", ""), "imported_from": source or {},
               "versions": {"metaif": metaif_cli.__version__, "torch": torch.__version__,
                            "python": platform.python_version()}}
    save_json(results, run_dir / C.RESULTS_JSON)
    log.info("imported run: meta-test accuracy %.4f +- %.4f (loss %.4f); run directory %s", test["test_acc"],
             test["test_acc_ci95"], test["test_loss"], run_dir)
    return results


def import_run(cfg: ImportConfig, run_dir: Path | None = None, before_write: Callable[[], None] | None = None) -> dict:
    """``metaif import``: read ``cfg.weights``, fit it to the configured network, write ``run_dir``.

    Every check (weights readable and fitting, dataset loadable) runs before the first file is
    written, so a refused import leaves nothing behind.

    Raises:
        MetaifError: the directory holds a run, the file is unreadable, or the state dict does not fit
            (missing and unexpected keys listed).
    """
    run_dir = Path(run_dir or cfg.run_dir)
    check_new_run_dir(run_dir)
    state_dict = read_state_dict(Path(cfg.weights))
    train_cfg: TrainConfig = cfg.train_config()
    exp = build_experiment(train_cfg)
    lam = lam_from_state_dict(exp, state_dict)
    digest = hashlib.sha256(Path(cfg.weights).expanduser().read_bytes()).hexdigest()
    if before_write is not None:  # the command layer saves Hydra's .hydra/ once every check passed
        before_write()
    return write_run_dir(exp, lam, run_dir, {"weights": str(Path(cfg.weights).expanduser().resolve()),
                                             "sha256": digest})
