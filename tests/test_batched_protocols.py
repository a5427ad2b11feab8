"""``retrain.batch``: LDS, leave-one-out (cold and warm), ``retrain_seeds`` and the ``retrain``
selection method give the same results whichever engine retrained (the single-run loop,
``retrain.batch=1``, or stacks of models), and the launchers run batches. Float64, tiny digits run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from metaif_cli import constants as C
from metaif_cli.data.config import CorruptionConfig, DatasetConfig
from metaif_cli.errors import MetaifError
from metaif_cli.influence.config import HessianConfig
from metaif_cli.models.config import ModelConfig
from metaif_cli.prune import launch as launch_module
from metaif_cli.prune.config import LdsConfig, PruneConfig, RetrainConfig
from metaif_cli.prune.launch import launch, make_batches
from metaif_cli.prune.pipeline import prune_and_retrain
from metaif_cli.prune.units import Unit
from metaif_cli.prune.update import retrain_job
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.run import load_run
from metaif_cli.train.command import run_train
from metaif_cli.train.config import OptimConfig, TrainConfig


@pytest.fixture(scope="module")
def run64(tmp_path_factory) -> Path:
    """12 tasks (3 corrupted), float64, 10 Adam steps on meta-batches of 4 of a second-order MAML MLP."""
    cfg = TrainConfig(seed=0, device="cpu", dtype="float64", progress=False,
                      dataset=DatasetConfig(name="digits", num_train_tasks=12, num_val_tasks=4, num_test_tasks=8,
                                            queries=4, split_by="instance", split_fractions=[0.6, 0.1, 0.3]),
                      corruption=CorruptionConfig(task_fraction=0.25), model=ModelConfig(hidden=8, layers=1),
                      optim=OptimConfig(steps=10, meta_batch_size=4, lr=1e-2, eval_every=5, checkpoint_every=5,
                                        num_checkpoints=2))
    run_dir = tmp_path_factory.mktemp("run64") / "run"
    run_train(cfg, run_dir)
    return run_dir


def _cfg(run: Path, batch: int, **kw) -> PruneConfig:
    score = ScoreConfig(run=str(run), progress=False, hessian=HessianConfig(lanczos_iters=8))
    return PruneConfig(run=str(run), progress=False, score=score, retrain=RetrainConfig(batch=batch), **kw)


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame, drop=()) -> None:
    drop = [c for c in a.columns if c in drop or c.endswith("_seconds")]
    pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop), rtol=1e-10, atol=1e-12)


def test_lds_results_do_not_depend_on_the_engine(run64, tmp_path):
    outs = {}
    for batch in (1, 5):
        lds = LdsConfig(num_subsets=4, seeds=2, vary="both", bootstrap=50, retrain_dir=str(tmp_path / f"r{batch}"))
        outs[batch] = prune_and_retrain(_cfg(run64, batch, protocol="lds", methods=["loss", "random"], lds=lds),
                                        tmp_path / f"lds{batch}")
    _frames_equal(outs[1]["results"], outs[5]["results"])
    a, b = (pd.read_csv(tmp_path / f"lds{k}" / C.LDS_SUBSETS_CSV) for k in (1, 5))
    _frames_equal(a, b)
    assert outs[1]["f_full_seeds"] == pytest.approx(outs[5]["f_full_seeds"], rel=1e-10)
    assert a.target.nunique() > 1


def test_loo_and_retrain_seeds_do_not_depend_on_the_engine(run64, tmp_path):
    for batch in (1, 4):
        prune_and_retrain(_cfg(run64, batch, protocol="loo", num_units=3, loo_modes=["cold", "warm"], warm_steps=4,
                               retrain_seeds=2, methods=["if"]), tmp_path / f"loo{batch}")
    _frames_equal(*(pd.read_csv(tmp_path / f"loo{k}" / C.LOO_RESULTS_CSV) for k in (1, 4)))


def test_remove_with_retrain_seeds_and_the_retrain_method_do_not_depend_on_the_engine(run64, tmp_path):
    results = {}
    for batch in (1, 3):
        cfg = _cfg(run64, batch, methods=["random", "retrain"], retrain_subset=3, fractions=[0.25], retrain_seeds=2)
        results[batch] = prune_and_retrain(cfg, tmp_path / f"rm{batch}")["results"]
    _frames_equal(results[1], results[3])
    _frames_equal(*(pd.read_csv(tmp_path / f"rm{k}" / "selection" / "retrain.csv") for k in (1, 3)))


def test_launchers_run_batches_of_compatible_jobs(run64, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = load_run(run64)
    removals = [[Unit("task", 0)], [Unit("support", 2, 1)], [Unit("query", 4, 0)], []]
    warm = {k: v + 0.01 for k, v in run.lam.items()}
    jobs = lambda where: ([retrain_job(run, u, where / str(i)) for i, u in enumerate(removals)]
                          + [retrain_job(run, [Unit("task", 5)], where / "warm", warm, 3)])
    assert make_batches(jobs(tmp_path), 2) == [[0, 1], [2, 3], [4]]  # the warm job takes other steps
    lams = {}
    for launcher, batch in (("sequential", 1), ("sequential", 2), ("joblib", 2)):
        where = tmp_path / f"{launcher}{batch}"
        launch(jobs(where), launcher=launcher, n_jobs=2, batch=batch)
        lams[launcher, batch] = [torch.load(p / C.MODEL_PT, weights_only=True)["lam"]
                                 for p in sorted(where.iterdir())]
    for key in (("sequential", 2), ("joblib", 2)):
        for a, b in zip(lams["sequential", 1], lams[key]):
            assert all(torch.allclose(a[k], b[k], rtol=1e-10, atol=1e-12) for k in a)
    monkeypatch.setattr(launch_module, "train_members", lambda *a, **k: pytest.fail("all finished"))
    assert len(launch(jobs(tmp_path / "sequential2"), batch=2)) == 5


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_retrain_batch_is_refused_in_one_line(value):
    with pytest.raises(MetaifError, match=r"retrain\.batch=") as err:
        RetrainConfig(batch=value)
    assert "\n" not in str(err.value)
    assert RetrainConfig().size_for("mlp") > 1 and RetrainConfig().size_for("cnn4") == 1
    assert RetrainConfig(batch=3).size_for("cnn4") == 3
