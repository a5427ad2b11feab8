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
from metaif_cli.errors import MetaifError
from metaif_cli.influence.problem import UnitScores
from metaif_cli.fingerprint import file_digest
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
            imgs = images[torch.as_tensor(rows["instance_id"].to_numpy().copy())].float().cpu().numpy()
            caps = [f"task {r.task_id} {r.role}\nlabel {r.label} ({r['class']})\n{r[col]:.2e}"
                    for _, r in rows.iterrows()]
            return imgs, caps

        hi, hc = pick(harmful)
        pi, pc = pick(helpful)
        written.append(instance_grids.plot_harmful_helpful_grid(hi, hc, pi, pc, out_dir / C.INSTANCE_GRID_PNG))
    return [str(p) for p in written]
