"""Ranked units for each scoring method: computed here, read from a ``score`` directory, or cached.

A :class:`Ranking` orders the units of one kind from most to least harmful (``rank`` 1 =
most harmful, the convention of ``task_scores.csv``/``instance_scores.csv``, method
§3). Scoring methods (``if``, ``random``, ``loss``, ``direct_if``, ``grad_sim``,
``tracin``, ``ekfac_if``, ``trak``) run through :func:`metaif_cli.score.methods.run_method` with the ``score`` settings
of the prune config and the method overridden; the wall-clock time of that call is the
method's ``selection_seconds``. Each ranking is cached in ``selection/<method>.csv`` with
its settings in ``selection/<method>.json``, so a rerun does not score again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_json, read_csv, save_csv, save_json, unreadable
from metaif_cli.prune.config import PruneConfig
from metaif_cli.score.config import ScoreConfig, settings_of
from metaif_cli.score.methods import run_method
from metaif_cli.score.outputs import check_recorded, instance_table, score_column, task_table
from metaif_cli.score.run import LoadedRun, read_tasks_csv

log = logging.getLogger(__name__)

SCORING_METHODS = ("if", "random", "loss", "direct_if", "grad_sim", "tracin", "ekfac_if", "trak", "trajectory")


@dataclass
class Ranking:
    """Units of one kind, most harmful first.

    ``table``: ``unit_id, score, rank, corrupted`` sorted by ``rank``; ``column`` names what
    ``score`` is (its sign convention); ``limit``: remove at most this many (oracle, retrain).
    """

    method: str
    table: pd.DataFrame
    column: str
    seconds: float
    source: str
    limit: int | None = None
    settings: dict | None = None


def score_config_for(cfg: PruneConfig, method: str) -> ScoreConfig:
    """``cfg.score`` with ``method`` (``random`` draws from the prune ``seed``); no plots or files."""
    seed = cfg.seed if method == "random" else cfg.score.seed
    return dataclasses.replace(cfg.score, run=cfg.run, method=method, seed=seed, plots=False,
                               unit="task" if cfg.unit == "task" else "instance", progress=cfg.progress,
                               pred_delta_lam=[], shard=None)


def table_of(tasks_df: pd.DataFrame | None, inst_df: pd.DataFrame | None, method: str, kind: str) -> pd.DataFrame:
    """``unit_id, score, rank, corrupted`` for ``kind`` out of ``score``'s task or instance table."""
    col = score_column(method)
    if kind == "task":
        if tasks_df is None:
            raise MetaifError("the scores hold no task table; score with unit=task or unit=all")
        df = tasks_df.assign(unit_id=[f"task:{k}" for k in tasks_df.task_id])
    else:
        if inst_df is None:
            raise MetaifError("the scores hold no instance table; score with unit=instance or unit=all")
        df = inst_df[inst_df.role == kind]
        df = df.assign(unit_id=[f"{kind}:{k}:{j}" for k, j in zip(df.task_id, df.position)])
    out = pd.DataFrame({"unit_id": df.unit_id.to_numpy(), "score": df[col].to_numpy(dtype=float),
                        "rank": df["rank"].to_numpy(), "corrupted": df["corrupted"].astype(bool).to_numpy()})
    return out.sort_values("rank", kind="stable").reset_index(drop=True)


def compute_ranking(run: LoadedRun, cfg: PruneConfig, method: str) -> Ranking:
    """Score every unit with ``method``; the time taken is the selection runtime."""
    scfg = score_config_for(cfg, method)
    t0 = time.perf_counter()
    out = run_method(run, scfg)
    seconds = time.perf_counter() - t0
    tasks_csv = read_tasks_csv(run)
    if cfg.unit == "task":
        table = table_of(task_table(out.scores, tasks_csv, method), None, method, "task")
    else:
        table = table_of(None, instance_table(out.scores, tasks_csv, method), method, cfg.unit)
    log.info("scored %d %s units with %s in %.1f s", len(table), cfg.unit, method, seconds)
    return Ranking(method, table, score_column(method), seconds, "computed", settings=settings_of(scfg))


def read_scores_dir(scores_dir: Path, run: LoadedRun, kind: str) -> Ranking:
    """The ranking stored by ``metaif score`` in ``scores_dir`` (its method from ``score.json``).

    Every file is checked: a missing, truncated or damaged ``score.json`` or score table
    is refused in one line naming it (never ranked on partial rows).
    """
    run_dir = run.run_dir
    summary_path = scores_dir / C.SCORE_JSON
    if not summary_path.exists():
        raise MetaifError(f"{scores_dir} holds no {C.SCORE_JSON}; pass scores=<a directory written by metaif score>")
    fix = f"rerun the metaif score command that wrote {scores_dir} (or pass no scores=)"
    summary = load_json(summary_path, fix, keys=("run", "method", "total_seconds"))
    seconds = summary["total_seconds"]
    if not (isinstance(summary["run"], str) and isinstance(summary["method"], str)
            and isinstance(seconds, (int, float)) and not isinstance(seconds, bool)):
        raise unreadable(summary_path, fix, ValueError("'run' and 'method' must be text and 'total_seconds' a number"))
    if Path(summary["run"]).resolve() != run_dir.resolve():
        raise MetaifError(f"the scores in {scores_dir} were computed for run={summary['run']}, not {run_dir}; "
                          "pass the matching run= or score this run first")
    if "run_fingerprint" not in summary:  # written by an older metaif: nothing to check against
        log.warning("the scores in %s record no fingerprint of the run they were computed from; using them as they "
                    "are (rescore with overwrite=true to have them checked)", scores_dir)
    elif summary["run_fingerprint"] != run.fingerprint:
        raise MetaifError(f"the scores in {scores_dir} were computed from another version of {run_dir} (its "
                          f"{C.MODEL_PT} or {C.TASKS_CSV} changed since); rerun metaif score run={run_dir} into it "
                          "with overwrite=true, or pass no scores=")
    method = summary["method"]
    tasks_path, inst_path = scores_dir / C.TASK_SCORES_CSV, scores_dir / C.INSTANCE_SCORES_CSV
    pool = run.exp.pools["train"]
    col = score_column(method)
    tasks_df = inst_df = None
    if kind == "task" and tasks_path.exists():
        tasks_df = read_csv(tasks_path, fix, columns=("task_id", col, "rank", "corrupted"), rows=len(pool))
    if kind != "task" and inst_path.exists():
        inst_df = read_csv(inst_path, fix, columns=("task_id", "role", "position", col, "rank", "corrupted"),
                           rows=len(pool) * (pool.spt_idx.shape[1] + pool.qry_idx.shape[1]))
    for path, frame in ((tasks_path, tasks_df), (inst_path, inst_df)):
        if frame is not None and not np.isfinite(pd.to_numeric(frame[col], errors="coerce")).all():
            raise unreadable(path, fix, ValueError(f"column {col} holds non-finite scores"))
    check_recorded(tasks_path if kind == "task" else inst_path, summary, fix)
    table = table_of(tasks_df, inst_df, method, kind)
    return Ranking(method, table, score_column(method), float(summary["total_seconds"]), str(scores_dir),
                   settings=summary.get("settings"))


def save_ranking(ranking: Ranking, out_dir: Path) -> None:
    """Cache ``ranking`` as ``selection/<method>.csv`` (score column named by its convention) and ``.json``."""
    folder = out_dir / C.SELECTION_DIR
    save_csv(ranking.table.rename(columns={"score": ranking.column}), folder / f"{ranking.method}.csv")
    save_json({"method": ranking.method, "column": ranking.column, "seconds": ranking.seconds,
               "source": ranking.source, "limit": ranking.limit, "settings": ranking.settings},
              folder / f"{ranking.method}.json")


def load_ranking(out_dir: Path, method: str, settings: dict | None) -> Ranking | None:
    """The cached ranking of ``method`` if it was made with ``settings`` (else None)."""
    folder = out_dir / C.SELECTION_DIR
    meta_path, csv_path = folder / f"{method}.json", folder / f"{method}.csv"
    if not (meta_path.exists() and csv_path.exists()):
        return None
    fix = "it is computed again"
    try:
        meta = load_json(meta_path, fix, keys=("column", "seconds", "source"))
        if meta.get("settings") != settings:
            log.info("cached ranking of %s was made with other settings; recomputing", method)
            return None
        table = read_csv(csv_path, fix, columns=("unit_id", meta["column"], "rank", "corrupted"))
    except MetaifError as exc:  # our own cache: recompute it
        log.warning("%s", exc)
        return None
    table = table.rename(columns={meta["column"]: "score"})
    return Ranking(method, table, meta["column"], float(meta["seconds"]), meta["source"], meta.get("limit"), settings)
