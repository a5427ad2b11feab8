"""Detection of corrupted units from influence scores (method §6, E1-E3): detection
curves, ROC AUC, average precision and the fraction found after inspecting 10/20/40%.

Pure numpy, no plotting (figures live in :mod:`metaif_cli.reports.score_plots`).

Sign convention (method §3): a score is ``pred_delta_test_loss``, the predicted
change of the test loss if the unit is removed; negative = harmful, so the most harmful
unit has the lowest score and is inspected first.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

__all__ = [
    "detection_curve",
    "random_detection_curve",
    "detection_summary",
    "roc_auc",
    "average_precision",
]


def _as_scores_and_labels(
    scores: np.ndarray, corrupted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten a (scores, corrupted) pair."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    corrupted = np.asarray(corrupted).reshape(-1).astype(bool)
    if scores.shape != corrupted.shape:
        raise ValueError(
            f"scores and corrupted must have the same length, got {scores.size} and "
            f"{corrupted.size}; pass one corruption flag per scored unit."
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError(
            "scores contain NaN or inf; drop or fix the non-finite "
            "pred_delta_test_loss values before evaluating detection."
        )
    return scores, corrupted


def _curve_from_order(order: np.ndarray, corrupted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detection curve for a given inspection order."""
    n = corrupted.size
    total = int(corrupted.sum())
    x = np.arange(n + 1, dtype=np.float64) / max(n, 1)
    if total == 0:
        return x, np.full(n + 1, np.nan)
    found = np.concatenate([[0], np.cumsum(corrupted[order])])
    return x, found.astype(np.float64) / total


def detection_curve(
    scores: np.ndarray, corrupted: np.ndarray, *, harmful_low: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of corrupted units found against fraction of units inspected.

    Units are inspected most harmful first: ascending score when ``harmful_low`` (the
    ``pred_delta_test_loss`` convention), descending otherwise (e.g. the ``loss``
    baseline, where high = suspicious). Ties are broken stably by index.

    Args:
        scores: ``[n]`` scores of the units.
        corrupted: ``[n]`` boolean flags, True where the unit is corrupted.
        harmful_low: whether a lower score means more harmful.

    Returns:
        ``(x, y)``, each of length ``n + 1`` and starting at 0: ``x[k] = k / n`` is the
        fraction inspected and ``y[k]`` the fraction of all corrupted units among the
        first ``k`` inspected. ``y`` is all NaN when no unit is corrupted.
    """
    scores, corrupted = _as_scores_and_labels(scores, corrupted)
    key = scores if harmful_low else -scores
    order = np.argsort(key, kind="stable")
    return _curve_from_order(order, corrupted)


def random_detection_curve(n: int, corrupted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected detection curve of a random inspection order: exactly the diagonal.

    Inspecting ``k`` of ``n`` units in a uniformly random order finds, in expectation,
    ``k / n`` of the corrupted ones (each unit is among the first ``k`` with probability
    ``k / n``), so ``E[y_k] = x_k``: no permutations need drawing.

    Args:
        n: number of units (must equal ``len(corrupted)``).
        corrupted: ``[n]`` boolean corruption flags.

    Returns:
        ``(x, y)`` as in :func:`detection_curve`: ``y = x``, or all NaN when no unit is
        corrupted.
    """
    corrupted = np.asarray(corrupted).reshape(-1).astype(bool)
    if corrupted.size != n:
        raise ValueError(f"n={n} but corrupted has {corrupted.size} entries; they must match.")
    x = np.arange(n + 1, dtype=np.float64) / max(n, 1)
    return x, (x.copy() if corrupted.any() else np.full(n + 1, np.nan))


def roc_auc(harmfulness: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``harmfulness`` for predicting ``positive`` (``sklearn.metrics.roc_auc_score``).

    Ties count one half per tied (positive, negative) pair.

    Args:
        harmfulness: ``[n]`` scores, higher = more likely positive.
        positive: ``[n]`` boolean labels.

    Returns:
        The AUC in [0, 1], NaN when there are no positives or no negatives.
    """
    from sklearn.metrics import roc_auc_score

    harmfulness, positive = _as_scores_and_labels(harmfulness, positive)
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == positive.size:
        return float("nan")
    return float(roc_auc_score(positive, harmfulness))


def average_precision(harmfulness: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of ``harmfulness`` for ``positive`` (``sklearn.metrics.average_precision_score``).

    ``AP = sum_t (R_t - R_{t-1}) P_t`` over the distinct score thresholds in decreasing
    order: tied units enter together, so the result does not depend on their order.

    Args:
        harmfulness: ``[n]`` scores, higher = more likely positive.
        positive: ``[n]`` boolean labels.

    Returns:
        The AP in [0, 1], NaN when there are no positives.
    """
    from sklearn.metrics import average_precision_score

    harmfulness, positive = _as_scores_and_labels(harmfulness, positive)
    if not positive.any():
        return float("nan")
    return float(average_precision_score(positive, harmfulness))


def detection_summary(
    scores: np.ndarray,
    corrupted: np.ndarray,
    fractions: Sequence[float] = (0.1, 0.2, 0.4),
) -> dict[str, float]:
    """ROC AUC, average precision and fraction found for one scoring method.

    Harmfulness is ``-score`` (method §3: negative ``pred_delta_test_loss`` =
    harmful). ``found_at_{100 f}`` is the detection curve of :func:`detection_curve`
    read at fraction inspected ``f`` (linear interpolation between units when ``f * n``
    is not a whole number).

    Args:
        scores: ``[n]`` ``pred_delta_test_loss`` values.
        corrupted: ``[n]`` boolean corruption flags.
        fractions: fractions of units inspected at which to report the fraction found.

    Returns:
        ``{"roc_auc", "average_precision", "found_at_10", "found_at_20", "found_at_40",
        "n", "n_corrupted"}`` (one ``found_at_*`` key per fraction). The metrics are NaN,
        not errors, when no unit or every unit is corrupted.
    """
    scores, corrupted = _as_scores_and_labels(scores, corrupted)
    n = scores.size
    n_corrupted = int(corrupted.sum())
    degenerate = n_corrupted == 0 or n_corrupted == n
    out: dict[str, float] = {
        "roc_auc": float("nan") if degenerate else roc_auc(-scores, corrupted),
        "average_precision": float("nan") if degenerate else average_precision(-scores, corrupted),
    }
    x, y = detection_curve(scores, corrupted) if not degenerate else (None, None)
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fractions must lie in [0, 1], got {f}.")
        key = f"found_at_{int(round(100 * f))}"
        out[key] = float("nan") if degenerate else float(np.interp(f, x, y))
    out["n"] = n
    out["n_corrupted"] = n_corrupted
    return out
