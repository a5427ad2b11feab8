"""Tables, plots and the summary of ``metaif score`` (method §3: sign in the column name).

``task_scores.csv``: ``task_id, <score column>[, <score column>_se], rank, method, corrupted``;
``instance_scores.csv``: ``instance_id, task_id, role, position, class, label,
<score column>[, <score column>_se], rank, method, corrupted``. The score column is
``pred_delta_test_loss`` (predicted change of the test loss if the unit is removed; negative =
harmful) for the influence methods, ``neg_loss_after_adaptation`` for ``loss`` and
``random_score`` for ``random``; ``_se`` is the standard error of an ensemble's mean over its
members (ensembles only). Both tables list the most harmful (most negative) first; ``rank`` 1 is
the most harmful, instances ranked within their role.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from metaif_cli import constants as C
from metaif_cli.data.compact import to_float
from metaif_cli.errors import MetaifError
from metaif_cli.influence.problem import UnitScores
from metaif_cli.fingerprint import file_digest
from metaif_cli.io import save_csv, write_text
from metaif_cli.reports.detection import detection_curve, detection_summary, random_detection_curve

SCORE_COLUMNS = {"loss": "neg_loss_after_adaptation", "random": "random_score"}


def score_column(method: str) -> str:
    """Name of the score column for ``method`` (the sign convention is in the name)."""
    return SCORE_COLUMNS.get(method, C.SCORE_COLUMN)


def _rank(values: pd.Series) -> pd.Series:
    return values.rank(method="first", ascending=True).astype(int)


def spread_column(method: str) -> str:
    """Name of the column of an ensemble's standard error (over its members) of the score."""
    return f"{score_column(method)}_se"


def task_table(scores: UnitScores, tasks_csv: pd.DataFrame, method: str, index: np.ndarray | None = None,
               spread: UnitScores | None = None) -> pd.DataFrame:
    """One row per scored training task, the most harmful first."""
    n = scores.task.shape[0]
    ids = np.arange(n) if index is None else index
    train = tasks_csv[tasks_csv.split == "train"]
    corrupted = train.groupby("task_id")["task_corrupted"].first().reindex(ids).to_numpy()
    col = score_column(method)
    df = pd.DataFrame({"task_id": ids, col: scores.task.double().cpu().numpy()})
    if spread is not None:
        df[spread_column(method)] = spread.task.double().cpu().numpy()
    df["rank"] = _rank(df[col])
    df["method"] = method
    df["corrupted"] = corrupted.astype(bool)
    return df.sort_values("rank").reset_index(drop=True)


def instance_table(scores: UnitScores, tasks_csv: pd.DataFrame, method: str, index: np.ndarray | None = None,
                   spread: UnitScores | None = None) -> pd.DataFrame:
    """One row per scored support or query instance, the most harmful first, ranked within its role."""
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
        if spread is not None:
            frame[spread_column(method)] = getattr(spread, role).double().cpu().numpy().reshape(-1)
        frame["rank"] = _rank(frame[col])
        frame["method"] = method
        frame["corrupted"] = meta["corrupted"].astype(bool).to_numpy()
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values([col, "role", "rank"], kind="stable").reset_index(drop=True)


def detection(df: pd.DataFrame, method: str) -> dict:
    """ROC AUC, AP and fraction found at 10/20/40% when the pool has recorded corruption."""
    corrupted = df["corrupted"].to_numpy()
    if not corrupted.any():
        return {}
    return detection_summary(df[score_column(method)].to_numpy(), corrupted)


# what a scoring leaves in its folder, ``score.json`` first: without it the rest is no result
RESULT_FILES = (C.SCORE_JSON, C.TASK_SCORES_CSV, C.INSTANCE_SCORES_CSV, C.TRAIN_BY_TEST_CSV, C.PRED_DELTA_LAM_PT,
                C.INSTANCE_GRID_PNG, *(name.format(unit=unit) for name in (C.SCORE_DISTRIBUTION_PNG,
                                                                             C.DETECTION_CURVE_PNG)
                                       for unit in ("task", "instance")))
DIGESTED = (C.TASK_SCORES_CSV, C.INSTANCE_SCORES_CSV, C.TRAIN_BY_TEST_CSV, C.PRED_DELTA_LAM_PT)


def clear_results(out_dir: Path, everything: bool = False) -> None:
    """Remove the result files of an earlier scoring in ``out_dir`` (``score.json`` first), so none of
    them outlives a new result (``unit=task`` after ``unit=all`` leaves no ``instance_scores.csv``).

    ``everything``: also what is kept for reuse across reruns of the same settings (``ihvp.pt``,
    the shards, ``score_settings.json``), when ``overwrite=true`` replaces other settings.
    Only files of these names are removed; nothing else in the folder is touched.
    """
    names = list(RESULT_FILES)
    if everything:
        names += [C.SCORE_SETTINGS_JSON, C.IHVP_PT]
        names += [f"{C.SHARD_DIR}/{p.name}" for p in (out_dir / C.SHARD_DIR).glob("shard_*_of_*.pt")]
    for name in names:
        try:
            (out_dir / name).unlink()
        except FileNotFoundError:
            pass
    if everything:
        try:
            (out_dir / C.SHARD_DIR).rmdir()  # only when empty
        except OSError:
            pass


def artefact_digests(out_dir: Path) -> dict[str, str]:
    """SHA-256 of each score table written (recorded in ``score.json``, checked by whoever reads them)."""
    return {name: file_digest(out_dir / name) for name in DIGESTED if (out_dir / name).is_file()}


def check_recorded(path: Path, summary: dict, fix: str) -> None:
    """Refuse a score table that is not the one ``score.json`` (``summary``) recorded: replaced or edited
    since, or left by an earlier scoring. A ``score.json`` of an older metaif records none: accepted."""
    if "files" not in summary or not path.exists():
        return
    recorded = (summary.get("files") or {}).get(path.name)
    if recorded is None:
        raise MetaifError(f"{path} is not part of the result in {C.SCORE_JSON} (left by an earlier scoring); {fix}")
    if recorded != file_digest(path):
        raise MetaifError(f"{path} is not the table {C.SCORE_JSON} recorded (another scoring replaced or changed it); "
                          f"{fix}")


def write_tables(out_dir: Path, tasks_df: pd.DataFrame | None, inst_df: pd.DataFrame | None) -> None:
    """Write the score CSVs that were computed; refuse non-finite scores (nothing is written then)."""
    for df in (tasks_df, inst_df):
        col = None if df is None or not len(df) else score_column(str(df["method"].iloc[0]))
        if col is not None and not np.isfinite(df[col].to_numpy(dtype=np.float64)).all():
            raise MetaifError(f"the {col} scores hold NaN or infinite values: the run or the solve diverged "
                              "(see score.json's residual); raise hessian.damping or retrain with a lower optim.lr")
    if tasks_df is not None:
        save_csv(tasks_df, out_dir / C.TASK_SCORES_CSV)
    if inst_df is not None:
        save_csv(inst_df, out_dir / C.INSTANCE_SCORES_CSV)


def write_summary(out_dir: Path, method: str, tasks_df: pd.DataFrame | None, inst_df: pd.DataFrame | None,
                  members: int) -> list[str]:
    """``summary.md``: the most harmful and helpful units, their intervals over ``members``; returns its lines."""
    from metaif_cli.reports.summary import score_summary

    lines = score_summary(tasks_df, inst_df, score_column(method), spread_column(method), members, method,
                          influence=method not in SCORE_COLUMNS)
    write_text("\n".join(lines) + "\n", out_dir / C.SUMMARY_MD)
    return lines


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
            out_dir / C.SCORE_DISTRIBUTION_PNG.format(unit=unit), f"{unit} scores ({method})",
            groups=df["role"].to_numpy() if unit == "instance" else None,
            xlabel=f"{col} (negative = harmful)" if method not in SCORE_COLUMNS else f"{col} (lower = more harmful)"))
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
            caps = [f"#{i + 1} {r.role} {r.task_id}:{r.position}{' [corrupted]' if r.corrupted else ''}\n"
                    f"label {r.label}, class {r['class']}\n{r[col]:+.2e}" for i, (_, r) in enumerate(rows.iterrows())]
            return imgs, caps

        hi, hc = pick(harmful)
        pi, pc = pick(helpful)
        legend = ("Caption: #rank, role and task:position of the instance; label = its position in the task's "
                  "label order (the row of the model's output head it trains); class = the dataset's class "
                  f"(e.g. alphabet/character); last line: {col}, the predicted change of the meta-test loss if the "
                  "instance is removed (negative = harmful). [corrupted]: its label was corrupted on purpose.")
        written.append(instance_grids.plot_harmful_helpful_grid(hi, hc, pi, pc, out_dir / C.INSTANCE_GRID_PNG,
                                                                legend=legend, column=col))
    return [str(p) for p in written]
