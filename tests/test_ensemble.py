"""Score ensembles (issue 10): ``ensemble.checkpoints=K`` and ``runs=[...]`` equal the mean of
their members' scores; runs of another pool are refused; costs land in ``score.json``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from metaif_cli.data.config import DatasetConfig
from metaif_cli.errors import MetaifError
from metaif_cli.influence.config import HessianConfig, SolverConfig
from metaif_cli.meta.config import MetaConfig
from metaif_cli.models.config import ModelConfig
from metaif_cli.score.config import EnsembleConfig, ScoreConfig, settings_of
from metaif_cli.score.ensemble import checkpoint_members
from metaif_cli.score.methods import run_method, run_single
from metaif_cli.score.pipeline import score
from metaif_cli.score.run import load_run
from metaif_cli.train.command import run_train
from metaif_cli.train.config import OptimConfig, TrainConfig


def _train(root: Path, name: str, seed: int = 0, init_seed: int | None = None) -> Path:
    cfg = TrainConfig(seed=seed, device="cpu", dtype="float64", progress=False,
                      dataset=DatasetConfig(name="digits", ways=2, shots=1, queries=2, num_train_tasks=6,
                                            num_val_tasks=2, num_test_tasks=3),
                      model=ModelConfig(name="mlp", hidden=4, layers=1, init_seed=init_seed),
                      meta=MetaConfig(name="maml", inner_steps=1, inner_lr=0.4),
                      optim=OptimConfig(steps=6, meta_batch_size=3, lr=1e-2, eval_every=3, checkpoint_every=2,
                                        num_checkpoints=3))
    run_train(cfg, root / name)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ens")
    return {"a": _train(root, "a"), "b": _train(root, "b", init_seed=7), "other": _train(root, "other", seed=1)}


def _cfg(run: Path, **kw) -> ScoreConfig:
    kw.setdefault("ensemble", EnsembleConfig(checkpoints=1))  # the final point unless a test says otherwise
    return ScoreConfig(run=str(run), progress=False, plots=False,
                       hessian=HessianConfig(form="gauss_newton", num_tasks=None),
                       solver=SolverConfig(tol=1e-8, max_iter=300), **kw)


def _close(a, b) -> None:
    for f in ("task", "query", "support"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-10, atol=1e-14)


def test_checkpoint_ensemble_is_the_mean_of_its_members(runs):
    cfg = _cfg(runs["a"], ensemble=EnsembleConfig(checkpoints=3))
    run = load_run(runs["a"])
    out = run_method(run, cfg)
    members = checkpoint_members(run, 3)
    assert [m[0].split("@")[1] for m in members] == ["final", "step_4", "step_2"]
    parts = [run_single(m, replace(cfg, ensemble=EnsembleConfig()), None) for _, m in members]
    mean = type(out.scores)(*(sum(getattr(p.scores, f) for p in parts) / 3 for f in ("task", "query", "support")))
    _close(out.scores, mean)
    assert len(out.members) == 3 and all(m["seconds"] > 0 and m["relative_residual"] < 1e-8 for m in out.members)
    assert not torch.allclose(parts[0].scores.task, parts[2].scores.task)
    with pytest.raises(MetaifError, match="ensemble.checkpoints=5"):
        run_method(run, replace(cfg, ensemble=EnsembleConfig(checkpoints=5)))


def test_default_ensemble_of_if_uses_the_checkpoints_the_run_kept(runs):
    """Unset ``ensemble.checkpoints``: ``if`` averages up to 5 points, as many as kept (here the
    final point and 2 checkpoints); other methods stay at the final point."""
    run = load_run(runs["a"])
    default = _cfg(runs["a"], ensemble=EnsembleConfig())
    assert ScoreConfig().hessian.form == "gauss_newton" and EnsembleConfig().checkpoints is None
    out = run_method(run, default)
    three = run_method(run, _cfg(runs["a"], ensemble=EnsembleConfig(checkpoints=3)))
    assert len(out.members) == 3
    _close(out.scores, three.scores)
    direct = run_method(run, replace(default, method="direct_if"))
    assert direct.members is None and direct.s is not None
    _close(direct.scores, run_method(run, _cfg(runs["a"], method="direct_if")).scores)


def test_run_ensemble_is_the_mean_and_refuses_another_pool(runs, tmp_path):
    cfg = _cfg(runs["a"], runs=[str(runs["b"])])
    out = run_method(load_run(runs["a"]), cfg)
    single = replace(cfg, runs=[])
    a, b = (run_single(load_run(runs[k]), single, None).scores for k in ("a", "b"))
    _close(out.scores, type(a)(*((getattr(a, f) + getattr(b, f)) / 2 for f in ("task", "query", "support"))))
    with pytest.raises(MetaifError) as info:
        run_method(load_run(runs["a"]), _cfg(runs["a"], runs=[str(runs["other"])]))
    assert "another task pool" in str(info.value) and "\n" not in str(info.value)
    summary = score(cfg, tmp_path / "scores")
    assert summary["ensemble"]["num_members"] == 2 and summary["ensemble"]["seconds"] > 0
    assert json.loads((tmp_path / "scores" / "score.json").read_text())["settings"]["runs"] == [str(runs["b"])]


def test_default_settings_do_not_mention_ensembles():
    s = settings_of(ScoreConfig(run="x"))
    assert "ensemble" not in s and "runs" not in s
