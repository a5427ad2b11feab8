"""Statistics of the linear datamodeling score (method §5, LDS; Park et al. 2023, TRAK).

Pure functions of arrays, tested against direct computations on hand-made numbers:

- :func:`spearman`: rank correlation (average ranks for ties; NaN when either side is constant);
- :func:`lds`: Spearman across subsets between prediction ``[M]`` and target ``[M]``; for
  per-test-task targets ``[M, T]`` the mean over test tasks of the per-task Spearman (the
  TRAK definition);
- :func:`bootstrap_ci`: 95% percentile interval of :func:`lds` over subsets resampled with
  replacement (seeded);
- :func:`paired_difference_ci`: ``LDS(a) - LDS(b)`` of two predictions of the same subsets,
  with the 95% percentile interval of the difference over the same resamples of the subsets
  (paired: the subsets' shared noise cancels, so it is narrower than comparing two intervals);
- :func:`noise_ceiling`: split-half reliability of the seed-averaged target. The ``R``
  retrainings of every subset are split into two disjoint halves of ``h = floor(R/2)``
  seeds; the Spearman correlation ``r`` across subsets of the two half means, averaged
  over the splits, is the reliability of an ``h``-seed target, and Spearman-Brown steps it
  up to ``R`` seeds: ``k r / (1 + (k - 1) r)`` with ``k = R / h`` (``k = 2`` for even ``R``).
  A reliability at or below 0 means the target is noise: the ceiling is then 0. Undefined
  (NaN) for ``R = 1``;
- :func:`null_band`: ``1.96 / sqrt(M - 1)``, the two-sided 95% band of the Spearman
  correlation of an unrelated prediction with ``M`` subsets (where ``random`` should stay).
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
from scipy import stats


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two ``[M]`` vectors; NaN when either is constant or has a NaN."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = stats.rankdata(a), stats.rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def lds(pred: np.ndarray, target: np.ndarray) -> float:
    """LDS of ``pred`` against ``target``: ``[M]`` vectors, or ``[M, T]`` (mean over the ``T`` columns)."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if target.ndim == 1:
        return spearman(pred, target)
    values = [spearman(pred[:, t], target[:, t]) for t in range(target.shape[1])]
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def bootstrap_ci(pred: np.ndarray, target: np.ndarray, num: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of :func:`lds` over ``num`` resamples of the subsets (rows), with replacement."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    m = target.shape[0]
    rng = np.random.default_rng(seed)
    values = np.array([lds(pred[idx], target[idx]) for idx in rng.integers(0, m, size=(num, m))])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def paired_difference_ci(pred_a: np.ndarray, pred_b: np.ndarray, target: np.ndarray, num: int = 1000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(LDS(a) - LDS(b), low, high)``: the difference and its percentile interval over ``num``
    resamples of the subsets (rows, with replacement), each resample scoring both predictions.

    ``pred_a``, ``pred_b``, ``target``: ``[M]`` (or ``[M, T]``) over the same subsets.
    """
    a, b = np.asarray(pred_a, dtype=np.float64), np.asarray(pred_b, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    m = target.shape[0]
    rng = np.random.default_rng(seed)
    diffs = np.array([lds(a[idx], target[idx]) - lds(b[idx], target[idx]) for idx in rng.integers(0, m, size=(num, m))])
    diffs = diffs[np.isfinite(diffs)]
    point = lds(a, target) - lds(b, target)
    if diffs.size == 0:
        return point, float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return point, float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))


def half_splits(r: int, max_splits: int = 100, seed: int = 0) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Disjoint pairs of halves of ``floor(r/2)`` seeds out of ``range(r)`` (each unordered pair once).

    All of them when there are at most ``max_splits``, else a seeded sample of ``max_splits``.
    """
    h = r // 2
    if h == 0:
        return []
    splits = []
    for a in itertools.combinations(range(r), h):
        rest = [i for i in range(r) if i not in a]
        for b in itertools.combinations(rest, h):
            if a < b:
                splits.append((a, b))
    if len(splits) > max_splits:
        pick = np.sort(np.random.default_rng(seed).choice(len(splits), size=max_splits, replace=False))
        splits = [splits[i] for i in pick]
    return splits


def spearman_brown(r: float, k: float) -> float:
    """Reliability of a ``k`` times longer measurement: ``k r / (1 + (k - 1) r)``; 0 for ``r <= 0``."""
    if not np.isfinite(r):
        return float("nan")
    r = max(float(r), 0.0)
    return k * r / (1 + (k - 1) * r)


def split_half(targets: np.ndarray, seed: int = 0) -> float:
    """Mean Spearman across subsets between the means of two disjoint halves of the seeds.

    Args:
        targets: ``[M, R]`` (one target per subset and seed) or ``[M, R, T]`` (per test task:
            the per-task correlations are averaged).
    """
    targets = np.asarray(targets, dtype=np.float64)
    values = []
    for a, b in half_splits(targets.shape[1], seed=seed):
        values.append(lds(targets[:, list(a)].mean(1), targets[:, list(b)].mean(1)))
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def noise_ceiling(targets: np.ndarray, seed: int = 0) -> float:
    """Spearman-Brown corrected split-half reliability of the ``R``-seed mean target (NaN for ``R = 1``)."""
    r = np.asarray(targets).shape[1]
    if r < 2:
        return float("nan")
    return spearman_brown(split_half(targets, seed), r / (r // 2))


def null_band(m: int) -> float:
    """Half-width of the 95% band of the Spearman correlation of an unrelated prediction over ``m`` subsets."""
    return 1.96 / math.sqrt(m - 1) if m > 1 else float("nan")


def ratio(value: float, ceiling: float) -> float:
    """``value / ceiling``, NaN when the ceiling is not positive."""
    return value / ceiling if np.isfinite(ceiling) and ceiling > 0 else float("nan")


def plot_lds_scatter(actual: np.ndarray, preds: dict[str, np.ndarray], results: dict[str, dict],
                     path: str | os.PathLike, title: str) -> Path:
    """Actual (seed-averaged) target against each method's prediction, one panel per method.

    Args:
        actual: ``[M]`` targets (mean over seeds).
        preds: ``[M]`` prediction per method.
        results: per method ``lds``, ``lds_ci_low``, ``lds_ci_high`` and ``ceiling`` (for the titles).
        path: where to write the PNG.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metaif_cli.io import save_figure

    n = max(len(preds), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (method, pred) in zip(axes.flat, preds.items()):
        r = results[method]
        ax.scatter(pred, actual, s=12, alpha=0.7)
        ax.set_title(f"{method}: LDS {r['lds']:.2f} [{r['lds_ci_low']:.2f}, {r['lds_ci_high']:.2f}]\n"
                     f"ceiling {r['ceiling']:.2f}", fontsize=9)
        ax.set_xlabel("predicted f (f_full + sum of removed scores)", fontsize=8)
        ax.set_ylabel("actual f (mean over seeds)", fontsize=8)
        ax.ticklabel_format(useOffset=False)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)
