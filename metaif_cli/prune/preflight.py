"""Checks ``metaif prune-and-retrain`` makes before any scoring, retraining or write (SPEC
sections 5-6).

Against the loaded run: ``scores=`` (read and checked in full), the number of units each
fraction removes (at least one, never the whole pool), ``num_units`` and
``retrain_subset`` against the units there are, ``lds.fraction`` and ``methods`` of
``protocol=lds``, the scoring settings under ``score.*`` (ensembles included)
(the same checks as ``metaif score``), and the run of an output directory already there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from metaif_cli import constants as C
from metaif_cli.checks import at_most
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_json, resolved_path
from metaif_cli.prune.config import PruneConfig
from metaif_cli.prune.lds import check_fraction, check_methods
from metaif_cli.prune.select import num_to_remove
from metaif_cli.prune.units import Unit
from metaif_cli.score.preflight import check_inputs
from metaif_cli.score.run import LoadedRun

def check_out_dir(out_dir: Path, cfg: PruneConfig) -> None:
    """Refuse, before writing, an output directory that holds the experiment of another training run.

    Other settings may change between reruns into one directory: rankings are cached with
    their settings and retrainings with their weights, so only what applies is reused.
    Runs are compared as resolved paths (a relative path or a trailing slash is the same run).
    """
    path = out_dir / C.PRUNE_CONFIG_JSON
    if not path.exists():
        return
    saved = load_json(path, f"delete {out_dir} or choose another hydra.run.dir", keys=("run",))
    if resolved_path(saved["run"]) != resolved_path(cfg.run):
        raise MetaifError(f"{out_dir} holds a prune-and-retrain experiment of run={saved['run']}, not {cfg.run}; "
                          "choose another hydra.run.dir or delete that directory")


def check_units(cfg: PruneConfig, units: list[Unit]) -> None:
    """Every fraction removes at least one unit and leaves at least one; samples fit the pool."""
    n = len(units)
    if cfg.protocol == "remove":
        for f in cfg.fractions:
            if num_to_remove(f, n) >= n:
                raise MetaifError(f"fractions: {f} would remove all {n} {cfg.unit} units and leave nothing to "
                                  f"train on; use fractions below {(n - 0.5) / n:.3g}")
    if cfg.protocol == "lds":
        check_fraction(cfg.lds.fraction, n)
        check_methods(cfg.methods)
    if cfg.protocol == "loo":
        at_most("num_units", cfg.num_units, n, f"the {cfg.unit} units of the run",
                f"use num_units <= {n}")
    if cfg.retrain_subset is not None and "retrain" in cfg.methods:
        at_most("retrain_subset", cfg.retrain_subset, n, f"the {cfg.unit} units of the run",
                f"use retrain_subset <= {n}, or null for all")


def check_prune(cfg: PruneConfig, run: LoadedRun, units: list[Unit], out_dir: Path) -> None:
    """All of the above, plus the scoring settings against the run (as ``metaif score`` checks them)."""
    check_units(cfg, units)
    scoring = [m for m in (["if"] if cfg.protocol == "loo" else cfg.methods) if m not in ("oracle", "retrain")]
    for method in scoring:
        check_inputs(run, dataclasses.replace(cfg.score, method=method, pred_delta_lam=[]), 1)
    check_out_dir(out_dir, cfg)
