"""Checks ``metaif prune-and-retrain`` makes before any scoring, retraining or write (method
§5-6).

Against the loaded run: ``scores=`` (read and checked in full), the number of units each
fraction removes (at least one, never the whole pool), ``num_units`` and
``retrain_subset`` against the units there are, ``lds.fraction`` and ``methods`` of
``protocol=lds``, the scoring settings under ``score.*`` (ensembles included)
(the same checks as ``metaif score``), the run's ``results.json``, the size of the plan
(:mod:`metaif_cli.prune.sizing`), and an output directory already there: it must hold an
experiment of the same run, unchanged since (its fingerprint), and, where its retrainings
depend on the rankings (``update=retrain``), of the same ranking settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from metaif_cli import constants as C
from metaif_cli.checks import at_most, differing_keys
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_json, resolved_path
from metaif_cli.prune.config import PruneConfig
from metaif_cli.prune.lds import check_fraction, check_methods
from metaif_cli.prune.select import num_to_remove
from metaif_cli.prune.sizing import check_sizes
from metaif_cli.prune.units import Unit
from metaif_cli.score.preflight import check_inputs
from metaif_cli.score.run import LoadedRun

# what the rankings, and so the retrainings retrains/<method>-<fraction>, depend on
RANKING_KEYS = ("unit", "seed", "scores", "retrain_subset", "score")
SCORE_DISPLAY = ("overwrite", "progress", "plots", "shard", "pred_delta_lam", "grid_size", "chunk", "data", "device",
                 "run", "method")


def _ranking_settings(config: dict) -> dict:
    out = {k: config[k] for k in RANKING_KEYS if k in config}
    if isinstance(out.get("score"), dict):
        out["score"] = {k: v for k, v in out["score"].items() if k not in SCORE_DISPLAY}
    if out.get("scores"):
        out["scores"] = resolved_path(out["scores"])
    return out


def check_out_dir(out_dir: Path, cfg: PruneConfig, fingerprint: str | None = None) -> None:
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
    if fingerprint is not None and saved.get("run_fingerprint", fingerprint) != fingerprint:
        raise MetaifError(f"{out_dir} holds a prune-and-retrain experiment of an earlier version of run={cfg.run} (its "
                          f"{C.MODEL_PT} or {C.TASKS_CSV} changed since); choose another hydra.run.dir or delete "
                          "that directory")
    if cfg.protocol == "remove" and cfg.update == "retrain" and saved.get("update", "retrain") == "retrain":
        have, want = _ranking_settings(saved), _ranking_settings(dataclasses.asdict(cfg))
        have = {k: v for k, v in have.items() if k in want}
        differ = differing_keys(have, {k: v for k, v in want.items() if k in have})
        if differ:
            raise MetaifError(f"{out_dir} holds retrainings of rankings made with other settings ({', '.join(differ)} "
                              f"differ, per {C.PRUNE_CONFIG_JSON}); choose another hydra.run.dir or delete that "
                              "directory")


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
    results = load_json(run.run_dir / C.RESULTS_JSON, f"rerun the metaif train command that wrote {run.run_dir} "
                        "to rewrite it", keys=("test_acc", "test_acc_ci95", "test_loss", "train_seconds"))
    pool = run.exp.pools["train"]
    root = out_dir / C.RETRAIN_DIR
    if cfg.protocol == "lds":
        root = Path(resolved_path(cfg.lds.retrain_dir)) if cfg.lds.retrain_dir else out_dir.parent
    check_sizes(cfg, len(units), sum(t.numel() for t in run.lam.values()),
                (len(pool), pool.spt_idx.shape[1], pool.qry_idx.shape[1]), run.train_cfg.optim.num_checkpoints,
                run.exp.dtype.itemsize, root, bool(results.get("imported_from")))
    check_out_dir(out_dir, cfg, run.fingerprint)
