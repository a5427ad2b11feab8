"""Figures of ``metaif score`` (SPEC sections 3 and 6): score histograms, clean vs corrupted
(negative = harmful), and detection curves, fraction of corrupted units found vs fraction
inspected (E3).

Every function draws one figure, writes it as a PNG atomically with
:func:`metaif_cli.io.save_figure` and returns the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from metaif_cli.io import save_figure
from metaif_cli.reports.figures import SCORE_LABEL, plt

__all__ = ["plot_score_distribution", "plot_detection_curve"]


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
