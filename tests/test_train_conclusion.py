"""Issue 23: a run that did not learn ends with a warning; conflicting checkpoint settings are
resolved visibly: the log names the steps where checkpoints land."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from metaif_cli.reports.learning import not_learned_reasons
from metaif_cli.train.config import OptimConfig
from metaif_cli.train.loop import checkpoint_steps

REPO = Path(__file__).resolve().parents[1]


def test_not_learned_when_test_accuracy_is_within_its_interval_of_chance():
    assert not_learned_reasons(0.2, 0.0, 5)  # the README's flat folder run: 0.2000 +- 0.0000
    assert not_learned_reasons(0.23, 0.04, 5)
    assert not not_learned_reasons(0.30, 0.04, 5)


def test_not_learned_when_training_loss_is_flat_or_at_uniform_guess():
    flat = np.full(100, math.log(5))
    assert any("flat" in r for r in not_learned_reasons(0.9, 0.01, 5, flat))
    falling = np.linspace(1.6, 0.3, 100)
    assert not not_learned_reasons(0.9, 0.01, 5, falling)
    to_chance = np.concatenate([np.full(5, 3.0), np.full(95, math.log(5))])  # fell, but to ln 5 and stayed
    assert any("uniform guess" in r for r in not_learned_reasons(0.9, 0.01, 5, to_chance))


def test_checkpoint_settings_that_disagree_are_named():
    optim = OptimConfig(steps=600, num_checkpoints=5, checkpoint_every=200)  # the omniglot_cpu preset
    note = optim.checkpoint_note(checkpoint_steps(600, 5))
    assert "steps 120, 240, 360, 480, 600" in note and "checkpoint_every=200 only sets" in note
    agreeing = OptimConfig(steps=600, num_checkpoints=3, checkpoint_every=200)
    assert agreeing.checkpoint_note(checkpoint_steps(600, 3)) is None


def test_more_kept_checkpoints_than_steps_is_resolved_and_said():
    optim = OptimConfig(steps=1, num_checkpoints=2, checkpoint_every=3)  # debug=fast with optim.steps=1
    assert optim.checkpoint_note(checkpoint_steps(1, 2)) == ("optim.num_checkpoints=2 but optim.steps=1 has room for "
                                                             "1: keeping checkpoints at steps 1")


def test_train_that_did_not_learn_ends_with_a_warning_and_names_checkpoint_steps(tmp_path):
    res = subprocess.run([sys.executable, "-m", "metaif_cli.cli", "train", "debug=fast", "optim.steps=12",
                          "optim.lr=1e-12", "optim.checkpoint_every=5", "optim.num_checkpoints=2", "model.hidden=8",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "run" / "train.log").read_text()
    assert "[WARNING] - the run did not learn: the training loss stayed flat" in text, text
    assert "keeps checkpoints at steps 6, 12" in text, text
