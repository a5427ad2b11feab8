"""``metaif score`` end to end on a tiny real-data run: outputs, shards, torchrun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
METAIF = [sys.executable, "-m", "metaif_cli.cli"]
TINY = ["dataset.num_train_tasks=12", "dataset.num_val_tasks=4", "dataset.num_test_tasks=6", "optim.steps=20",
        "optim.eval_every=10", "optim.checkpoint_every=10", "optim.num_checkpoints=2", "optim.meta_batch_size=4",
        "model.hidden=8", "meta.inner_steps=2", "corruption.task_fraction=0.25", "progress=false"]


def metaif(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*METAIF, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("train") / "run"
    res = metaif("train", *TINY, f"hydra.run.dir={run}")
    assert res.returncode == 0, res.stderr
    return run


def score(run: Path, out: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    return metaif("score", f"run={run}", "progress=false", "dtype=float64", f"hydra.run.dir={out}", *extra, env=env)


def test_score_outputs_and_sign_columns(train_run, tmp_path):
    res = score(train_run, tmp_path / "s", "pred_delta_lam=[task:0,query:1:2]")
    assert res.returncode == 0, res.stderr
    tasks = pd.read_csv(tmp_path / "s" / "task_scores.csv")
    assert list(tasks.columns) == ["task_id", "pred_delta_test_loss", "pred_delta_test_loss_se", "rank", "method",
                                   "corrupted"]
    assert sorted(tasks.task_id) == list(range(12))
    assert (tasks.sort_values("rank").pred_delta_test_loss.diff().dropna() >= 0).all()
    inst = pd.read_csv(tmp_path / "s" / "instance_scores.csv")
    assert set(inst.role) == {"support", "query"}
    assert {"instance_id", "task_id", "role", "class", "label", "pred_delta_test_loss", "rank", "method",
            "corrupted"} <= set(inst.columns)
    summary = json.loads((tmp_path / "s" / "score.json").read_text())
    # the default: Gauss-Newton at the final point and the checkpoint this run kept before it, each solved
    assert summary["settings"]["hessian"]["form"] == "gauss_newton"
    members = summary["ensemble"]["members"]
    assert [m["member"].split("@")[1] for m in members] == ["final", "step_10"]
    assert all(m["relative_residual"] <= 1e-4 for m in members)
    assert {"eval_grad", "solve", "score_units"} <= set(summary["seconds"])
    assert summary["total_seconds"] > 0
    assert "task" in summary["detection"] and 0 <= summary["detection"]["task"]["roc_auc"] <= 1
    assert not (tmp_path / "s" / "ihvp.pt").exists()  # one s per member: nothing to reuse
    for name in ("pred_delta_lam.pt", "score_distribution_task.png", "detection_curve_task.png",
                 "instances_harmful_helpful.png"):
        assert (tmp_path / "s" / name).stat().st_size > 0
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_rescoring_with_other_settings_is_refused(train_run, tmp_path):
    assert score(train_run, tmp_path / "s", "unit=task", "plots=false").returncode == 0
    res = score(train_run, tmp_path / "s", "unit=task", "plots=false", "hessian.damping=0.5")
    assert res.returncode == 2 and "overwrite=true" in res.stderr
    assert score(train_run, tmp_path / "s", "unit=task", "plots=false", "hessian.damping=0.5",
                 "overwrite=true").returncode == 0


def test_shards_merge_to_single_process_result(train_run, tmp_path):
    assert score(train_run, tmp_path / "one", "plots=false").returncode == 0
    for i in range(3):
        res = score(train_run, tmp_path / "sharded", f"shard={i}/3", "plots=false")
        assert res.returncode == 0, res.stderr
    for name in ("task_scores.csv", "instance_scores.csv"):
        a = pd.read_csv(tmp_path / "one" / name)
        b = pd.read_csv(tmp_path / "sharded" / name)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-14)


def test_torchrun_two_processes_equal_single_process(train_run, tmp_path):
    assert score(train_run, tmp_path / "one", "plots=false", "unit=task").returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          "-m", "metaif_cli.cli", "score", f"run={train_run}", "progress=false", "dtype=float64",
                          "plots=false", "unit=task", f"hydra.run.dir={tmp_path / 'two'}"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a = pd.read_csv(tmp_path / "one" / "task_scores.csv")
    b = pd.read_csv(tmp_path / "two" / "task_scores.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("method", ["random", "loss", "direct_if", "grad_sim", "tracin", "trajectory"])
def test_baselines_run(train_run, tmp_path, method):
    res = score(train_run, tmp_path / method, f"method={method}", "plots=false")
    assert res.returncode == 0, res.stderr
    tasks = pd.read_csv(tmp_path / method / "task_scores.csv")
    assert len(tasks) == 12 and (tasks.method == method).all()


@pytest.mark.parametrize("args,needle", [
    (["run=/nonexistent/run"], "does not exist"),
    (["unit=tasks"], "unit='tasks' is not valid"),
    (["method=influence"], "method='influence' is not valid"),
    (["solver.max_iter=1", "hessian.auto_damping=false", "hessian.damping=0"], "did not converge"),
    (["derivative=implicit"], "derivative=implicit does not apply"),
])
def test_bad_input_one_line_error(train_run, tmp_path, args, needle):
    args = [a if not a.startswith("run=") else a for a in args]
    full = ([] if any(a.startswith("run=") for a in args) else [f"run={train_run}"]) + args
    res = metaif("score", *full, "progress=false", "plots=false", f"hydra.run.dir={tmp_path / 'bad'}")
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("metaif score: error:") and needle in lines[-1], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "bad" / "task_scores.csv").exists()
