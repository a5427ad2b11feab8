"""``metaif prune-and-retrain`` on CPU: removal beats random, editing, oracle, leave-one-out, resume, launchers.

Two tiny runs on the bundled ``digits`` dataset are trained once per module: one with
30% of the training tasks corrupted (Adam, meta-batches; the harmful-data experiments
E1-E3), one "convex enough" for leave-one-out (float64, full-batch gradient descent,
``optim.delta_reg=0.2``; E4). Torch runs single-threaded here: on a shared 2-core machine
two intra-op threads are up to ~100x slower than one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from metaif_cli import constants as C
from metaif_cli.train.command import run_train
from metaif_cli.data.config import CorruptionConfig, DatasetConfig
from metaif_cli.influence.config import HessianConfig, SolverConfig
from metaif_cli.io import load_json
from metaif_cli.meta.config import MetaConfig
from metaif_cli.meta.params import FlatSpec
from metaif_cli.models.config import ModelConfig
from metaif_cli.prune import launch as launch_module
from metaif_cli.prune import pipeline
from metaif_cli.prune.config import PruneConfig
from metaif_cli.prune.launch import launch
from metaif_cli.prune.pipeline import prune_and_retrain
from metaif_cli.prune.scores import Ranking
from metaif_cli.prune.select import num_to_remove, oracle_ranking, select
from metaif_cli.prune.units import Unit, corrupted_flags
from metaif_cli.prune.update import IFEditor, retrain_job
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.methods import pred_delta_lam
from metaif_cli.score.run import load_run
from metaif_cli.train.config import OptimConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
FRACTION = 0.3


def _dataset(n: int) -> DatasetConfig:
    return DatasetConfig(name="digits", num_train_tasks=n, num_val_tasks=5, num_test_tasks=20, queries=5,
                         split_by="instance", split_fractions=[0.6, 0.1, 0.3])


@pytest.fixture(scope="module")
def corrupted_run(tmp_path_factory) -> Path:
    """24 tasks, 30% with wrong labels; 60 Adam steps of second-order MAML on a 16-unit MLP."""
    cfg = TrainConfig(seed=0, device="cpu", progress=False, dataset=_dataset(24),
                      corruption=CorruptionConfig(task_fraction=0.3), model=ModelConfig(hidden=16, layers=1),
                      optim=OptimConfig(steps=60, meta_batch_size=8, lr=1e-2, eval_every=60, checkpoint_every=60,
                                        num_checkpoints=2))
    run_dir = tmp_path_factory.mktemp("corrupted") / "run"
    run_train(cfg, run_dir)
    return run_dir


def _score_cfg(run: Path, **kw) -> ScoreConfig:
    kw.setdefault("hessian", HessianConfig(lanczos_iters=10))
    return ScoreConfig(run=str(run), progress=False, **kw)


def _prune_cfg(run: Path, **kw) -> PruneConfig:
    kw.setdefault("score", _score_cfg(run))
    return PruneConfig(run=str(run), progress=False, fractions=[FRACTION], **kw)


@pytest.fixture(scope="module")
def pruned(corrupted_run, tmp_path_factory) -> tuple[Path, PruneConfig, pd.DataFrame]:
    out = tmp_path_factory.mktemp("prune") / "out"
    cfg = _prune_cfg(corrupted_run, methods=["if", "random", "oracle"])
    return out, cfg, prune_and_retrain(cfg, out)["results"]


def _row(results: pd.DataFrame, method: str) -> pd.Series:
    return results[(results.method == method) & (results.fraction == FRACTION)].iloc[0]


# ------------------------------------------------------------------ removal


def test_removing_harmful_tasks_by_if_beats_random(pruned, corrupted_run, tmp_path):
    _, _, results = pruned
    random_losses = [_row(results, "random").test_loss]
    for seed in (1, 2):  # random removal averaged over three seeds
        cfg = _prune_cfg(corrupted_run, methods=["random"], seed=seed)
        random_losses.append(_row(prune_and_retrain(cfg, tmp_path / f"random{seed}")["results"], "random").test_loss)
    baseline = results[results.method == "none"].test_loss.item()
    if_loss = _row(results, "if").test_loss
    assert if_loss < np.mean(random_losses) and if_loss < baseline, (if_loss, random_losses, baseline)
    assert _row(results, "if").removed_corrupted_fraction > _row(results, "random").removed_corrupted_fraction


def test_prune_results_table(pruned):
    out, cfg, results = pruned
    table = pd.read_csv(out / C.PRUNE_RESULTS_CSV)
    assert list(table.columns[:11]) == ["method", "unit", "fraction", "update", "seed", "test_acc", "test_acc_ci95",
                                        "test_loss", "selection_seconds", "retrain_seconds",
                                        "removed_corrupted_fraction"]
    assert table.method.tolist() == ["none", "if", "random", "oracle"]
    none = table.iloc[0]
    original = load_json(Path(cfg.run) / C.RESULTS_JSON)
    assert (none.fraction, none.num_removed) == (0.0, 0)
    assert none.test_acc == pytest.approx(original["test_acc"])
    assert (table.num_removed[1:] == num_to_remove(FRACTION, 24)).all()  # 7 of 24 (the oracle: 7 corrupted)
    assert (out / C.ACCURACY_PNG).stat().st_size > 0
    main = pd.read_csv(out / C.MAIN_TABLE_CSV)
    assert main.method.tolist() == ["none", "if", "random", "oracle"]
    assert (out / C.MAIN_TABLE_MD).read_text().startswith("| method | fraction | test_acc")


def test_detection_curve_follows_each_ranking(pruned, tmp_path, monkeypatch):
    """The prune run plots it; the oracle's order finds every corrupted unit first, a subset ranking is left out."""
    from metaif_cli.reports import score_plots as plots
    from metaif_cli.prune import report

    out, _, _ = pruned
    assert (out / C.DETECTION_CURVE_PNG.format(unit="task")).stat().st_size > 0
    flags = pd.Series([False, True, False, True], index=[f"task:{k}" for k in range(4)])

    def ranking(method, ids):
        table = pd.DataFrame({"unit_id": ids, "score": range(len(ids)), "rank": range(1, len(ids) + 1)})
        return Ranking(method, table, "score", 0.0, "test")

    seen = {}
    monkeypatch.setattr(plots, "plot_detection_curve", lambda curves, path, title, corrupted_fraction: seen.update(
        curves=curves, fraction=corrupted_fraction))
    rankings = {"oracle": ranking("oracle", ["task:1", "task:3", "task:0", "task:2"]),
                "if": ranking("if", ["task:0", "task:1", "task:2", "task:3"]),
                "retrain": ranking("retrain", ["task:3"])}
    report.write_detection_curve(tmp_path, rankings, flags, "task", seed=0)
    assert set(seen["curves"]) == {"oracle", "if", "random"} and seen["fraction"] == 0.5
    np.testing.assert_allclose(seen["curves"]["oracle"][1][-4:], [0.5, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(seen["curves"]["if"][1][-4:], [0.0, 0.5, 0.5, 1.0])
    assert report.write_detection_curve(tmp_path, rankings, flags & False, "task", seed=0) is None


def test_oracle_removes_exactly_the_corrupted_tasks(pruned, corrupted_run):
    out, _, results = pruned
    flags = corrupted_flags(pd.read_csv(corrupted_run / C.TASKS_CSV), "task")
    corrupted = {i for i, bad in flags.items() if bad}
    ranking = oracle_ranking(flags, seed=0)
    assert {u.id for u in select(ranking, 0.9, len(flags))} == corrupted  # never clean filler
    assert {u.id for u in select(ranking, 0.1, len(flags))} < corrupted  # k = 2 of the 7
    row = _row(results, "oracle")
    assert row.num_removed == row.num_removed_corrupted == len(corrupted) and row.removed_corrupted_fraction == 1.0
    weights = torch.load(out / C.RETRAIN_DIR / f"oracle-{FRACTION:g}" / C.MODEL_PT, weights_only=True)["weights"]
    assert {f"task:{k}" for k in torch.nonzero(weights["w"] == 0).flatten().tolist()} == corrupted
    assert (weights["u"] == 1).all() and (weights["v"] == 1).all()


def test_retraining_without_nothing_reproduces_the_run(corrupted_run, tmp_path):
    """Same config, seed, initialisation and batch order: a retraining with no unit removed is the run."""
    run = load_run(corrupted_run)
    launch([retrain_job(run, [], tmp_path / "same")])
    lam = torch.load(tmp_path / "same" / C.MODEL_PT, weights_only=True)["lam"]
    original = torch.load(corrupted_run / C.MODEL_PT, weights_only=True)["lam"]
    assert all(torch.equal(lam[k], original[k]) for k in original)


# ------------------------------------------------------------------ editing


def test_edit_of_one_unit_is_pred_delta_lam(corrupted_run):
    run = load_run(corrupted_run)
    cfg = _score_cfg(corrupted_run)
    units = [Unit("task", 3), Unit("query", 5, 2)]
    expected = pred_delta_lam(run, cfg, [u.ref for u in units])
    editor = IFEditor(run, cfg)
    spec = FlatSpec.of(run.lam)
    for unit in units:
        edited = spec.flatten(editor.edited([unit])) - spec.flatten(run.lam)  # lam_edit - lam*
        want = expected[unit.id].to(edited)
        assert torch.allclose(edited, want, rtol=1e-5, atol=1e-7), (edited - want).abs().max()
        assert want.norm() > 0


def test_edit_and_grad_ascent_updates(pruned, monkeypatch):
    out, cfg, _ = pruned
    monkeypatch.setattr(pipeline, "compute_ranking", _fail("the if ranking is cached"))
    for update in ("edit", "grad_ascent"):
        cfg_u = _prune_cfg(Path(cfg.run), methods=["if", "oracle"], update=update)
        results = prune_and_retrain(cfg_u, out)["results"]
        assert (results["update"] == update).all() and results.test_acc.between(0, 1).all()
        assert (results.retrain_seconds[1:] > 0).all()
        assert np.isfinite(results.test_loss).all()


# ------------------------------------------------------------------ resume, launchers


def _fail(why: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"should not run: {why}")
    return fail


def test_rerun_skips_finished_retrainings(pruned, monkeypatch):
    out, cfg, results = pruned
    stamps = {p: p.stat().st_mtime_ns for p in (out / C.RETRAIN_DIR).glob(f"*/{C.RESULTS_JSON}")}
    assert len(stamps) == 3
    monkeypatch.setattr(launch_module, "run_job", _fail("every retraining is finished"))
    monkeypatch.setattr(launch_module, "train", _fail("every retraining is finished"))
    monkeypatch.setattr(pipeline, "compute_ranking", _fail("rankings are cached"))
    again = prune_and_retrain(cfg, out)["results"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    pd.testing.assert_frame_equal(again.drop(columns="selection_seconds"),
                                  results.drop(columns="selection_seconds"), check_exact=True)


def test_parallel_launchers_equal_sequential(corrupted_run, tmp_path, monkeypatch):
    """joblib (n_jobs=2) and submitit's local executor give bit-identical retrainings."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # submitit's local workers inherit it (loky limits its own)
    run = load_run(corrupted_run)
    removals = [[Unit("task", 0)], [Unit("support", 2, 1), Unit("query", 4, 0)]]
    lams, metrics = {}, {}
    for launcher in ("sequential", "joblib", "submitit"):
        jobs = [retrain_job(run, units, tmp_path / launcher / str(i)) for i, units in enumerate(removals)]
        results = launch(jobs, launcher=launcher, n_jobs=2, folder=tmp_path / "submitit_logs", cluster="local",
                         submitit_params={"timeout_min": 10})
        metrics[launcher] = [(r["test_acc"], r["test_loss"]) for r in results]
        lams[launcher] = [torch.load(tmp_path / launcher / str(i) / C.MODEL_PT, weights_only=True)["lam"]
                          for i in range(len(removals))]
    for launcher in ("joblib", "submitit"):
        assert metrics[launcher] == metrics["sequential"]
        for a, b in zip(lams["sequential"], lams[launcher]):
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(lams["sequential"][0]["head.weight"], lams["sequential"][1]["head.weight"])


# ------------------------------------------------------------------ leave-one-out


@pytest.fixture(scope="module")
def convex_run(tmp_path_factory) -> Path:
    """12 tasks, float64, full-batch gradient descent with delta_reg=0.2: close to a strict minimum."""
    cfg = TrainConfig(seed=0, device="cpu", dtype="float64", progress=False, dataset=_dataset(12),
                      corruption=CorruptionConfig(task_fraction=0.3), model=ModelConfig(hidden=16, layers=1),
                      meta=MetaConfig(inner_steps=2),
                      optim=OptimConfig(steps=300, meta_batch_size=12, optimizer="sgd", lr=0.3, delta_reg=0.2,
                                        eval_every=300, checkpoint_every=300, num_checkpoints=1))
    run_dir = tmp_path_factory.mktemp("convex") / "run"
    run_train(cfg, run_dir)
    return run_dir


def test_leave_one_out_agrees_with_task_if(convex_run, tmp_path):
    cfg = PruneConfig(run=str(convex_run), protocol="loo", num_units=8, loo_modes=["warm"], warm_steps=100,
                      progress=False, score=_score_cfg(convex_run, dtype="float64", hessian=HessianConfig(lanczos_iters=20),
                                                       solver=SolverConfig(tol=1e-6, max_iter=200)))
    out = prune_and_retrain(cfg, tmp_path / "loo")
    table = pd.read_csv(tmp_path / "loo" / C.LOO_RESULTS_CSV)
    assert list(table.columns) == ["unit_id", "unit", "pred_delta_test_loss", "actual_delta_test_loss", "retrain",
                                   "cos_delta_lam", "norm_ratio_delta_lam"]
    assert len(table) == 8 and (table.retrain == "warm").all()
    summary = load_json(tmp_path / "loo" / C.LOO_SUMMARY_JSON)["modes"]["warm"]
    assert summary == out["modes"]["warm"]
    assert summary["spearman"] >= 0.9, summary
    assert summary["cos_delta_lam_median"] > 0.7, summary
    assert (tmp_path / "loo" / C.PRED_VS_ACTUAL_PNG.format(retrain="warm")).exists()


def test_retrain_method_ranks_by_leave_one_out(corrupted_run, tmp_path):
    cfg = _prune_cfg(corrupted_run, methods=["retrain"], retrain_subset=3, seed=0)
    results = prune_and_retrain(cfg, tmp_path / "out")["results"]
    ranking = pd.read_csv(tmp_path / "out" / "selection" / "retrain.csv")
    assert len(ranking) == 3 and ranking.actual_delta_test_loss.is_monotonic_increasing
    assert _row(results, "retrain").num_removed == 3  # min(k = 7, subset of 3)
    loo_dirs = sorted(p.name for p in (tmp_path / "out" / C.RETRAIN_DIR).glob("loo-cold-*"))
    assert len(loo_dirs) == 3
    assert _row(results, "retrain").selection_seconds > 0


# ------------------------------------------------------------------ the command line


def test_cli_end_to_end(corrupted_run, tmp_path):
    from metaif_cli.score.pipeline import score

    scores = tmp_path / "scores"
    summary = score(_score_cfg(corrupted_run, method="loss", plots=False), scores)
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "metaif_cli.cli", "prune-and-retrain", f"run={corrupted_run}",
                           f"scores={scores}", "methods=[loss,oracle]", "fractions=[0.2,0.4]", "progress=false",
                           f"hydra.run.dir={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = pd.read_csv(out / C.PRUNE_RESULTS_CSV)
    assert results.method.tolist() == ["none", "loss", "loss", "oracle", "oracle"]
    loss = results[results.method == "loss"]
    assert np.allclose(loss.selection_seconds, summary["total_seconds"])
    for name in (C.ACCURACY_PNG, C.MAIN_TABLE_MD, C.MAIN_TABLE_CSV):
        assert (out / name).stat().st_size > 0
    main = pd.read_csv(out / C.MAIN_TABLE_CSV)
    assert main.fraction.tolist() == [0.0, 0.4, 0.4]
    assert "oracle" in proc.stdout and "select_s" in proc.stdout


def test_cli_refuses_scores_of_another_run(corrupted_run, tmp_path):
    fake = tmp_path / "scores"
    fake.mkdir()
    (fake / C.SCORE_JSON).write_text('{"run": "/elsewhere", "method": "if", "total_seconds": 1}')
    cfg = _prune_cfg(corrupted_run, methods=["if"], scores=str(fake))
    from metaif_cli.errors import MetaifError

    with pytest.raises(MetaifError, match="computed for run=/elsewhere"):
        prune_and_retrain(cfg, tmp_path / "out")


def test_num_to_remove_and_select_order():
    assert [num_to_remove(f, 24) for f in (0.01, 0.1, 0.3, 0.5)] == [1, 2, 7, 12]
    table = pd.DataFrame({"unit_id": ["task:2", "task:0", "task:1"], "score": [-3.0, -1.0, 2.0], "rank": [1, 2, 3],
                          "corrupted": [True, False, False]})
    ranking = Ranking("if", table, C.SCORE_COLUMN, 0.0, "test")
    assert [u.id for u in select(ranking, 0.5, 3)] == ["task:2", "task:0"]
