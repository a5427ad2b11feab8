"""Issue 13, item 15: every artefact loads with ``torch.load(..., weights_only=True)``.

Opening a run directory cannot execute code: every ``.pt`` metaif writes (model,
checkpoints, shards, ``ihvp.pt``, ``pred_delta_lam.pt``, the Omniglot cache) holds only
tensors and plain containers, and no ``torch.load`` in the package runs without
``weights_only=True``.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from metaif_cli.train.command import run_train
from metaif_cli.score.config import EnsembleConfig, ScoreConfig
from metaif_cli.score.pipeline import score
from test_train import _train_cfg

PACKAGE = Path(__file__).resolve().parents[1] / "metaif_cli"


class Payload:
    """Anything pickled by class: ``weights_only=True`` refuses to rebuild it."""


def test_weights_only_every_torch_load_in_the_package():
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                    and getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                calls.append(path.name)
                assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
                    f"{path}:{node.lineno} torch.load without weights_only=True"
    assert calls  # io.load_torch and the Omniglot cache


def test_weights_only_every_artefact_of_train_and_score(tmp_path):
    run = tmp_path / "run"
    run_train(_train_cfg("optim.steps=4", "optim.checkpoint_every=2", "optim.num_checkpoints=2"), run)
    cfg = ScoreConfig(run=str(run), plots=False, progress=False, pred_delta_lam=["task:0", "support:1:0"],
                      dtype="float64", ensemble=EnsembleConfig(checkpoints=1))  # single point: ihvp.pt
    for i in range(2):
        score(dataclasses.replace(cfg, shard=f"{i}/2"), tmp_path / "score")
    pts = sorted(run.rglob("*.pt")) + sorted((tmp_path / "score").rglob("*.pt"))
    names = {p.name for p in pts}
    assert {"model.pt", "checkpoint_last.pt", "checkpoint_prev.pt", "ihvp.pt", "pred_delta_lam.pt",
            "shard_0_of_2.pt", "shard_1_of_2.pt"} <= names, names
    for p in pts:
        torch.load(p, weights_only=True)


def test_weights_only_refuses_a_pickled_object(tmp_path):
    from metaif_cli.errors import MetaifError
    from metaif_cli.io import load_torch

    torch.save({"x": Payload()}, tmp_path / "evil.pt")  # an object of a class, not plain data
    with pytest.raises(MetaifError, match="corrupt or unreadable"):
        load_torch(tmp_path / "evil.pt", "rerun")
