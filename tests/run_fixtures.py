"""A finished tiny digits run shared by the modules that read or damage run directories.

``finished`` is trained once per test module that imports it; ``run_copy`` is a fresh copy of it
per test, for tests that change files of the run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from metaif_cli.train.command import run_train
from test_train import _train_cfg

STEPS = ["optim.steps=6", "optim.checkpoint_every=2", "optim.eval_every=3", "optim.num_checkpoints=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    run_train(_train_cfg(*STEPS), run)
    return run


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst
