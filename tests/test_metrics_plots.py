"""Tests of metaif_cli.reports: metrics (hand examples and brute-force oracles) and plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from metaif_cli.reports import (agreement, detection, instance_grids, intervals, prune_plots, score_plots,
                                training_plots)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- detection


def test_detection_curve_hand_example():
    scores = np.array([0.3, -1.0, 0.5, -0.2, 0.0])
    corrupted = np.array([0, 1, 0, 0, 1], dtype=bool)
    x, y = detection.detection_curve(scores, corrupted)
    np.testing.assert_allclose(x, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # Inspection order 1 (c), 3, 4 (c), 0, 2.
    np.testing.assert_allclose(y, [0.0, 0.5, 0.5, 1.0, 1.0, 1.0])


def test_detection_curve_harmful_high_and_ties():
    scores = np.array([0.3, -1.0, 0.5, -0.2, 0.0])
    corrupted = np.array([0, 1, 0, 0, 1], dtype=bool)
    _, y = detection.detection_curve(scores, corrupted, harmful_low=False)
    # Order 2, 0, 4 (c), 3, 1 (c).
    np.testing.assert_allclose(y, [0.0, 0.0, 0.0, 0.5, 0.5, 1.0])
    # Ties broken stably by index.
    _, y = detection.detection_curve(np.zeros(3), np.array([False, False, True]))
    np.testing.assert_allclose(y, [0.0, 0.0, 0.0, 1.0])


def test_detection_curve_no_corrupted_is_nan():
    x, y = detection.detection_curve(np.array([1.0, 2.0]), np.array([False, False]))
    assert x.shape == (3,) and np.all(np.isnan(y))


def test_library_metrics_random_detection_curve_is_the_diagonal():
    corrupted = np.zeros(50, dtype=bool)
    corrupted[:10] = True
    x, y = detection.random_detection_curve(50, corrupted)
    np.testing.assert_array_equal(x, np.arange(51) / 50)
    np.testing.assert_array_equal(y, x)  # the exact expectation, not an estimate
    # it is the mean over all orders: averaging many permutations approaches it
    rng = np.random.default_rng(0)
    mean = np.mean([detection.detection_curve(rng.permutation(50).astype(float), corrupted)[1]
                    for _ in range(2000)], axis=0)
    assert np.max(np.abs(mean - y)) < 0.02
    assert np.all(np.isnan(detection.random_detection_curve(3, np.zeros(3, bool))[1]))
    with pytest.raises(ValueError):
        detection.random_detection_curve(49, corrupted)


def test_library_metrics_auc_and_ap_are_scikit_learns():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(1)
    for _ in range(10):
        n = int(rng.integers(5, 60))
        h = rng.integers(-3, 4, size=n).astype(float)  # ties
        pos = rng.random(n) < 0.3
        pos[0], pos[1] = True, False
        assert detection.roc_auc(h, pos) == roc_auc_score(pos, h)
        assert detection.average_precision(h, pos) == average_precision_score(pos, h)
    assert math.isnan(detection.roc_auc(np.ones(3), np.ones(3, bool)))
    assert math.isnan(detection.average_precision(np.ones(3), np.zeros(3, bool)))


def _brute_force_auc(h: np.ndarray, pos: np.ndarray) -> float:
    hp, hn = h[pos], h[~pos]
    diff = hp[:, None] - hn[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_roc_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        scores = rng.integers(-3, 4, size=n).astype(float)  # many ties
        corrupted = rng.random(n) < 0.3
        corrupted[0], corrupted[1] = True, False
        got = detection.detection_summary(scores, corrupted)["roc_auc"]
        assert got == pytest.approx(_brute_force_auc(-scores, corrupted), abs=1e-12)


def test_average_precision_hand_examples():
    h = np.array([0.9, 0.8, 0.7, 0.6])
    pos = np.array([1, 0, 1, 0], dtype=bool)
    # Hits at ranks 1 and 3: (1 + 2/3) / 2.
    assert detection.average_precision(h, pos) == pytest.approx(5 / 6)
    # A tie between a positive and a negative enters as one threshold, whatever the order.
    h = np.array([0.9, 0.5, 0.5, 0.1])
    for pos in ([1, 1, 0, 0], [1, 0, 1, 0]):
        assert detection.average_precision(h, np.array(pos, bool)) == pytest.approx(
            0.5 * 1 + 0.5 * 2 / 3
        )
    # Through detection_summary: harmfulness = -score.
    summary = detection.detection_summary(-np.array([0.9, 0.8, 0.7, 0.6]),
                                        np.array([1, 0, 1, 0], bool))
    assert summary["average_precision"] == pytest.approx(5 / 6)
    assert summary["roc_auc"] == pytest.approx(0.75)


def test_found_at_fractions():
    scores = np.arange(10, dtype=float)
    corrupted = np.zeros(10, dtype=bool)
    corrupted[[0, 1, 5, 9]] = True
    s = detection.detection_summary(scores, corrupted)
    assert s["found_at_10"] == pytest.approx(0.25)
    assert s["found_at_20"] == pytest.approx(0.5)
    assert s["found_at_40"] == pytest.approx(0.5)
    assert s["n"] == 10 and s["n_corrupted"] == 4
    # Perfect ranking: all found by the corrupted share.
    s = detection.detection_summary(np.where(corrupted, -1.0, 1.0), corrupted)
    assert s["found_at_40"] == 1.0 and s["roc_auc"] == 1.0 and s["average_precision"] == 1.0


@pytest.mark.parametrize("flags", [np.zeros(6, bool), np.ones(6, bool)])
def test_detection_summary_degenerate_gives_nan(flags):
    s = detection.detection_summary(np.linspace(-1, 1, 6), flags)
    for key in ("roc_auc", "average_precision", "found_at_10", "found_at_20", "found_at_40"):
        assert math.isnan(s[key])


def test_detection_rejects_bad_input():
    with pytest.raises(ValueError):
        detection.detection_summary(np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError):
        detection.detection_curve(np.array([0.0, np.nan]), np.array([True, False]))


# ----------------------------------------------------------------------------- agreement


def test_correlation_summary_against_scipy():
    rng = np.random.default_rng(1)
    actual = rng.normal(size=40)
    pred = actual + 0.5 * rng.normal(size=40)
    actual[3] = 0.0
    s = agreement.correlation_summary(pred, actual)
    assert s["pearson"] == pytest.approx(stats.pearsonr(pred, actual)[0])
    assert s["spearman"] == pytest.approx(stats.spearmanr(pred, actual)[0])
    mask = actual != 0
    assert s["sign_agreement"] == pytest.approx(
        np.mean(np.sign(pred[mask]) == np.sign(actual[mask]))
    )
    assert s["n"] == 40


def test_correlation_summary_hand_and_degenerate():
    s = agreement.correlation_summary(np.array([1.0, -1.0, 2.0, 0.5]),
                                    np.array([2.0, 1.0, 0.0, 3.0]))
    assert s["sign_agreement"] == pytest.approx(2 / 3)  # zero in actual ignored
    s = agreement.correlation_summary(np.ones(5), np.arange(5.0))
    assert math.isnan(s["pearson"]) and math.isnan(s["spearman"])
    s = agreement.correlation_summary(np.array([1.0]), np.array([2.0]))
    assert s["n"] == 1 and math.isnan(s["pearson"]) and s["sign_agreement"] == 1.0


def test_vector_agreement_hand_example():
    pred = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    actual = np.array([[2.0, 0.0], [-1.0, -1.0], [3.0, 0.0], [0.0, 0.0]])
    cos, ratio = agreement.vector_agreement(pred, actual)
    np.testing.assert_allclose(cos[:3], [1.0, -1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(ratio[:3], [0.5, 1.0, 2.0 / 3.0])
    assert np.isnan(cos[3]) and np.isnan(ratio[3])
    with pytest.raises(ValueError):
        agreement.vector_agreement(np.zeros((2, 3)), np.zeros((2, 4)))


def test_library_metrics_mean_ci95_uses_student_t():
    mean, half = intervals.mean_ci95(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5)
    assert half == pytest.approx(3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2.0)  # t_{0.975, 3}
    # three seeds: t = 4.303, more than twice the normal 1.96
    _, half3 = intervals.mean_ci95(np.array([0.80, 0.82, 0.84]))
    assert half3 == pytest.approx(4.302652729911275 * 0.02 / np.sqrt(3))
    # the interval covers the mean about 95% of the time over small samples (1.96 covers ~88% at n=3)
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(4000, 3))
    covered = [abs(m) <= h for m, h in map(intervals.mean_ci95, draws)]
    assert 0.93 < np.mean(covered) < 0.97
    assert intervals.mean_ci95(np.array([0.7])) == (pytest.approx(0.7), 0.0)
    m, h = intervals.mean_ci95(np.array([]))
    assert math.isnan(m) and math.isnan(h)


# ----------------------------------------------------------------------------- plots


def _assert_png(path, directory):
    data = path.read_bytes()
    assert len(data) > 0 and data.startswith(PNG_MAGIC)
    leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_plot_score_distribution(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=50)
    corrupted = rng.random(50) < 0.2
    for flags, name in ((corrupted, "a.png"), (None, "b.png")):
        out = score_plots.plot_score_distribution(scores, flags, tmp_path / name, "scores")
        assert out == tmp_path / name
        _assert_png(out, tmp_path)


def test_plot_detection_curve(tmp_path):
    rng = np.random.default_rng(0)
    corrupted = rng.random(30) < 0.3
    scores = rng.normal(size=30) - corrupted
    curves = {
        "if": detection.detection_curve(scores, corrupted),
        "random": detection.random_detection_curve(30, corrupted),
    }
    out = score_plots.plot_detection_curve(curves, tmp_path / "det.png", "detection",
                                     corrupted_fraction=float(corrupted.mean()))
    _assert_png(out, tmp_path)


@pytest.mark.parametrize("channels", [1, 3])
def test_plot_instance_grid(tmp_path, channels):
    rng = np.random.default_rng(0)
    images = rng.random((5, channels, 8, 8))
    captions = [f"#{i + 1} task {i} support\nlabel {i} (class 'Greek/character0{i}')"
                for i in range(5)]
    out = instance_grids.plot_instance_grid(images, captions, tmp_path / "grid.png", "harmful",
                                   ncols=3)
    _assert_png(out, tmp_path)
    with pytest.raises(ValueError):
        instance_grids.plot_instance_grid(images, captions[:2], tmp_path / "bad.png", "x")


def test_plot_harmful_helpful_grid(tmp_path):
    rng = np.random.default_rng(0)
    harmful = rng.random((10, 1, 8, 8))
    helpful = rng.random((3, 1, 8, 8))
    out = instance_grids.plot_harmful_helpful_grid(
        harmful, [f"h{i}" for i in range(10)], helpful, [f"g{i}" for i in range(3)],
        tmp_path / "hh.png",
    )
    _assert_png(out, tmp_path)


def test_plot_accuracy_vs_fraction(tmp_path):
    df = pd.DataFrame({
        "method": ["if"] * 3 + ["random"] * 3,
        "fraction": [0.0, 0.2, 0.4] * 2,
        "test_acc": [0.5, 0.6, 0.7, 0.5, 0.52, 0.55],
        "test_acc_ci95": [0.01, 0.02, 0.02, 0.01, 0.03, np.nan],
    })
    out = prune_plots.plot_accuracy_vs_fraction(df, tmp_path / "acc.png", "accuracy")
    _assert_png(out, tmp_path)


def test_plot_pred_vs_actual(tmp_path):
    rng = np.random.default_rng(0)
    actual = rng.normal(size=20)
    out = prune_plots.plot_pred_vs_actual(actual + 0.1 * rng.normal(size=20), actual,
                                    tmp_path / "pva.png", "E4")
    _assert_png(out, tmp_path)


def test_plot_training_curves(tmp_path):
    steps = np.arange(0, 100, 10)
    df = pd.DataFrame({
        "step": steps,
        "train_loss": np.exp(-steps / 50),
        "val_loss": np.where(steps % 20 == 0, np.exp(-steps / 60), np.nan),
        "val_acc": np.where(steps % 20 == 0, 1 - np.exp(-steps / 40), np.nan),
    })
    out = training_plots.plot_training_curves(df, tmp_path / "curves.png")
    _assert_png(out, tmp_path)
