"""Figures for the experiment reports (SPEC sections 5 and 6).

Every function draws one figure, writes it as a PNG atomically with
:func:`metaif_cli.io.save_figure` and returns the path. The Agg backend is forced, so
plotting works without a display.

- score histograms, clean vs corrupted (SPEC section 3 sign: negative = harmful);
- detection curves, fraction of corrupted units found vs fraction inspected (E3);
- grids of the most harmful / most helpful instances (E2);
- test accuracy against fraction removed, with 95% intervals (E1-E3);
- predicted vs actual ``delta_test_loss`` (E4, SPEC section 5);
- meta-training curves.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from metaif_cli.io import save_figure  # noqa: E402
from metaif_cli.metrics import correlation_summary  # noqa: E402

__all__ = [
    "plot_score_distribution",
    "plot_detection_curve",
    "plot_instance_grid",
    "plot_harmful_helpful_grid",
    "plot_accuracy_vs_fraction",
    "plot_pred_vs_actual",
    "plot_training_curves",
]

SCORE_LABEL = "pred_delta_test_loss (negative = harmful)"


def plot_score_distribution(
    scores: np.ndarray,
    corrupted: np.ndarray | None,
    path: str | os.PathLike,
    title: str,
) -> Path:
    """Histogram of ``pred_delta_test_loss``, clean and corrupted units overlaid.

    Args:
        scores: ``[n]`` scores.
        corrupted: ``[n]`` boolean corruption flags, or None when unknown (one histogram).
        path: where to write the PNG.
        title: figure title.

    Returns:
        The path written.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    finite = np.isfinite(scores)
    bins = np.histogram_bin_edges(scores[finite], bins=40) if finite.any() else 10
    fig, ax = plt.subplots(figsize=(6, 4))
    if corrupted is None:
        ax.hist(scores[finite], bins=bins, color="tab:blue", alpha=0.8, label="all units")
    else:
        corrupted = np.asarray(corrupted).reshape(-1).astype(bool)
        if corrupted.shape != scores.shape:
            raise ValueError(
                f"corrupted has {corrupted.size} flags for {scores.size} scores; "
                "pass one flag per unit or None."
            )
        clean = finite & ~corrupted
        bad = finite & corrupted
        ax.hist(scores[clean], bins=bins, color="tab:blue", alpha=0.6,
                label=f"clean (n={int(clean.sum())})")
        ax.hist(scores[bad], bins=bins, color="tab:red", alpha=0.6,
                label=f"corrupted (n={int(bad.sum())})")
    ax.axvline(0.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel(SCORE_LABEL)
    ax.set_ylabel("number of units")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)
    return Path(path)


def plot_detection_curve(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    title: str,
    corrupted_fraction: float | None = None,
) -> Path:
    """Fraction of corrupted units found against fraction inspected, one line per method.

    Args:
        curves: method name (e.g. ``"if"``, ``"random"``) to ``(x, y)`` from
            :func:`metaif_cli.metrics.detection_curve`.
        path: where to write the PNG.
        title: figure title.
        corrupted_fraction: share of units that are corrupted; when given, the ideal
            curve ``min(x / p, 1)`` is drawn.

    Returns:
        The path written.
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    grid = np.linspace(0.0, 1.0, 101)
    ax.plot(grid, grid, color="grey", linestyle=":", linewidth=1, label="diagonal")
    if corrupted_fraction is not None and corrupted_fraction > 0:
        ax.plot(grid, np.minimum(grid / corrupted_fraction, 1.0), color="black",
                linestyle="--", linewidth=1, label="ideal")
    for name, (x, y) in curves.items():
        ax.plot(np.asarray(x), np.asarray(y), linewidth=1.8, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of units inspected (most harmful first)")
    ax.set_ylabel("fraction of corrupted units found")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return Path(path)


def _draw_images(
    fig_or_subfig, images: np.ndarray, captions: Sequence[str], ncols: int
) -> None:
    """Fill ``fig_or_subfig`` with a grid of images, a caption under each."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be [m, C, H, W] with C in (1, 3), got shape {images.shape}."
        )
    m = images.shape[0]
    if len(captions) != m:
        raise ValueError(f"got {len(captions)} captions for {m} images; pass one per image.")
    if m == 0:
        ax = fig_or_subfig.subplots(1, 1)
        ax.text(0.5, 0.5, "no instances", ha="center", va="center")
        ax.axis("off")
        return
    ncols = max(1, min(ncols, m))
    nrows = int(np.ceil(m / ncols))
    axes = np.atleast_1d(fig_or_subfig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    images = np.clip(images, 0.0, 1.0)
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= m:
            continue
        if images.shape[1] == 1:
            ax.imshow(images[i, 0], cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(np.transpose(images[i], (1, 2, 0)))
        ax.text(0.5, -0.03, _wrap(captions[i]), transform=ax.transAxes, fontsize=7,
                ha="center", va="top")
    fig_or_subfig.subplots_adjust(wspace=0.15, hspace=0.6)


def _wrap(caption: str, width: int = 24) -> str:
    """Wrap each line of a caption so that neighbouring captions do not overlap."""
    return "\n".join(textwrap.fill(line, width) or line for line in caption.split("\n"))


def _grid_size(m: int, ncols: int) -> tuple[float, float]:
    """Figure (width, height) in inches for ``m`` images in ``ncols`` columns."""
    cols = max(1, min(ncols, max(m, 1)))
    rows = max(1, int(np.ceil(max(m, 1) / cols)))
    return 1.8 * cols, 2.4 * rows


def plot_instance_grid(
    images: np.ndarray,
    captions: list[str],
    path: str | os.PathLike,
    title: str,
    ncols: int = 8,
) -> Path:
    """Grid of instances with a caption under each (e.g. the most harmful ones).

    Args:
        images: ``[m, C, H, W]`` in [0, 1]; grayscale when ``C == 1``, RGB when ``C == 3``.
        captions: ``m`` captions, e.g. ``"#1 task 12 support\\nlabel 3 (class 'x')"``.
        path: where to write the PNG.
        title: figure title.
        ncols: images per row.

    Returns:
        The path written.
    """
    m = int(np.asarray(images).shape[0])
    fig = plt.figure(figsize=_grid_size(m, ncols))
    _draw_images(fig, images, captions, ncols)
    fig.suptitle(title)
    save_figure(fig, path)
    return Path(path)


def plot_harmful_helpful_grid(
    harmful_images: np.ndarray,
    harmful_captions: list[str],
    helpful_images: np.ndarray,
    helpful_captions: list[str],
    path: str | os.PathLike,
    ncols: int = 8,
) -> Path:
    """Two titled blocks of instances: most harmful on top, most helpful below.

    Args:
        harmful_images: ``[m1, C, H, W]`` in [0, 1].
        harmful_captions: ``m1`` captions.
        helpful_images: ``[m2, C, H, W]`` in [0, 1].
        helpful_captions: ``m2`` captions.
        path: where to write the PNG.
        ncols: images per row.

    Returns:
        The path written.
    """
    m1 = int(np.asarray(harmful_images).shape[0])
    m2 = int(np.asarray(helpful_images).shape[0])
    w1, h1 = _grid_size(m1, ncols)
    w2, h2 = _grid_size(m2, ncols)
    fig = plt.figure(figsize=(max(w1, w2), h1 + h2 + 0.8))
    top, bottom = fig.subfigures(2, 1, height_ratios=[h1, h2])
    _draw_images(top, harmful_images, harmful_captions, ncols)
    top.suptitle("most harmful (most negative pred_delta_test_loss)")
    _draw_images(bottom, helpful_images, helpful_captions, ncols)
    bottom.suptitle("most helpful (most positive pred_delta_test_loss)")
    save_figure(fig, path)
    return Path(path)


def plot_accuracy_vs_fraction(df: pd.DataFrame, path: str | os.PathLike, title: str) -> Path:
    """Test accuracy against fraction of units removed, one line per method.

    Args:
        df: columns ``method, fraction, test_acc, test_acc_ci95`` (the CI is the 95%
            half-width, e.g. from :func:`metaif_cli.metrics.mean_ci95`).
        path: where to write the PNG.
        title: figure title.

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
    ax.set_xlabel("fraction of units removed")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend()
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


def plot_training_curves(metrics_df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Meta-training curves: loss (train and val) and validation accuracy.

    Args:
        metrics_df: columns ``step, train_loss, val_loss, val_acc``; the val columns
            may be NaN on rows where no validation ran, and any of the three metric
            columns may be absent.
        path: where to write the PNG.

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
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    save_figure(fig, path)
    return Path(path)
