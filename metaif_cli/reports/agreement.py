"""Agreement of influence predictions with leave-one-out retraining (method §5, E4).

:func:`correlation_summary`: Pearson, Spearman and sign agreement of predicted vs actual
``delta_test_loss``; :func:`vector_agreement`: cosine and norm ratio of ``pred_delta_lam``
vs actual ``delta_lam``. Pure numpy/scipy.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def correlation_summary(pred: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Agreement of predicted and actual ``delta_test_loss`` (method §5).

    Pairs where either value is non-finite are dropped.

    Args:
        pred: ``[n]`` predicted changes (``pred_delta_test_loss``).
        actual: ``[n]`` changes measured by leave-one-out retraining.

    Returns:
        ``{"pearson", "spearman", "sign_agreement", "n"}``. ``sign_agreement`` is the
        fraction of units whose predicted and actual changes have the same sign, over the
        units whose actual change is not exactly zero. Correlations are NaN with fewer
        than 2 pairs or a constant input.
    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    actual = np.asarray(actual, dtype=np.float64).reshape(-1)
    if pred.shape != actual.shape:
        raise ValueError(
            f"pred and actual must have the same length, got {pred.size} and {actual.size}."
        )
    keep = np.isfinite(pred) & np.isfinite(actual)
    pred, actual = pred[keep], actual[keep]
    n = int(pred.size)
    pearson = spearman = float("nan")
    if n >= 2 and np.ptp(pred) > 0 and np.ptp(actual) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pearson = float(stats.pearsonr(pred, actual)[0])
            spearman = float(stats.spearmanr(pred, actual)[0])
    nonzero = actual != 0
    sign_agreement = (
        float(np.mean(np.sign(pred[nonzero]) == np.sign(actual[nonzero])))
        if nonzero.any()
        else float("nan")
    )
    return {"pearson": pearson, "spearman": spearman, "sign_agreement": sign_agreement, "n": n}


def vector_agreement(
    pred_vecs: np.ndarray, actual_vecs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and norm ratio of ``pred_delta_lam`` vs actual ``delta_lam`` (method §5).

    Args:
        pred_vecs: ``[m, P]`` predicted parameter changes, one row per unit.
        actual_vecs: ``[m, P]`` actual parameter changes from retraining.

    Returns:
        ``(cosine, norm_ratio)``, each ``[m]``: ``cos(pred_i, actual_i)`` and
        ``||pred_i|| / ||actual_i||``. Cosine is NaN where either norm is zero; the ratio
        is NaN where the actual norm is zero.
    """
    pred_vecs = np.asarray(pred_vecs, dtype=np.float64)
    actual_vecs = np.asarray(actual_vecs, dtype=np.float64)
    if pred_vecs.ndim == 1:
        pred_vecs = pred_vecs[None, :]
    if actual_vecs.ndim == 1:
        actual_vecs = actual_vecs[None, :]
    if pred_vecs.shape != actual_vecs.shape or pred_vecs.ndim != 2:
        raise ValueError(
            f"pred_vecs and actual_vecs must both be [m, P] with the same shape, got "
            f"{pred_vecs.shape} and {actual_vecs.shape}."
        )
    p_norm = np.linalg.norm(pred_vecs, axis=1)
    a_norm = np.linalg.norm(actual_vecs, axis=1)
    dot = np.einsum("ij,ij->i", pred_vecs, actual_vecs)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = p_norm * a_norm
        cosine = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.nan)
        ratio = np.where(a_norm > 0, p_norm / np.where(a_norm > 0, a_norm, 1.0), np.nan)
    return cosine, ratio
