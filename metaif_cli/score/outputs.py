"""Tables, plots and the summary of ``metaif score`` (SPEC section 3: sign in the column name).

``task_scores.csv``: ``task_id, <score column>, rank, method, corrupted``;
``instance_scores.csv``: ``instance_id, task_id, role, position, class, label,
<score column>, rank, method, corrupted``. The score column is ``pred_delta_test_loss``
(predicted change of the test loss if the unit is removed; negative = harmful) for the
influence methods, ``neg_loss_after_adaptation`` for ``loss`` and ``random_score`` for
``random``. ``rank`` 1 is the most harmful (most negative), instances ranked within their role.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from metaif_cli import constants as C
from metaif_cli.data.compact import to_float
from metaif_cli.influence.problem import UnitScores
from metaif_cli.io import save_csv
from metaif_cli.reports.detection import detection_curve, detection_summary, random_detection_curve

SCORE_COLUMNS = {"loss": "neg_loss_after_adaptation", "random": "random_score"}


def score_column(method: str) -> str:
    """Name of the score column for ``method`` (the sign convention is in the name)."""
    return SCORE_COLUMNS.get(method, C.SCORE_COLUMN)


def _rank(values: pd.Series) -> pd.Series:
    return values.rank(method="first", ascending=True).astype(int)


def task_table(scores: UnitScores, tasks_csv: pd.DataFrame, method: str, index: np.ndarray | None = None) -> pd.DataFrame:
    """One row per scored training task."""
    n = scores.task.shape[0]
    ids = np.arange(n) if index is None else index
    train = tasks_csv[tasks_csv.split == "train"]
    corrupted = train.groupby("task_id")["task_corrupted"].first().reindex(ids).to_numpy()
    col = score_column(method)
    df = pd.DataFrame({"task_id": ids, col: scores.task.double().cpu().numpy()})
    df["rank"] = _rank(df[col])
    df["method"] = method
    df["corrupted"] = corrupted.astype(bool)
    return df.sort_values("rank").reset_index(drop=True)


def instance_table(scores: UnitScores, tasks_csv: pd.DataFrame, method: str, index: np.ndarray | None = None) -> pd.DataFrame:
    """One row per scored support or query instance, ranked within its role."""
    train = tasks_csv[tasks_csv.split == "train"].set_index(["task_id", "role", "position"])
    ids = np.arange(scores.task.shape[0]) if index is None else index
    col = score_column(method)
    frames = []
    for role, values in (("support", scores.support), ("query", scores.query)):
        vals = values.double().cpu().numpy()  # [n, m]
        n, m = vals.shape
        keys = pd.MultiIndex.from_arrays([np.repeat(ids, m), [role] * (n * m), np.tile(np.arange(m), n)],
                                         names=["task_id", "role", "position"])
        meta = train.loc[keys].reset_index()
        frame = meta[["instance_id", "task_id", "role", "position", "class", "label"]].copy()
        frame[col] = vals.reshape(-1)
        frame["rank"] = _rank(frame[col])
        frame["method"] = method
        frame["corrupted"] = meta["corrupted"].astype(bool).to_numpy()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).sort_values(["role", "rank"]).reset_index(drop=True)


def detection(df: pd.DataFrame, method: str) -> dict:
    """ROC AUC, AP and fraction found at 10/20/40% when the pool has recorded corruption."""
    corrupted = df["corrupted"].to_numpy()
    if not corrupted.any():
        return {}
    return detection_summary(df[score_column(method)].to_numpy(), corrupted)


def write_tables(out_dir: Path, tasks_df: pd.DataFrame | None, inst_df: pd.DataFrame | None) -> None:
    """Write the score CSVs that were computed."""
    if tasks_df is not None:
        save_csv(tasks_df, out_dir / C.TASK_SCORES_CSV)
    if inst_df is not None:
        save_csv(inst_df, out_dir / C.INSTANCE_SCORES_CSV)


def write_plots(out_dir: Path, method: str, tasks_df: pd.DataFrame | None, inst_df: pd.DataFrame | None,
                images: torch.Tensor, grid_size: int) -> list[str]:
    """Score distributions, detection curves and the harmful/helpful instance grid."""
    from metaif_cli.reports import instance_grids, score_plots

    col, written = score_column(method), []
    for unit, df in (("task", tasks_df), ("instance", inst_df)):
        if df is None:
            continue
        corrupted = df["corrupted"].to_numpy()
        written.append(score_plots.plot_score_distribution(
            df[col].to_numpy(), corrupted if corrupted.any() else None,
            out_dir / C.SCORE_DISTRIBUTION_PNG.format(unit=unit), f"{unit} scores ({method})"))
        if corrupted.any() and not corrupted.all():
            curves = {method: detection_curve(df[col].to_numpy(), corrupted),
                      "random": random_detection_curve(len(df), corrupted)}
            written.append(score_plots.plot_detection_curve(curves, out_dir / C.DETECTION_CURVE_PNG.format(unit=unit),
                                                      f"corrupted {unit}s found ({method})",
                                                      corrupted_fraction=float(corrupted.mean())))
    if inst_df is not None and grid_size > 0:
        ordered = inst_df.sort_values(col)
        harmful, helpful = ordered.head(grid_size), ordered.tail(grid_size).iloc[::-1]

        def pick(rows: pd.DataFrame):
            imgs = to_float(images[torch.as_tensor(rows["instance_id"].to_numpy().copy())], torch.float32).cpu().numpy()
            caps = [f"task {r.task_id} {r.role}\nlabel {r.label} ({r['class']})\n{r[col]:.2e}"
                    for _, r in rows.iterrows()]
            return imgs, caps

        hi, hc = pick(harmful)
        pi, pc = pick(helpful)
        written.append(instance_grids.plot_harmful_helpful_grid(hi, hc, pi, pc, out_dir / C.INSTANCE_GRID_PNG))
    return [str(p) for p in written]
