"""Figures of ``metaif score`` (method §3 and §6): score histograms, clean vs corrupted
(negative = harmful), and detection curves, fraction of corrupted units found vs fraction
inspected (E3).

Every function draws one figure, writes it as a PNG atomically with
:func:`metaif_cli.io.save_figure` and returns the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from metaif_cli.io import save_figure
from metaif_cli.reports.figures import SCORE_LABEL, plt

__all__ = ["plot_score_distribution", "plot_detection_curve"]


def _bins(values: np.ndarray, count: int = 40) -> np.ndarray:
    """Bin edges over the central 98% of ``values`` (and zero): a few extreme units do not squeeze the
    rest into one bar; the units beyond are drawn in the end bars."""
    if not values.size:
        return np.linspace(-1.0, 1.0, count + 1)
    low, high = np.percentile(values, [1, 99])
    low, high = min(low, 0.0), max(high, 0.0)
    if high <= low:
        low, high = low - 1.0, high + 1.0
    return np.linspace(low, high, count + 1)


def _panel(ax, scores: np.ndarray, corrupted: np.ndarray | None, title: str, xlabel: str) -> None:
    finite = np.isfinite(scores)
    bins = _bins(scores[finite])
    clipped = np.clip(scores, bins[0], bins[-1])
    outside = int((finite & ((scores < bins[0]) | (scores > bins[-1]))).sum())
    if corrupted is None:
        ax.hist(clipped[finite], bins=bins, color="tab:blue", alpha=0.8, label=f"all units (n={int(finite.sum())})")
    else:
        clean, bad = finite & ~corrupted, finite & corrupted
        ax.hist(clipped[clean], bins=bins, color="tab:blue", alpha=0.6, label=f"clean (n={int(clean.sum())})")
        ax.hist(clipped[bad], bins=bins, color="tab:red", alpha=0.6, label=f"corrupted (n={int(bad.sum())})")
    ax.axvline(0.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")  # the tails, where the harmful and helpful units are, stay visible
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("number of units (log scale)")
    ax.set_title(title, fontsize=10)
    if outside:
        ax.text(0.99, 0.98, f"{outside} units beyond the 1-99% range\ndrawn in the end bars",
                transform=ax.transAxes, ha="right", va="top", fontsize=7)
    ax.legend(loc="upper left", fontsize=8)


def plot_score_distribution(
    scores: np.ndarray,
    corrupted: np.ndarray | None,
    path: str | os.PathLike,
    title: str,
    groups: np.ndarray | None = None,
    xlabel: str = SCORE_LABEL,
) -> Path:
    """Histogram of the scores, clean and corrupted units overlaid, one panel per group.

    The bins span the central 98% of each panel's scores (the rest fall in the end bars, and
    the figure says how many) and the counts are on a log scale, so that neither a few extreme
    units nor the crowd near zero hide the tails.

    Args:
        scores: ``[n]`` scores.
        corrupted: ``[n]`` boolean corruption flags, or None when unknown (one histogram).
        path: where to write the PNG.
        title: figure title.
        groups: ``[n]`` group names (e.g. the role, ``support``/``query``): one panel each;
            None: one panel.
        xlabel: the x axis (the score column and its sign).

    Returns:
        The path written.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if corrupted is not None:
        corrupted = np.asarray(corrupted).reshape(-1).astype(bool)
        if corrupted.shape != scores.shape:
            raise ValueError(
                f"corrupted has {corrupted.size} flags for {scores.size} scores; "
                "pass one flag per unit or None."
            )
    names = [None] if groups is None else list(dict.fromkeys(np.asarray(groups).reshape(-1).tolist()))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        keep = np.ones(scores.shape, bool) if name is None else np.asarray(groups).reshape(-1) == name
        _panel(ax, scores[keep], None if corrupted is None else corrupted[keep],
               title if name is None else f"{title}: {name}", xlabel)
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
            :func:`metaif_cli.reports.detection.detection_curve`.
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
