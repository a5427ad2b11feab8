"""Issue 13, item 17: the ``logger`` config group of ``metaif train`` (csv, tensorboard)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from metaif_cli import constants as C
from metaif_cli.train.command import run_train
from metaif_cli.errors import MetaifError
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.train.loggers import LoggerConfig
from test_train import _train_cfg, typed_config

STEPS = ["optim.steps=6", "optim.checkpoint_every=2", "optim.eval_every=3", "optim.lr=0.002"]


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_logger_group_composes_and_defaults_to_csv():
    assert typed_config("train", []).logger.name == "csv"
    assert typed_config("train", ["logger=tensorboard"]).logger.name == "tensorboard"
    with pytest.raises(MetaifError, match="logger='wandb' is not valid"):
        LoggerConfig(name="wandb")


def test_logger_csv_writes_metrics_csv_only(tmp_path):
    run_train(_train_cfg(*STEPS), tmp_path)
    assert len(pd.read_csv(tmp_path / C.METRICS_CSV)) == 6
    assert not (tmp_path / "tensorboard").exists()


def test_logger_tensorboard_loss_accuracy_lr_per_step(tmp_path):
    run_train(_train_cfg(*STEPS, "logger=tensorboard"), tmp_path)
    scalars = _scalars(tmp_path / "tensorboard")
    metrics = pd.read_csv(tmp_path / C.METRICS_CSV)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(metrics.train_loss.tolist(), rel=1e-6)
    assert scalars["train/lr"] == [(s, pytest.approx(0.002)) for s in range(1, 7)]
    assert [s for s, _ in scalars["val/acc"]] == [3, 6] and [s for s, _ in scalars["val/loss"]] == [3, 6]
    assert [v for _, v in scalars["val/acc"]] == pytest.approx(metrics.val_acc.dropna().tolist(), rel=1e-6)


def test_logger_tensorboard_resume_shows_each_step_once(tmp_path, monkeypatch):
    cfg = _train_cfg(*STEPS, "logger=tensorboard")
    calls = {"n": 0}
    real = MetaLearner.meta_gradient

    def meta_gradient(learner, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # after the checkpoint at step 2, with step 3 logged
            raise KeyboardInterrupt
        return real(learner, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(MetaLearner, "meta_gradient", meta_gradient)
        with pytest.raises(KeyboardInterrupt):
            run_train(cfg, tmp_path)
    run_train(cfg, tmp_path)
    steps = [s for s, _ in _scalars(tmp_path / "tensorboard")["train/loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_logger_choice_does_not_change_the_run(tmp_path):
    """Switching the logger of a finished run resumes it (nothing to do), not 'different settings'."""
    run_train(_train_cfg(*STEPS), tmp_path)
    run_train(_train_cfg(*STEPS, "logger=tensorboard"), tmp_path)
