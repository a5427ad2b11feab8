"""``protocol=lds``, seed-averaged retraining and the noise ceiling (issue 9; method §5).

Statistics are checked against direct computations on hand-made numbers; the protocol runs
on tiny digits runs (a few Adam steps, meta-batches of 4) through the command line and the
library; the accuracy check uses a float64, full-batch, regularised problem (slow).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from metaif_cli import constants as C
from metaif_cli.data.config import DatasetConfig
from metaif_cli.meta.config import MetaConfig
from metaif_cli.models.config import ModelConfig
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_json
from metaif_cli.prune import launch as launch_module
from metaif_cli.prune.lds import draw_subsets
from metaif_cli.prune.pipeline import prune_and_retrain
from metaif_cli.prune.seeds import SeedVariant, mean_t_interval, seed_variants
from metaif_cli.reports import lds as stats
from metaif_cli.influence.config import EvaluationConfig, HessianConfig, SolverConfig
from metaif_cli.prune.config import LdsConfig, PruneConfig
from metaif_cli.score.config import EnsembleConfig, ScoreConfig
from metaif_cli.train.command import run_train
from metaif_cli.train.config import OptimConfig, TrainConfig
from metaif_cli.train.experiment import build_experiment, config_dict

REPO = Path(__file__).resolve().parents[1]


def _dataset(n: int, **kw) -> DatasetConfig:
    kw = {"queries": 5, "num_val_tasks": 5, "num_test_tasks": 10, **kw}
    return DatasetConfig(name="digits", num_train_tasks=n, split_by="instance", split_fractions=[0.6, 0.1, 0.3], **kw)


def _tiny_cfg(**optim) -> TrainConfig:
    optim = {"steps": 12, "meta_batch_size": 4, "lr": 1e-2, "eval_every": 12, "checkpoint_every": 12,
             "num_checkpoints": 2, **optim}
    return TrainConfig(seed=0, device="cpu", progress=False, dataset=_dataset(12),
                       model=ModelConfig(hidden=8, layers=1), optim=OptimConfig(**optim))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """12 tasks, 12 Adam steps on meta-batches of 4 (so the batch order matters)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    run_train(_tiny_cfg(), run_dir)
    return run_dir


def _lds_cfg(run: Path, retrain_dir: Path, methods=("loss", "random"), **kw) -> PruneConfig:
    lds = LdsConfig(**{"num_subsets": 3, "seeds": 2, "bootstrap": 200, "retrain_dir": str(retrain_dir),
                       **kw.pop("lds", {})})
    score = kw.pop("score", ScoreConfig(run=str(run), progress=False, hessian=HessianConfig(lanczos_iters=10)))
    return PruneConfig(run=str(run), protocol="lds", methods=list(methods), progress=False, lds=lds, score=score, **kw)


def _fail(why: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"should not run: {why}")
    return fail


# ------------------------------------------------------------------ statistics on hand-made numbers


def test_lds_and_bootstrap_against_direct_computation():
    pred = np.array([0.3, -1.0, 2.5, 0.7, 1.1, -0.2, 0.9])
    target = np.array([1.0, 0.1, 3.0, 0.2, 2.0, 0.5, 0.4])
    assert stats.lds(pred, target) == pytest.approx(sps.spearmanr(pred, target).statistic)
    # ranks by hand: pred 3 1 7 4 6 2 5, target 5 1 7 2 6 4 3 -> sum of d^2 = 4+0+0+4+0+4+4 = 16
    assert stats.lds(pred, target) == pytest.approx(1 - 6 * 16 / (7 * 48))
    ties = np.array([1.0, 1.0, 2.0, 3.0])
    assert stats.spearman(ties, np.array([4.0, 3.0, 2.0, 1.0])) == pytest.approx(
        sps.spearmanr(ties, [4, 3, 2, 1]).statistic)
    assert np.isnan(stats.spearman(np.ones(4), np.arange(4.0)))
    # per test task: the mean of the column-wise correlations
    pred_t = np.stack([pred, -pred], 1)
    target_t = np.stack([target, target], 1)
    assert stats.lds(pred_t, target_t) == pytest.approx(0.0)
    # bootstrap: the same resamples drawn directly
    low, high = stats.bootstrap_ci(pred, target, num=300, seed=5)
    rng = np.random.default_rng(5)
    direct = []
    for _ in range(300):
        idx = rng.integers(0, 7, size=7)
        direct.append(stats.spearman(pred[idx], target[idx]))
    direct = np.array(direct)
    direct = direct[np.isfinite(direct)]
    assert (low, high) == pytest.approx((np.percentile(direct, 2.5), np.percentile(direct, 97.5)))
    assert low <= stats.lds(pred, target) <= high
    # paired difference: both predictions scored on the same resamples
    other = np.array([1.0, 0.0, 2.0, -1.0, 0.5, 0.2, 3.0])
    diff, d_low, d_high = stats.paired_difference_ci(pred, other, target, num=300, seed=5)
    assert diff == pytest.approx(stats.lds(pred, target) - stats.lds(other, target))
    rng = np.random.default_rng(5)
    paired = []
    for _ in range(300):
        idx = rng.integers(0, 7, size=7)
        paired.append(stats.spearman(pred[idx], target[idx]) - stats.spearman(other[idx], target[idx]))
    paired = np.array(paired)
    paired = paired[np.isfinite(paired)]
    assert (d_low, d_high) == pytest.approx((np.percentile(paired, 2.5), np.percentile(paired, 97.5)))
    assert stats.paired_difference_ci(pred, pred, target, num=50)[1:] == (0.0, 0.0)
    assert stats.null_band(50) == pytest.approx(1.96 / 7)
    assert stats.ratio(0.4, 0.8) == pytest.approx(0.5) and np.isnan(stats.ratio(0.4, 0.0))


def test_noise_ceiling_is_spearman_brown_corrected_split_half():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=20)
    targets = signal[:, None] + 0.7 * rng.normal(size=(20, 4))  # [M, R]
    # R = 2: the two seeds are the halves, k = 2
    r2 = sps.spearmanr(targets[:, 0], targets[:, 1]).statistic
    assert stats.noise_ceiling(targets[:, :2]) == pytest.approx(2 * r2 / (1 + r2))
    # R = 3: halves of one seed, every pair, stepped up by k = 3
    r3 = np.mean([sps.spearmanr(targets[:, a], targets[:, b]).statistic for a, b in itertools.combinations(range(3), 2)])
    assert stats.noise_ceiling(targets[:, :3]) == pytest.approx(3 * r3 / (1 + 2 * r3))
    # R = 4: the three ways of splitting four seeds into two pairs, k = 2
    splits = [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))]
    r4 = np.mean([sps.spearmanr(targets[:, list(a)].mean(1), targets[:, list(b)].mean(1)).statistic
                  for a, b in splits])
    assert stats.noise_ceiling(targets) == pytest.approx(2 * r4 / (1 + r4))
    assert sorted(stats.half_splits(4)) == sorted(splits)
    assert np.isnan(stats.noise_ceiling(targets[:, :1]))
    assert stats.noise_ceiling(np.stack([signal, -signal], 1)) == 0.0  # anti-correlated halves: pure noise
    assert stats.noise_ceiling(np.stack([signal, 2 * signal], 1)) == pytest.approx(1.0)


def test_mean_t_interval_over_seeds():
    mean, half, sd = mean_t_interval([0.5, 0.6, 0.7])
    assert (mean, sd) == pytest.approx((0.6, 0.1))
    assert half == pytest.approx(sps.t.ppf(0.975, 2) * 0.1 / np.sqrt(3))
    assert np.isnan(mean_t_interval([0.5])[1])


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("kw, match", [({"fraction": 1.0}, "lds.fraction"), ({"fraction": 0.0}, "lds.fraction"),
                                       ({"fraction": float("nan")}, "lds.fraction"), ({"seeds": 0}, "lds.seeds"),
                                       ({"num_subsets": 2}, "lds.num_subsets"), ({"vary": "data"}, "lds.vary")])
def test_bad_lds_values_are_refused(kw, match):
    with pytest.raises(MetaifError, match=match):
        LdsConfig(**kw)
    with pytest.raises(MetaifError, match="retrain_seeds"):
        PruneConfig(run="x", retrain_seeds=0)


def test_cli_refuses_a_bad_lds_value_in_one_line(tiny_run):
    proc = subprocess.run([sys.executable, "-m", "metaif_cli.cli", "prune-and-retrain", f"run={tiny_run}",
                           "protocol=lds", "lds.fraction=1.5"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "lds.fraction=1.5" in lines[0], proc.stderr


@pytest.mark.parametrize("overrides, fragment", [
    (["lds.fraction=0.01"], "keeps 0 of the 12 units"),
    (["methods=[oracle]"], "needs at least one of the methods"),
    (["methods=[if]", "score.ensemble.checkpoints=7"], "ensemble.checkpoints=7 needs 6 checkpoints"),
    (["methods=[tracin]", "score.ensemble.checkpoints=2"], "already follows the training run"),
    (["retrain_seeds=2"], "use lds.seeds=2"),
])
def test_cli_refuses_bad_lds_settings_before_any_retraining_or_write(tiny_run, tmp_path, overrides, fragment):
    """Settings that can only be checked against the run are refused before a retraining or a write."""
    out, retrains = tmp_path / "out", tmp_path / "retrains"
    proc = subprocess.run([sys.executable, "-m", "metaif_cli.cli", "prune-and-retrain", f"run={tiny_run}",
                           "protocol=lds", "lds.num_subsets=3", "lds.seeds=2", f"lds.retrain_dir={retrains}",
                           *overrides, f"hydra.run.dir={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not out.exists() and not retrains.exists()


def test_subsets_and_seeds_are_deterministic_given_seed():
    a, b, c = (draw_subsets(20, 6, 0.75, s) for s in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(len(x) == 5 and len(set(x.tolist())) == 5 for x in a)  # 15 of 20 kept
    with pytest.raises(MetaifError, match="keeps"):
        draw_subsets(3, 4, 0.1, 0)
    cfg = _tiny_cfg()
    v = seed_variants(cfg, 4, seed=1)
    assert v == seed_variants(cfg, 4, seed=1) and v != seed_variants(cfg, 4, seed=2)
    assert v[0] == SeedVariant(0) and v[0].apply({"x": 1}) == {"x": 1}
    assert all(x.init_seed is None for x in v) and len({x.batch_seed for x in v[1:]} | {cfg.seed}) == 4
    both = seed_variants(cfg, 3, seed=1, vary="both")
    assert all(x.batch_seed is not None and x.init_seed is not None for x in both[1:])
    assert all(x.batch_seed is None and x.init_seed is not None for x in seed_variants(cfg, 3, 1, "init")[1:])


def test_batch_seed_and_init_seed(tiny_run, tmp_path):
    """Null defaults keep runs byte-identical; each seed changes its own part only."""
    saved = load_json(tiny_run / C.TRAIN_CONFIG_JSON)
    assert "batch_seed" not in saved["optim"] and "init_seed" not in saved["model"]
    assert "batch_seed" not in load_json(tiny_run / C.RESULTS_JSON)
    lam = torch.load(tiny_run / C.MODEL_PT, weights_only=False)["lam"]

    def trained(cfg: TrainConfig, name: str) -> dict:
        run_train(cfg, tmp_path / name)
        return torch.load(tmp_path / name / C.MODEL_PT, weights_only=False)["lam"]

    same = _tiny_cfg(batch_seed=0)
    same.model.init_seed = 0
    assert all(torch.equal(lam[k], v) for k, v in trained(same, "explicit").items())
    other_batch = trained(_tiny_cfg(batch_seed=7), "batch7")
    assert not torch.equal(lam["head.weight"], other_batch["head.weight"])
    base, init7 = _tiny_cfg(), _tiny_cfg()
    init7.model.init_seed = 7
    p0, p7 = build_experiment(base).initial_params(), build_experiment(init7).initial_params()
    assert not torch.equal(p0["head.weight"], p7["head.weight"])
    assert config_dict(init7)["model"]["init_seed"] == 7 and "batch_seed" not in config_dict(init7)["optim"]
    assert build_experiment(init7).pools["train"].spt_idx.equal(build_experiment(base).pools["train"].spt_idx)


# ------------------------------------------------------------------ the protocol on a tiny run


@pytest.fixture(scope="module")
def lds_cli(tiny_run, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """``metaif prune-and-retrain protocol=lds`` through the command line: 3 subsets x 2 seeds."""
    root = tmp_path_factory.mktemp("lds")
    out, shared = root / "cli", root / "retrains"
    proc = subprocess.run([sys.executable, "-m", "metaif_cli.cli", "prune-and-retrain", f"run={tiny_run}",
                           "protocol=lds", "lds.num_subsets=3", "lds.seeds=2", "lds.bootstrap=200",
                           f"lds.retrain_dir={shared}", "methods=[loss,random,oracle]", "progress=false",
                           f"hydra.run.dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, shared, proc


def test_lds_outputs(lds_cli, tiny_run):
    out, shared, proc = lds_cli
    results = pd.read_csv(out / C.LDS_RESULTS_CSV)
    assert list(results.columns) == ["method", "unit", "lds", "lds_ci_low", "lds_ci_high", "ceiling",
                                     "lds_over_ceiling", "num_subsets", "seeds", "fraction", "scoring_seconds"]
    assert results.method.tolist() == ["loss", "random"]  # oracle predicts no loss change: skipped
    assert (results.num_subsets == 3).all() and (results.seeds == 2).all() and (results.fraction == 0.5).all()
    subsets = pd.read_csv(out / C.LDS_SUBSETS_CSV)
    assert list(subsets.columns) == ["subset", "seed", "num_removed", "target", "pred_loss", "pred_random"]
    assert len(subsets) == 6 and (subsets.num_removed == 6).all()
    summary = load_json(out / C.LDS_SUMMARY_JSON)
    mean_target = subsets.groupby("subset").target.mean().to_numpy()
    pred = subsets.groupby("subset").pred_loss.first().to_numpy()
    assert results.lds[0] == pytest.approx(stats.spearman(pred, mean_target))
    assert summary["ceiling"] == pytest.approx(stats.noise_ceiling(subsets.pivot(index="subset", columns="seed",
                                                                                 values="target").to_numpy()))
    assert len(summary["f_full_seeds"]) == 2 and summary["sd_f_full_over_seeds"] > 0  # meta-batches: noise
    assert summary["seed_variants"][0] == {"index": 0, "batch_seed": None, "init_seed": None}
    assert "orientation" in summary and summary["score_columns"]["loss"] == "neg_loss_after_adaptation"
    # the target of retraining 0 with nothing removed would be the run: retrainings keep its pool and start
    assert (out / C.LDS_SCATTER_PNG).stat().st_size > 0
    dirs = sorted(p.name for p in next(shared.iterdir()).iterdir())
    assert len(dirs) == 3 * 2 + 1 and sum(d.startswith("full-") for d in dirs) == 1
    assert "ceiling" in proc.stdout and "lds" in proc.stdout


def test_rerun_with_other_methods_shares_the_retrainings(lds_cli, tiny_run, tmp_path, monkeypatch):
    out, shared, _ = lds_cli
    monkeypatch.setattr(launch_module, "run_job", _fail("every retraining is finished"))
    monkeypatch.setattr(launch_module, "train", _fail("every retraining is finished"))
    first = pd.read_csv(out / C.LDS_SUBSETS_CSV)
    again = prune_and_retrain(_lds_cfg(tiny_run, shared, methods=["grad_sim", "loss"]), tmp_path / "again")
    subsets = pd.read_csv(tmp_path / "again" / C.LDS_SUBSETS_CSV)
    np.testing.assert_array_equal(subsets.target, first.target)
    np.testing.assert_allclose(subsets.pred_loss, first.pred_loss)
    assert again["results"].method.tolist() == ["grad_sim", "loss"]
    # per test task: f per meta-test task from the same retrainings, grad_sim's own column per test task
    per_task = _lds_cfg(tiny_run, shared, methods=["grad_sim", "random"],
                        score=ScoreConfig(run=str(tiny_run), progress=False, evaluation=EvaluationConfig("per_task")))
    table = prune_and_retrain(per_task, tmp_path / "per_task")["results"]
    assert {"lds_per_task", "ceiling_per_task"} <= set(table.columns) and np.isfinite(table.lds_per_task).all()
    assert (tmp_path / "per_task" / C.SELECTION_DIR / "grad_sim-by_test.csv").exists()


def test_parallel_equals_sequential(lds_cli, tiny_run, tmp_path):
    out, _, _ = lds_cli
    cfg = _lds_cfg(tiny_run, tmp_path / "retrains", launcher="joblib", n_jobs=2)
    prune_and_retrain(cfg, tmp_path / "joblib")
    a, b = pd.read_csv(out / C.LDS_SUBSETS_CSV), pd.read_csv(tmp_path / "joblib" / C.LDS_SUBSETS_CSV)
    pd.testing.assert_frame_equal(a, b, check_exact=True)


# ------------------------------------------------------------------ retrain_seeds for remove and loo


def test_remove_over_seeds(tiny_run, tmp_path):
    cfg = PruneConfig(run=str(tiny_run), methods=["random"], fractions=[0.25], retrain_seeds=2, progress=False)
    results = prune_and_retrain(cfg, tmp_path / "remove")["results"]
    assert results.method.tolist() == ["none", "random"] and (results.retrain_seeds == 2).all()
    runs = [load_json(tiny_run / C.RESULTS_JSON)] + [
        load_json(p / C.RESULTS_JSON) for p in sorted((tmp_path / "remove" / C.RETRAIN_DIR).glob("none-b*"))]
    mean, half, sd = mean_t_interval([r["test_acc"] for r in runs])
    none = results.iloc[0]
    assert (none.test_acc, none.test_acc_ci95, none.test_acc_sd_seeds) == pytest.approx((mean, half, sd))
    names = sorted(p.name for p in (tmp_path / "remove" / C.RETRAIN_DIR).iterdir())
    assert len(names) == 3 and "random-0.25" in names  # seed 0 keeps today's directory
    table = pd.read_csv(tmp_path / "remove" / C.PRUNE_RESULTS_CSV)
    assert list(table.columns[-2:]) == ["retrain_seeds", "test_acc_sd_seeds"]
    summary = load_json(tmp_path / "remove" / C.PRUNE_SUMMARY_JSON)
    assert summary["unpruned_test_acc_sd_seeds"] == pytest.approx(sd)


def test_cold_leave_one_out_over_seeds(tiny_run, tmp_path):
    score = ScoreConfig(run=str(tiny_run), progress=False, hessian=HessianConfig(lanczos_iters=10))
    cfg = PruneConfig(run=str(tiny_run), protocol="loo", num_units=2, loo_modes=["cold"], retrain_seeds=2,
                      progress=False, score=score)
    table = prune_and_retrain(cfg, tmp_path / "loo")["results"]
    assert len(table) == 2 and np.isfinite(table.actual_delta_test_loss).all()
    root = tmp_path / "loo" / C.RETRAIN_DIR
    assert len(list(root.glob("loo-cold-baseline-b*"))) == 1 and len(list(root.glob("loo-cold-task-*"))) == 4
    assert load_json(tmp_path / "loo" / C.LOO_SUMMARY_JSON)["retrain_seeds"] == 2


# ------------------------------------------------------------------ accuracy where first order is accurate


@pytest.mark.slow
def test_if_reaches_high_lds_where_first_order_is_accurate(tmp_path):
    """float64, full-batch gradient descent, delta_reg=0.1; subsets keep 90% of 20 tasks.

    Measured: if 0.95, grad_sim 0.86, random 0.04 (null band +-0.51 with 16 subsets).
    """
    cfg = TrainConfig(seed=0, device="cpu", dtype="float64", progress=False, dataset=_dataset(20, num_test_tasks=20),
                      model=ModelConfig(hidden=16, layers=1), meta=MetaConfig(inner_steps=1),
                      optim=OptimConfig(steps=200, meta_batch_size=20, optimizer="sgd", lr=0.5, delta_reg=0.1,
                                        eval_every=200, checkpoint_every=200, num_checkpoints=1))
    run_train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    # the exact total Hessian at the final point: the first-order prediction this problem makes accurate
    score = ScoreConfig(run=str(run), progress=False, dtype="float64", solver=SolverConfig(tol=1e-8, max_iter=300),
                        hessian=HessianConfig(form="exact"), ensemble=EnsembleConfig(checkpoints=1))
    out = prune_and_retrain(_lds_cfg(run, tmp_path / "retrains", methods=["if", "random"], score=score,
                                     lds={"num_subsets": 16, "seeds": 1, "fraction": 0.9}), tmp_path / "lds")
    lds = out["results"].set_index("method").lds
    assert lds["if"] >= 0.9, out["results"]
    assert abs(lds["random"]) <= out["null_band"], out["results"]


@pytest.mark.slow
def test_bench_fidelity_smoke(tmp_path):
    """``scripts/bench_fidelity.py --quick``: a tiny digits run, every method and Hessian form, through the CLI."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_fidelity.py"), "--quick", "--out",
                           str(tmp_path), "--launcher", "sequential", "--n-jobs", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "fidelity.csv")
    assert table.method.tolist() == ["random", "loss", "grad_sim", "tracin", "direct_if", "if", "trajectory"] + ["if"] * 6
    assert table.hessian_form.fillna("").tolist()[-6:] == ["no_third_order", "gamma", "gauss_newton", "exact",
                                                            "gauss_newton", "gauss_newton"]
    assert table.ensemble_checkpoints.tolist()[-3:] == [5, 5, 5] and (table.ensemble_checkpoints[:-3] == 1).all()
    assert table.damping.tolist()[-2:] == [0.01, 0.1]
    default = table.iloc[-1]  # the default's own paired difference is exactly 0
    assert (default.diff_vs_default, default.diff_ci_low, default.diff_ci_high) == (0, 0, 0)
    assert table.diff_vs_default.notna().all()
    assert (table.unit == "task").all() and table.lds.between(-1, 1).all()
    assert "| digits | task | if (gamma) |" in proc.stdout
    assert "| digits | task | if (gauss_newton, 5 checkpoints, damping 0.1) |" in proc.stdout
