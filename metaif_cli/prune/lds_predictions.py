"""Predictions of the LDS protocol (method §5, LDS): each method's scores on the run, per subset.

A method is scored once, on the original run (cached in ``selection/`` like every ranking,
or read from ``scores=``); its prediction for a subset is ``f(lam*)`` plus the sum of its
score column over the removed units (the orientation is documented in
:mod:`metaif_cli.prune.lds`). With ``score.evaluation.kind=per_task`` and task units,
``if``, ``direct_if`` and ``grad_sim`` also give one column per meta-test task
(``selection/<method>-by_test.csv``); the other methods use their one column for every test task.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.io import read_csv, save_csv
from metaif_cli.prune.scores import Ranking, load_ranking, save_ranking, score_config_for, table_of
from metaif_cli.score.config import settings_of
from metaif_cli.score.methods import run_method
from metaif_cli.score.outputs import score_column, task_table
from metaif_cli.score.run import read_tasks_csv

log = logging.getLogger(__name__)

BY_TEST_METHODS = ("if", "direct_if", "grad_sim")  # methods that give one score per meta-test task


@dataclass
class MethodScores:
    """A method's scores aligned with the units ``[N]`` and, per test task, ``[N, T]`` (or None)."""

    ranking: Ranking
    scores: np.ndarray
    by_test: np.ndarray | None


def _by_test_path(out_dir: Path, method: str) -> Path:
    return out_dir / C.SELECTION_DIR / f"{method}-by_test.csv"


def _score_with_by_test(ctx, method: str) -> tuple[Ranking, np.ndarray]:
    """Task scores and their per-test-task matrix (``evaluation.kind=per_task``), cached in ``selection/``."""
    scfg = score_config_for(ctx.cfg, method)
    settings = settings_of(scfg)
    ranking = load_ranking(ctx.out_dir, method, settings)
    path = _by_test_path(ctx.out_dir, method)
    if ranking is not None and path.exists():
        try:  # our own cache: a damaged one is computed again
            return ranking, read_csv(path, "it is computed again", columns=("test_task_0",)).to_numpy(dtype=np.float64)
        except MetaifError as exc:
            log.warning("%s", exc)
    t0 = time.perf_counter()
    out = run_method(ctx.run, scfg)
    seconds = time.perf_counter() - t0
    tasks_csv = read_tasks_csv(ctx.run)
    table = table_of(task_table(out.scores, tasks_csv, method), None, method, "task")
    ranking = Ranking(method, table, score_column(method), seconds, "computed",
                      settings=settings)
    matrix = out.train_by_test.double().cpu().numpy()  # [n, T]
    save_ranking(ranking, ctx.out_dir)
    save_csv(pd.DataFrame(matrix, columns=[f"test_task_{t}" for t in range(matrix.shape[1])]), path)
    return ranking, matrix


def method_scores(ctx, method: str, gather: Callable[[object, list[str]], dict[str, Ranking]]) -> MethodScores:
    """Score ``method`` once on the run (or read its cache / ``scores=``), aligned with ``ctx.units``."""
    by_test = None
    if ctx.cfg.score.evaluation.kind == "per_task" and ctx.cfg.unit == "task" and method in BY_TEST_METHODS:
        ranking, by_test = _score_with_by_test(ctx, method)
    else:
        ranking = gather(ctx, [method])[method]
    ids = [u.id for u in ctx.units]
    scores = ranking.table.set_index("unit_id")["score"].reindex(ids).to_numpy(dtype=np.float64)
    if not np.isfinite(scores).all():
        raise MetaifError(f"the {method} scores of some {ctx.cfg.unit} units are missing or NaN; score every unit "
                          "(unit=task needs task scores, support/query need instance scores)")
    return MethodScores(ranking, scores, by_test)


def predictions(subsets: list[np.ndarray], num_units: int, s: MethodScores, f_full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted ``f`` per subset ``[M]`` and per subset and test task ``[M, T]`` (``f_full``: ``[T]``)."""
    removal = np.zeros((len(subsets), num_units))  # [M, N]
    for i, idx in enumerate(subsets):
        removal[i, idx] = 1.0
    pred = f_full.mean() + removal @ s.scores
    by_test = s.by_test if s.by_test is not None else np.repeat(s.scores[:, None], len(f_full), axis=1)
    return pred, f_full[None, :] + removal @ by_test
