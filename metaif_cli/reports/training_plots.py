"""Meta-training curves of ``metaif train`` (method §1): training loss and validation
accuracy against the step, with chance level marked (``ln N`` and ``1/N`` for N-way tasks).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from metaif_cli.io import save_figure
from metaif_cli.reports.figures import plt

__all__ = ["plot_training_curves"]


def plot_training_curves(metrics_df: pd.DataFrame, path: str | os.PathLike, ways: int | None = None) -> Path:
    """Meta-training curves: loss (train and val) and validation accuracy.

    Args:
        metrics_df: columns ``step, train_loss, val_loss, val_acc``; the val columns
            may be NaN on rows where no validation ran, and any of the three metric
            columns may be absent.
        path: where to write the PNG.
        ways: classes per task: chance level is drawn (loss ``ln N``, accuracy ``1/N``) and the
            accuracy axis spans [0, 1], so a flat line at chance cannot pass for learning.

    Returns:
        The path written.
    """
    if "step" not in metrics_df.columns:
        raise ValueError("metrics_df needs a 'step' column.")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))

    def _line(ax, column: str, label: str) -> None:
        if column not in metrics_df.columns:
            return
        rows = metrics_df[["step", column]].dropna()
        if len(rows):
            ax.plot(rows["step"].to_numpy(), rows[column].to_numpy(), label=label,
                    marker="o" if len(rows) < 30 else None, markersize=3)

    _line(ax_loss, "train_loss", "train (query) loss")
    _line(ax_loss, "val_loss", "validation loss")
    _line(ax_acc, "val_acc", "validation accuracy")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("accuracy")
    if ways:
        ax_loss.axhline(math.log(ways), color="grey", linestyle="--", label=f"chance (ln {ways})")
        ax_acc.axhline(1.0 / ways, color="grey", linestyle="--", label=f"chance (1/{ways})")
        ax_acc.set_ylim(0.0, 1.02)
        ax_loss.set_ylim(bottom=0.0)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    save_figure(fig, path)
    return Path(path)
