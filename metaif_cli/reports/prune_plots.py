"""Figures of ``metaif prune-and-retrain`` (method §5 and §6): test accuracy against the
fraction removed, with 95% intervals (E1-E3), and predicted vs actual ``delta_test_loss`` (E4).

Every function draws one figure, writes it as a PNG atomically with
:func:`metaif_cli.io.save_figure` and returns the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from metaif_cli.io import save_figure
import pandas as pd

from metaif_cli.reports.agreement import correlation_summary
from metaif_cli.reports.figures import SCORE_LABEL, plt

__all__ = ["plot_accuracy_vs_fraction", "plot_pred_vs_actual"]


def plot_accuracy_vs_fraction(df: pd.DataFrame, path: str | os.PathLike, title: str,
                              interval: str = "test tasks") -> Path:
    """Test accuracy against fraction of units removed, one line per method.

    Args:
        df: columns ``method, fraction, test_acc, test_acc_ci95`` (the CI is the 95%
            half-width, e.g. from :func:`metaif_cli.reports.intervals.mean_ci95`).
        path: where to write the PNG.
        title: figure title.
        interval: what the 95% intervals are over (``test tasks``, ``3 retrainings``), said on the figure.

    Returns:
        The path written.
    """
    missing = {"method", "fraction", "test_acc", "test_acc_ci95"} - set(df.columns)
    if missing:
        raise ValueError(f"df lacks columns {sorted(missing)}; expected "
                         "method, fraction, test_acc, test_acc_ci95.")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, group in df.groupby("method", sort=False):
        group = group.sort_values("fraction")
        x = group["fraction"].to_numpy(dtype=np.float64)
        y = group["test_acc"].to_numpy(dtype=np.float64)
        ci = np.nan_to_num(group["test_acc_ci95"].to_numpy(dtype=np.float64))
        line = ax.errorbar(x, y, yerr=ci, marker="o", markersize=4, capsize=3,
                           label=str(method))
        ax.fill_between(x, y - ci, y + ci, color=line[0].get_color(), alpha=0.15)
    ax.set_xlabel("fraction of units removed (0: the unpruned model)")
    ax.set_ylabel("meta-test accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(title=f"bars: 95% interval over {interval}", title_fontsize=8, fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return Path(path)


def plot_pred_vs_actual(
    pred: np.ndarray, actual: np.ndarray, path: str | os.PathLike, title: str
) -> Path:
    """Scatter of predicted vs actual ``delta_test_loss`` with the identity line.

    Args:
        pred: ``[n]`` ``pred_delta_test_loss``.
        actual: ``[n]`` ``delta_test_loss`` from leave-one-out retraining.
        path: where to write the PNG.
        title: figure title; Pearson and Spearman are appended.

    Returns:
        The path written.
    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    actual = np.asarray(actual, dtype=np.float64).reshape(-1)
    summary = correlation_summary(pred, actual)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(actual, pred, s=14, alpha=0.7)
    both = np.concatenate([pred, actual])
    both = both[np.isfinite(both)]
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        pad = 0.05 * (hi - lo) if hi > lo else 1e-12 + 0.05 * abs(hi)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black",
                linestyle="--", linewidth=1, label="identity")
        ax.legend(loc="upper left")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.axvline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("actual delta_test_loss (retraining; negative = harmful)")
    ax.set_ylabel(SCORE_LABEL)
    ax.set_title(f"{title}\nPearson {summary['pearson']:.3f}, "
                 f"Spearman {summary['spearman']:.3f}, n={summary['n']}")
    save_figure(fig, path)
    return Path(path)
