"""Tables, plots and summaries of ``metaif prune-and-retrain`` (method §5-6).

- ``prune_results.csv``: one row per (method, fraction) plus the unpruned baseline
  (method ``none``, fraction 0): ``method, unit, fraction, update, seed, test_acc,
  test_acc_ci95, test_loss, selection_seconds, retrain_seconds, removed_corrupted_fraction``,
  then ``num_removed, num_removed_corrupted, train_seed``. ``seed`` is the prune seed
  (random selection, oracle order, unit samples); ``retrain_seconds`` is the time of the
  update (training loop of the retraining, or the edit); ``removed_corrupted_fraction``
  is the share of all recorded corrupted units that were removed (recall, E3).
- ``summary.md``: the conclusion in words: per method and fraction, the accuracy difference against
  ``random`` and against keeping everything, with its interval over retrainings and the word
  tie / better / worse (:mod:`metaif_cli.reports.verdicts`); printed at the end too. Before the
  work, :func:`plan_text` says how many retrainings will run and about how long they take.
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
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_json, save_csv, save_json, write_text
from metaif_cli.reports.agreement import correlation_summary

PRUNE_COLUMNS = ["method", "unit", "fraction", "update", "seed", "test_acc", "test_acc_ci95", "test_loss",
                 "selection_seconds", "retrain_seconds", "removed_corrupted_fraction", "num_removed",
                 "num_removed_corrupted", "train_seed"]
SEED_COLUMNS = ["retrain_seeds", "test_acc_sd_seeds"]  # with retrain_seeds > 1 only
LOO_COLUMNS = ["unit_id", "unit", "pred_delta_test_loss", "actual_delta_test_loss", "retrain", "cos_delta_lam",
               "norm_ratio_delta_lam"]
MAIN_COLUMNS = ["method", "fraction", "test_acc", "test_acc_ci95", "selection_seconds"]


def own_train_seconds(run_dir: Path) -> float | None:
    """The run's own training time (``results.json``): the unit of the plan's estimate (None: not recorded)."""
    try:
        value = load_json(run_dir / C.RESULTS_JSON, "rerun metaif train").get("train_seconds")
    except MetaifError:
        return None
    return float(value) if value else None


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if minutes < 2 else (f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h")


def _count(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def plan_text(cfg, n_units: int, train_seconds: float | None) -> str:
    """What ``protocol=remove`` is about to do: the number of retrainings and an estimate of their time."""
    methods, fractions = cfg.methods, cfg.fractions
    rows = len(methods) * len(fractions)
    head = (f"plan: {_count(len(methods), 'method')} ({', '.join(methods)}) x {_count(len(fractions), 'fraction')} "
            f"({', '.join(f'{f:g}' for f in fractions)}) of {n_units} {cfg.unit} units")
    if cfg.update != "retrain":
        return f"{head}: {rows} {cfg.update} updates, no retraining"
    seeds = cfg.retrain_seeds
    count = rows * seeds + (seeds - 1) + (cfg.retrain_subset or n_units if "retrain" in methods else 0)
    parallel = cfg.n_jobs if cfg.launcher == "joblib" else 1

    def cost(k: int) -> str:
        if not train_seconds:
            return "time unknown (the run records no training time)"
        return (f"about {_duration(k * train_seconds / parallel)} at {train_seconds:.0f} s each (the run's own "
                f"training time{f', {parallel} in parallel' if parallel > 1 else ''})")

    text = f"{head} x {_count(seeds, 'batch order')} = {count} retrainings, {cost(count)}, plus scoring; finished ones are skipped"
    if seeds == 1:
        more = rows * 3 + 2 + (cfg.retrain_subset or n_units if "retrain" in methods else 0)
        text += (f". One retraining per row gives no interval: retrain_seeds=3 gives a tie/better/worse verdict "
                 f"({more} retrainings, {cost(more)})")
    return text


def write_remove_summary(out_dir: Path, summary: dict, retrain_seeds: int) -> list[str]:
    """``summary.md`` of ``protocol=remove``: the verdicts; returns its lines."""
    from metaif_cli.reports.verdicts import remove_conclusion

    by_row = {(key.rsplit("@", 1)[0], float(key.rsplit("@", 1)[1])): acc
              for key, acc in summary["test_acc_by_retraining"].items()}
    lines = [f"# metaif prune-and-retrain: {summary['unit']} removal, update={summary['update']}", ""]
    lines += remove_conclusion(by_row, summary["unpruned_test_acc_by_retraining"], summary["unit"], retrain_seeds)
    if summary.get("n_corrupted"):
        lines += ["", f"The pool holds {summary['n_corrupted']} recorded corrupted {summary['unit']} units; "
                  "`removed_corrupted_fraction` in prune_results.csv says how many each removal found."]
    write_text("\n".join(lines) + "\n", out_dir / C.SUMMARY_MD)
    return lines


def write_lds_summary(out_dir: Path, table: pd.DataFrame, preds: dict, target: np.ndarray, null_band: float,
                      bootstrap: int, seed: int) -> list[str]:
    """``summary.md`` of ``protocol=lds``: each method against the null band, which methods are separable."""
    from metaif_cli.reports.verdicts import lds_conclusion

    lines = ["# metaif prune-and-retrain: protocol=lds", ""]
    lines += lds_conclusion(table.to_dict("records"), preds, target, null_band, bootstrap, seed)
    write_text("\n".join(lines) + "\n", out_dir / C.SUMMARY_MD)
    return lines


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
    seeds = int(results["retrain_seeds"].max()) if "retrain_seeds" in results else 1
    plot_accuracy_vs_fraction(curves, out_dir / C.ACCURACY_PNG, title,
                              f"{seeds} retrainings (batch orders)" if seeds > 1 else "test tasks (one retraining)")
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
