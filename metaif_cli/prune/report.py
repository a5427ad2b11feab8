"""Tables, plots and summaries of ``metaif prune-and-retrain`` (SPEC sections 5-6).

- ``prune_results.csv``: one row per (method, fraction) plus the unpruned baseline
  (method ``none``, fraction 0): ``method, unit, fraction, update, seed, test_acc,
  test_acc_ci95, test_loss, selection_seconds, retrain_seconds, removed_corrupted_fraction``,
  then ``num_removed, num_removed_corrupted, train_seed``. ``seed`` is the prune seed
  (random selection, oracle order, unit samples); ``retrain_seconds`` is the time of the
  update (training loop of the retraining, or the edit); ``removed_corrupted_fraction``
  is the share of all recorded corrupted units that were removed (recall, E3).
- ``accuracy_vs_fraction.png``; ``main_table.csv``/``.md``: per method, accuracy after
  removing 40% (or the nearest fraction run) and the selection runtime (the paper's table).
- ``detection_curve_<unit>.png`` when corruption is recorded: fraction of the corrupted
  units found against the fraction inspected in each method's order (E3), with the
  expected curve of a random order.
- ``loo_results.csv``: ``unit_id, unit, pred_delta_test_loss, actual_delta_test_loss,
  retrain, cos_delta_lam, norm_ratio_delta_lam``; ``loo_summary.json``: Pearson, Spearman
  and sign agreement per retrain mode with the cosine/norm-ratio statistics;
  ``pred_vs_actual_<mode>.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from metaif_cli import constants as C
from metaif_cli.io import save_csv, save_json, write_text
from metaif_cli.reports.agreement import correlation_summary

PRUNE_COLUMNS = ["method", "unit", "fraction", "update", "seed", "test_acc", "test_acc_ci95", "test_loss",
                 "selection_seconds", "retrain_seconds", "removed_corrupted_fraction", "num_removed",
                 "num_removed_corrupted", "train_seed"]
SEED_COLUMNS = ["retrain_seeds", "test_acc_sd_seeds"]  # with retrain_seeds > 1 only
LOO_COLUMNS = ["unit_id", "unit", "pred_delta_test_loss", "actual_delta_test_loss", "retrain", "cos_delta_lam",
               "norm_ratio_delta_lam"]
MAIN_COLUMNS = ["method", "fraction", "test_acc", "test_acc_ci95", "selection_seconds"]


def nearest_fraction(fractions: list[float], target: float = 0.4) -> float:
    """The fraction run closest to ``target`` (the smaller one on a tie)."""
    return min(sorted(fractions), key=lambda f: abs(f - target))


def main_table(results: pd.DataFrame, target: float = 0.4) -> pd.DataFrame:
    """Per method: accuracy after removing ``target`` (or the nearest fraction run) and the selection runtime."""
    pruned = results[results.method != "none"]
    rows = [results[results.method == "none"]]
    if len(pruned):
        rows.append(pruned[pruned.fraction == nearest_fraction(pruned.fraction.unique().tolist(), target)])
    return pd.concat(rows, ignore_index=True)[MAIN_COLUMNS]


def markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub Markdown table (numbers rounded to ``digits``)."""
    def cell(x) -> str:
        return f"{x:.{digits}f}" if isinstance(x, (float, np.floating)) else str(x)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def compact(results: pd.DataFrame) -> str:
    """Test accuracy by method (rows) and fraction removed (columns), plus selection seconds."""
    acc = results.pivot_table(index="method", columns="fraction", values="test_acc", sort=False)
    acc.columns = [f"{c:g}" for c in acc.columns]
    acc["select_s"] = results.groupby("method", sort=False)["selection_seconds"].max()
    return acc.to_string(float_format=lambda x: f"{x:.4f}", na_rep="-")


def write_prune_outputs(out_dir: Path, results: pd.DataFrame, title: str) -> dict[str, str]:
    """``prune_results.csv``, the accuracy plot and the main table (CSV and Markdown)."""
    from metaif_cli.reports.prune_plots import plot_accuracy_vs_fraction

    results = results[PRUNE_COLUMNS + [c for c in SEED_COLUMNS if c in results]]
    save_csv(results, out_dir / C.PRUNE_RESULTS_CSV)
    table = main_table(results)
    save_csv(table, out_dir / C.MAIN_TABLE_CSV)
    write_text(markdown(table), out_dir / C.MAIN_TABLE_MD)
    baseline = results[results.method == "none"]
    curves = pd.concat([results[results.method != "none"]]
                       + [baseline.assign(method=m) for m in results.method.unique() if m != "none"])
    plot_accuracy_vs_fraction(curves, out_dir / C.ACCURACY_PNG, title)
    return {"prune_results": str(out_dir / C.PRUNE_RESULTS_CSV), "main_table": str(out_dir / C.MAIN_TABLE_MD),
            "accuracy_plot": str(out_dir / C.ACCURACY_PNG)}


def write_detection_curve(out_dir: Path, rankings: dict, flags: pd.Series, unit: str, seed: int) -> str | None:
    """Detection curves of every ranking that orders all units; None without recorded corruption."""
    from metaif_cli.reports.detection import detection_curve, random_detection_curve
    from metaif_cli.reports.score_plots import plot_detection_curve

    corrupted = flags.to_numpy(dtype=bool)
    if not corrupted.any():
        return None
    curves = {}
    for method, ranking in rankings.items():
        if method == "random" or len(ranking.table) < len(flags):  # a subset ("retrain") orders no inspection
            continue
        in_order = flags.loc[ranking.table.unit_id].to_numpy(dtype=bool)  # most harmful first
        curves[method] = detection_curve(np.arange(len(in_order), dtype=float), in_order)
    curves["random"] = random_detection_curve(len(corrupted), corrupted)
    path = out_dir / C.DETECTION_CURVE_PNG.format(unit=unit)
    plot_detection_curve(curves, path, f"corrupted {unit}s found", corrupted_fraction=float(corrupted.mean()))
    return str(path)


def loo_summary(table: pd.DataFrame) -> dict[str, dict]:
    """Per retrain mode: correlation of predicted vs actual ``delta_test_loss`` and vector agreement."""
    out = {}
    for mode, group in table.groupby("retrain", sort=False):
        summary = correlation_summary(group.pred_delta_test_loss.to_numpy(), group.actual_delta_test_loss.to_numpy())
        for col in ("cos_delta_lam", "norm_ratio_delta_lam"):
            values = group[col].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            summary[f"{col}_mean"] = float(values.mean()) if values.size else float("nan")
            summary[f"{col}_median"] = float(np.median(values)) if values.size else float("nan")
        out[str(mode)] = summary
    return out


def write_loo_outputs(out_dir: Path, table: pd.DataFrame, extra: dict) -> dict:
    """``loo_results.csv``, ``loo_summary.json`` and one pred-vs-actual plot per mode."""
    from metaif_cli.reports.prune_plots import plot_pred_vs_actual

    table = table[LOO_COLUMNS]
    save_csv(table, out_dir / C.LOO_RESULTS_CSV)
    summary = {"modes": loo_summary(table), **extra}
    for mode, group in table.groupby("retrain", sort=False):
        plot_pred_vs_actual(group.pred_delta_test_loss.to_numpy(), group.actual_delta_test_loss.to_numpy(),
                            out_dir / C.PRED_VS_ACTUAL_PNG.format(retrain=mode),
                            f"leave-one-out ({mode}) vs influence, {table.unit.iloc[0]} units")
    save_json(summary, out_dir / C.LOO_SUMMARY_JSON)
    return summary
