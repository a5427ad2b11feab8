"""Verdicts of ``metaif prune-and-retrain`` in words (method §6: intervals over retrainings).

A method is compared with another (``random``, or keeping everything) by the paired differences
of their meta-test accuracies over retrainings that share a batch order (retraining ``r`` of
each uses the same seeds, so the batch-order noise they share cancels): the mean difference
with its 95% Student-t interval (:func:`metaif_cli.reports.intervals.mean_ci95`). The word
follows the interval: ``better`` when it lies above zero, ``worse`` when below, ``tie`` when it
holds zero; with one retraining there is no interval and no verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metaif_cli.reports.intervals import mean_ci95


@dataclass(frozen=True)
class Verdict:
    """``a - b`` over ``n`` paired retrainings: mean, 95% half-width (NaN for n < 2), word."""

    difference: float
    half_width: float
    n: int
    word: str

    def text(self) -> str:
        if self.n < 2:
            return f"{self.difference:+.4f} (one retraining each: no interval, no verdict)"
        return f"{self.difference:+.4f} +- {self.half_width:.4f}: {self.word}"


def verdict(a: np.ndarray, b: np.ndarray) -> Verdict:
    """Paired verdict of accuracies ``a`` against ``b`` (the same retrainings' seeds, in the same order)."""
    a, b = np.asarray(a, dtype=float).reshape(-1), np.asarray(b, dtype=float).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired accuracies need equal, non-empty shapes; got {a.shape} and {b.shape}")
    mean, half = mean_ci95(a - b)
    if a.size < 2:
        return Verdict(mean, float("nan"), 1, "no verdict")
    word = "better" if mean - half > 0 else ("worse" if mean + half < 0 else "tie")
    return Verdict(mean, half, int(a.size), word)


def remove_conclusion(accuracies: dict[tuple[str, float], list[float]], baseline: list[float], unit: str,
                      retrain_seeds: int) -> list[str]:
    """Markdown lines: per method and fraction, the verdict against ``random`` and against keeping everything.

    Args:
        accuracies: ``(method, fraction) -> [R]`` meta-test accuracies, retraining ``r`` with batch order ``r``.
        baseline: ``[R]`` accuracies of the unpruned model with the same batch orders.
        unit: what was removed (``task``, ``support``, ``query``).
        retrain_seeds: ``R``.
    """
    over = (f"95% Student-t interval over {retrain_seeds} paired retrainings (batch orders)" if retrain_seeds > 1
            else "one retraining per row, so no interval: rerun with retrain_seeds=3 for a verdict")
    lines = ["## Verdict", "",
             f"Difference of meta-test accuracy after removing the most harmful {unit}s, {over}; "
             "better / worse: the interval lies above / below zero; tie: it holds zero.", ""]
    for (method, fraction), acc in accuracies.items():
        if method == "random":
            continue
        parts = [f"vs keeping everything {verdict(acc, baseline).text()}"]
        rand = accuracies.get(("random", fraction))
        if rand is not None:
            parts.insert(0, f"vs random {verdict(acc, rand).text()}")
        lines.append(f"- {method}, {fraction:.0%} removed: " + "; ".join(parts))
    for (method, fraction), acc in accuracies.items():
        if method == "random":
            lines.append(f"- random, {fraction:.0%} removed: vs keeping everything {verdict(acc, baseline).text()}")
    return lines


def separable(preds: dict[str, np.ndarray], target: np.ndarray, num: int = 1000, seed: int = 0) -> list[str]:
    """Lines naming, for every pair of methods, whether their LDS differ: the paired 95% bootstrap
    interval of ``LDS(a) - LDS(b)`` over the subsets (:func:`metaif_cli.reports.lds.paired_difference_ci`)
    excludes zero (separable) or holds it (not separable)."""
    from metaif_cli.reports.lds import paired_difference_ci

    methods, lines = list(preds), []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            point, low, high = paired_difference_ci(preds[a], preds[b], target, num, seed)
            if not np.isfinite([point, low, high]).all():
                lines.append(f"- {a} vs {b}: no interval (an LDS is undefined)")
            elif low > 0 or high < 0:
                first, second = (a, b) if point > 0 else (b, a)
                lines.append(f"- {first} above {second}: separable (LDS difference {abs(point):.3f}, 95% interval "
                             f"[{min(abs(low), abs(high)):.3f}, {max(abs(low), abs(high)):.3f}])")
            else:
                lines.append(f"- {a} vs {b}: not separable (LDS difference {point:+.3f}, 95% interval "
                             f"[{low:+.3f}, {high:+.3f}] holds zero)")
    return lines


def lds_conclusion(table: list[dict], preds: dict[str, np.ndarray], target: np.ndarray, null_band: float,
                   num: int = 1000, seed: int = 0) -> list[str]:
    """Markdown lines of ``protocol=lds``: each method against the null band, then which pairs are separable."""
    lines = ["## LDS", "", f"Spearman correlation across subsets of predicted and retrained f, 95% bootstrap interval; "
             f"an unrelated prediction stays within +-{null_band:.3f} (the null band).", ""]
    for row in table:
        low, high = row["lds_ci_low"], row["lds_ci_high"]
        where = ("above the null band" if low > null_band else
                 "within reach of the null band: not shown to predict retraining" if high > -null_band else
                 "below the null band: predicts the wrong direction")
        lines.append(f"- {row['method']}: LDS {row['lds']:.3f} [{low:.3f}, {high:.3f}], {where}")
    if len(preds) > 1:
        lines += ["", "Which methods are separable (paired bootstrap over the same subsets):"]
        lines += separable(preds, target, num, seed)
    return lines
