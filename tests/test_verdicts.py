"""Issue 23: ``metaif prune-and-retrain``'s verdict words follow the intervals over retrainings
(hand-made numbers), and its plan states the retrainings and their estimated time first."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metaif_cli.prune.config import PruneConfig
from metaif_cli.prune.report import plan_text
from metaif_cli.reports.verdicts import remove_conclusion, separable, verdict


def test_verdict_better_when_interval_above_zero():
    v = verdict([0.92, 0.93, 0.94], [0.90, 0.91, 0.92])  # differences 0.02, 0.02, 0.02: no spread
    assert v.word == "better" and v.difference == pytest.approx(0.02) and v.half_width == pytest.approx(0.0)


def test_verdict_worse_when_interval_below_zero():
    v = verdict([0.88, 0.89, 0.90], [0.90, 0.92, 0.91])  # differences -0.02, -0.03, -0.01
    # mean -0.02, sd 0.01, t_{0.975,2} = 4.303: half-width 0.0248 > 0.02, so the interval holds zero
    assert v.word == "tie" and v.half_width == pytest.approx(4.3027 * 0.01 / math.sqrt(3), rel=1e-4)
    w = verdict([0.88, 0.89, 0.90, 0.87, 0.88], [0.90, 0.91, 0.92, 0.89, 0.90])  # all -0.02
    assert w.word == "worse"


def test_verdict_tie_when_interval_holds_zero_and_none_for_one_retraining():
    assert verdict([0.90, 0.91, 0.90], [0.91, 0.90, 0.90]).word == "tie"
    one = verdict([0.9034], [0.9080])
    assert one.word == "no verdict" and "no interval" in one.text() and one.difference == pytest.approx(-0.0046)


def test_remove_conclusion_compares_every_method_with_random_and_with_keeping_everything():
    acc = {("if", 0.2): [0.93, 0.94, 0.95], ("random", 0.2): [0.90, 0.91, 0.92]}
    lines = remove_conclusion(acc, [0.905, 0.915, 0.925], "task", 3)
    text = "\n".join(lines)
    assert "- if, 20% removed: vs random +0.0300 +- 0.0000: better; vs keeping everything +0.0250 +- 0.0000: better" \
        in text, text
    assert "- random, 20% removed: vs keeping everything -0.0050 +- 0.0000: worse" in text
    assert "over 3 paired retrainings" in text


def test_lds_separable_when_the_paired_interval_excludes_zero():
    rng = np.random.default_rng(0)
    target = rng.normal(size=40)
    preds = {"if": target + 0.1 * rng.normal(size=40), "random": rng.normal(size=40),
             "if_copy": target + 0.1 * rng.normal(size=40)}
    lines = separable(preds, target, num=200, seed=0)
    assert any(line.startswith("- if above random: separable") for line in lines), lines
    assert any(line.startswith("- if vs if_copy: not separable") for line in lines), lines


def test_plan_counts_retrainings_and_estimates_from_the_runs_training_time():
    cfg = PruneConfig(run="x", methods=["if", "random", "loss"], fractions=[0.1, 0.3], retrain_seeds=3)
    text = plan_text(cfg, 100, 60.0)
    assert "= 20 retrainings, about 20 min at 60 s each" in text  # 3 x 2 x 3 + 2 unpruned, 60 s each
    one = plan_text(PruneConfig(run="x", methods=["if", "random"], fractions=[0.2]), 100, 60.0)
    assert "x 1 batch order = 2 retrainings, about 2 min" in one and "retrain_seeds=3 gives a tie/better/worse verdict (8 " in one
    assert "no retraining" in plan_text(PruneConfig(run="x", update="edit"), 100, 60.0)
