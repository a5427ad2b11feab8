"""Issue 23: each command ends with its conclusion; ``metaif score``'s names the right units.

On a shifted-corruption digits pool (``corruption.task_mode=shift``, the README's detection
run, made tiny) the most harmful tasks of ``summary.md`` are the corrupted ones; intervals over
ensemble members decide what is "distinguishable from zero" (hand-made numbers).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metaif_cli.reports.summary import distinguishable, half_width, score_summary

REPO = Path(__file__).resolve().parents[1]
METAIF = [sys.executable, "-m", "metaif_cli.cli"]
SHIFTED = ["dataset.num_train_tasks=30", "dataset.num_val_tasks=4", "dataset.num_test_tasks=20",
           "corruption.task_fraction=0.3", "corruption.task_mode=shift", "optim.steps=60", "optim.eval_every=30",
           "optim.checkpoint_every=30", "optim.num_checkpoints=2", "optim.meta_batch_size=8", "model.hidden=16",
           "progress=false"]


def test_summary_distinguishable_from_zero_follows_the_interval():
    values, se = np.array([-3.0, -1.0, 0.5, 2.0]), np.array([1.0, 1.0, 1.0, 0.1])
    # 3 members: t_{0.975,2} = 4.303, so only |value| > 4.303 * se counts
    assert half_width(np.array([1.0]), 3)[0] == pytest.approx(4.3027, abs=1e-4)
    assert distinguishable(values, se, 3).tolist() == [False, False, False, True]
    assert distinguishable(values, None, 3) is None and distinguishable(values, se, 1) is None


def test_summary_names_most_harmful_and_helpful_tasks_with_intervals():
    df = pd.DataFrame({"task_id": [0, 1, 2, 3], "pred_delta_test_loss": [0.5, -3.0, 2.0, -1.0],
                       "pred_delta_test_loss_se": [1.0, 0.1, 0.1, 1.0], "corrupted": [False, True, False, False]})
    lines = score_summary(df, None, "pred_delta_test_loss", "pred_delta_test_loss_se", 3, "if", True, top=2)
    text = "\n".join(lines)
    assert "- most harmful: task 1 [corrupted] -3 +- 0.43; task 3 -1 +- 4.3" in text
    assert "- most helpful: task 2 +2 +- 0.43; task 0 +0.5 +- 4.3" in text
    assert "2 harmful (< 0), 2 helpful (> 0); 2 distinguishable from zero at 95% over the 3 members " \
           "(1 harmful, 1 helpful)" in text
    single = "\n".join(score_summary(df.drop(columns="pred_delta_test_loss_se"), None, "pred_delta_test_loss",
                                     "pred_delta_test_loss_se", 1, "if", True))
    assert "No interval" in single and "+-" not in single


@pytest.fixture(scope="module")
def shifted_scores(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("shifted")
    res = subprocess.run([*METAIF, "train", *SHIFTED, f"hydra.run.dir={root / 'run'}"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([*METAIF, "score", f"run={root / 'run'}", "unit=task", "plots=false", "progress=false",
                          f"hydra.run.dir={root / 'score'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return root / "score", res.stdout + res.stderr


def test_summary_names_corrupted_tasks_among_most_harmful_on_shifted_pool(shifted_scores):
    out, stderr = shifted_scores
    text = (out / "summary.md").read_text()
    harmful = next(line for line in text.splitlines() if line.startswith("- most harmful:"))
    named = harmful.split(";")
    assert sum("[corrupted]" in item for item in named) >= 4, harmful  # 30% of the pool is corrupted
    found, k = map(int, re.search(r"(\d+) of the (\d+) most harmful tasks are corrupted", text).groups())
    assert k == 9 and found >= 6, text
    assert "most harmful: task" in stderr and "distinguishable from zero" in stderr  # printed too


def test_score_csv_lists_most_harmful_first_with_its_spread(shifted_scores):
    out, _ = shifted_scores
    tasks = pd.read_csv(out / "task_scores.csv")
    assert tasks.pred_delta_test_loss.is_monotonic_increasing and tasks["rank"].tolist() == list(range(1, 31))
    assert (tasks.pred_delta_test_loss_se >= 0).all()  # the default ensemble: final point + 1 checkpoint


def test_summary_lists_no_harmful_unit_when_every_score_is_positive():
    df = pd.DataFrame({"task_id": [0, 1], "pred_delta_test_loss": [0.2, 0.1], "corrupted": [False, False]})
    text = "\n".join(score_summary(df, None, "pred_delta_test_loss", None, 1, "if", True))
    assert "- most harmful: none (no task has a negative score)" in text
    assert "- most helpful: task 0 +0.2; task 1 +0.1" in text


def test_summary_says_when_one_label_stands_out_among_the_most_helpful():
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(5), 100)  # 500 support instances, labels 0-4
    scores = rng.normal(size=500) + 3.0 * (labels == 3)  # label 3 scores higher: the head's doing
    df = pd.DataFrame({"task_id": np.repeat(np.arange(100), 5), "role": "support", "position": labels,
                       "label": labels, "class": 0, "pred_delta_test_loss": scores, "corrupted": False})
    text = "\n".join(score_summary(None, df, "pred_delta_test_loss", None, 1, "if", True))
    assert "Label 3 holds" in text and "of the 100 most helpful" in text and "not classes" in text
    even = df.assign(pred_delta_test_loss=rng.normal(size=500))
    assert "holds" not in "\n".join(score_summary(None, even, "pred_delta_test_loss", None, 1, "if", True))
