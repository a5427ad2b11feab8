"""Grids of training images with captions: the most harmful and most helpful instances (method
§6, E2).

Every function draws one figure, writes it as a PNG atomically with
:func:`metaif_cli.io.save_figure` and returns the path.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from metaif_cli.io import save_figure
from metaif_cli.reports.figures import plt

__all__ = ["plot_instance_grid", "plot_harmful_helpful_grid"]


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
    """Wrap each line of a caption between words (and after ``/`` or ``_``), never inside a word, so
    that neighbouring captions do not overlap and names such as ``Alphabet_of_the_Magi`` stay readable."""
    def fill(line: str) -> str:
        spaced = line.replace("/", "/\u200b").replace("_", "_\u200b")  # zero-width break points
        parts = textwrap.wrap(spaced.replace("\u200b", " "), width, break_long_words=False, break_on_hyphens=False)
        return "\n".join(p.replace("/ ", "/").replace("_ ", "_") for p in parts) or line
    return "\n".join(fill(line) for line in caption.split("\n"))


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
    legend: str | None = None,
    column: str = "pred_delta_test_loss",
) -> Path:
    """Two titled blocks of instances: most harmful on top, most helpful below, a legend under them.

    Args:
        harmful_images: ``[m1, C, H, W]`` in [0, 1].
        harmful_captions: ``m1`` captions.
        helpful_images: ``[m2, C, H, W]`` in [0, 1].
        helpful_captions: ``m2`` captions.
        path: where to write the PNG.
        ncols: images per row.
        legend: a line under the figure explaining the captions (None: none).
        column: the score column, named in the block titles.

    Returns:
        The path written.
    """
    m1 = int(np.asarray(harmful_images).shape[0])
    m2 = int(np.asarray(helpful_images).shape[0])
    w1, h1 = _grid_size(m1, ncols)
    w2, h2 = _grid_size(m2, ncols)
    extra = 0.8 if legend else 0.0
    fig = plt.figure(figsize=(max(w1, w2), h1 + h2 + 0.8 + extra))
    top, bottom, foot = fig.subfigures(3, 1, height_ratios=[h1, h2, 0.01 + extra])
    _draw_images(top, harmful_images, harmful_captions, ncols)
    top.suptitle(f"most harmful (most negative {column})")
    _draw_images(bottom, helpful_images, helpful_captions, ncols)
    bottom.suptitle(f"most helpful (most positive {column})")
    if legend:
        foot.text(0.5, 0.5, textwrap.fill(legend, 140), ha="center", va="center", fontsize=8)
    save_figure(fig, path)
    return Path(path)
