"""The library baselines ``ekfac_if`` (kronfluence) and ``trak`` (traker), method §4.

- on a tiny float64 problem whose exact Hessian is a Gauss-Newton matrix (a linear head on
  fixed features: cross-entropy of a linear model), kronfluence's EK-FAC influence ranks
  the training tasks as the dense-Hessian ``direct_if`` does (Spearman >= 0.95) and on the
  same scale (the conversion of the module docstring), while the identity "Hessian" does not;
- TRAK's scores are oriented as metaif's (positive Spearman against ``direct_if``);
- on a small digits run, ``metaif score`` gives every task and instance a finite score with
  both methods, kronfluence's factors are reused on rerun, and prune-and-retrain ranks with them;
- bad settings stop with one line.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

import influence_helpers as H
from metaif_cli import constants as C
from metaif_cli.data.config import CorruptionConfig, DatasetConfig
from metaif_cli.errors import MetaifError
from metaif_cli.influence import compute
from metaif_cli.influence.baseline_config import EkfacConfig, TrakConfig
from metaif_cli.influence.problem import UnrolledProblem
from metaif_cli.io import load_json
from metaif_cli.influence.config import HessianConfig, SolverConfig
from metaif_cli.models.config import ModelConfig
from metaif_cli.prune.config import PruneConfig
from metaif_cli.score.config import ScoreConfig
from metaif_cli.train.command import run_train
from metaif_cli.train.config import OptimConfig, TrainConfig

pytest.importorskip("kronfluence")
pytest.importorskip("trak")

DELTA_REG = 0.01


@pytest.fixture(scope="module")
def linear_head():
    """30 training and 10 test tasks of random images; ``lam`` = the head of a 1-layer MLP."""
    model = H.make_model(layers=1, hidden=6)
    spec, theta = H.lam_of(model, head_only=True)
    train = H.random_tasks(30, unit_weights=True, seed=1)
    test = H.random_tasks(10, unit_weights=True, seed=2)
    direct = UnrolledProblem(H.make_learner(model), spec, train, test, n=len(train), delta_reg=DELTA_REG, steps=0)
    return model, spec, theta, train, test, direct


def _dense_direct_if(direct, theta, damping):
    cfg = ScoreConfig(run="x", method="direct_if", progress=False, solver=SolverConfig(name="dense"),
                      hessian=HessianConfig(damping=damping, auto_damping=False, num_tasks=None))
    return compute.influence(direct, theta, cfg).scores


def test_ekfac_if_agrees_with_dense_direct_if(linear_head):
    model, spec, theta, train, test, direct = linear_head
    damping = 0.1
    dense = _dense_direct_if(direct, theta, damping)
    from metaif_cli.influence.ekfac_if import ekfac_influence

    def run(strategy):
        return ekfac_influence(model, spec.unflatten(theta), train, test, n=len(train), delta_reg=DELTA_REG,
                               cfg=EkfacConfig(strategy=strategy, damping=damping), seed=0).scores

    ek = run("ekfac")
    assert spearmanr(dense.task, ek.task)[0] >= 0.95
    assert spearmanr(dense.query.flatten(), ek.query.flatten())[0] >= 0.95
    assert spearmanr(dense.support.flatten(), ek.support.flatten())[0] >= 0.95
    # same sign convention and scale: pred_delta_test_loss, not kronfluence's raw score
    ratio = float((ek.task / dense.task).median())
    assert 0.7 < ratio < 1.3
    torch.testing.assert_close(ek.task, ek.query.sum(1), rtol=1e-10, atol=0)  # task = sum of its query instances
    # the test can fail: without curvature the ranking is far off
    assert spearmanr(dense.task, run("identity").task)[0] < 0.9


def test_trak_is_oriented_as_metaif(linear_head):
    model, spec, theta, train, test, direct = linear_head
    dense = _dense_direct_if(direct, theta, 0.1)
    from metaif_cli.influence.trak import trak_influence

    tr = trak_influence(model, [spec.unflatten(theta)], train, test, cfg=TrakConfig(proj_dim=1000), seed=0).scores
    assert spearmanr(dense.task, tr.task)[0] > 0.3
    assert spearmanr(dense.query.flatten(), tr.query.flatten())[0] > 0.2
    torch.testing.assert_close(tr.task, tr.query.sum(1), rtol=1e-10, atol=0)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """16 digits tasks, 25% corrupted; 12 Adam steps of MAML on an 8-unit MLP with batch norm; 3 checkpoints."""
    cfg = TrainConfig(seed=0, device="cpu", progress=False,
                      dataset=DatasetConfig(name="digits", num_train_tasks=16, num_val_tasks=4, num_test_tasks=8,
                                            queries=3, split_by="instance", split_fractions=[0.6, 0.1, 0.3]),
                      corruption=CorruptionConfig(task_fraction=0.25),
                      model=ModelConfig(hidden=8, layers=1, norm="batch"),
                      optim=OptimConfig(steps=12, meta_batch_size=4, lr=1e-2, eval_every=12, checkpoint_every=4,
                                        num_checkpoints=3))
    run_dir = tmp_path_factory.mktemp("baselines") / "run"
    run_train(cfg, run_dir)
    return run_dir


@pytest.mark.parametrize("method,extra", [("ekfac_if", {}), ("trak", {"trak": TrakConfig(proj_dim=32,
                                                                                           num_checkpoints=3)})])
def test_score_every_task_and_instance_of_a_digits_run(digits_run, tmp_path, method, extra):
    from metaif_cli.score.pipeline import score

    cfg = ScoreConfig(run=str(digits_run), method=method, progress=False, plots=False, **extra)
    out_dir = tmp_path / method
    summary = score(cfg, out_dir)
    tasks = pd.read_csv(out_dir / C.TASK_SCORES_CSV)
    inst = pd.read_csv(out_dir / C.INSTANCE_SCORES_CSV)
    pool = pd.read_csv(digits_run / C.TASKS_CSV)
    train = pool[pool.split == "train"]
    assert list(tasks.columns) == ["task_id", "pred_delta_test_loss", "rank", "method", "corrupted"]
    assert sorted(tasks.task_id) == list(range(16)) and tasks.pred_delta_test_loss.notna().all()
    assert len(inst) == len(train) and inst.pred_delta_test_loss.notna().all()
    assert set(inst.role) == {"support", "query"} and (inst.method == method).all()
    # task score = sum of its query-instance scores (unit weights); rank 1 = most negative = most harmful
    q = inst[inst.role == "query"].groupby("task_id").pred_delta_test_loss.sum()
    merged = tasks.set_index("task_id").pred_delta_test_loss
    assert (merged - q.loc[merged.index]).abs().max() <= 1e-5 * merged.abs().max()
    assert tasks.sort_values("rank").pred_delta_test_loss.is_monotonic_increasing
    assert summary["method_info"]["training_examples"] == "query instances"
    if method == "ekfac_if":  # factors stored in the score directory and reused
        factors = Path(summary["method_info"]["factors"])
        assert factors.is_dir() and any(factors.glob("*arguments.json"))
        again = score(cfg, out_dir)
        assert again["seconds"]["ekfac_factors"] < summary["seconds"]["ekfac_factors"]
        pd.testing.assert_frame_equal(pd.read_csv(out_dir / C.TASK_SCORES_CSV), tasks)
    else:
        assert summary["method_info"]["num_checkpoints"] == 3


def test_prune_ranks_with_library_baselines(digits_run):
    from metaif_cli.prune.scores import compute_ranking
    from metaif_cli.score.run import load_run

    cfg = PruneConfig(run=str(digits_run), methods=["ekfac_if", "trak"], unit="support", progress=False)
    run = load_run(digits_run)
    for method in cfg.methods:
        ranking = compute_ranking(run, cfg, method)
        assert len(ranking.table) == 16 * 5 and ranking.table.score.notna().all()


@pytest.mark.parametrize("make,match", [
    (lambda: EkfacConfig(damping=float("nan")), "ekfac.damping"),
    (lambda: EkfacConfig(damping=-1.0), "ekfac.damping"),
    (lambda: EkfacConfig(strategy="kfc"), "ekfac.strategy"),
    (lambda: TrakConfig(proj_dim=0), "trak.proj_dim"),
    (lambda: TrakConfig(num_checkpoints=1.5), "trak.num_checkpoints"),
    (lambda: TrakConfig(lambda_reg=float("inf")), "trak.lambda_reg"),
])
def test_bad_settings_stop_with_one_line(make, match):
    with pytest.raises(MetaifError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_too_many_trak_checkpoints_and_editing_are_refused(digits_run):
    from metaif_cli.score.methods import pred_delta_lam, run_method
    from metaif_cli.score.run import load_run

    run = load_run(digits_run)
    with pytest.raises(MetaifError, match="trak.num_checkpoints"):
        run_method(run, ScoreConfig(run=str(digits_run), method="trak", trak=TrakConfig(num_checkpoints=9)))
    with pytest.raises(MetaifError, match="parameter change"):
        pred_delta_lam(run, ScoreConfig(run=str(digits_run), method="ekfac_if"), [("task", 0, None, None)])
