"""Issue 12: the Python API (:mod:`metaif_cli.api`) against the command line, on the same run.

- ``api.score`` returns exactly the CSVs ``metaif score`` writes (same columns, same text) and its iHVP;
- ``api.load_scores`` reads a CLI score directory back;
- ``api.write_run`` from a ``module.``-prefixed state dict writes the run ``metaif train`` wrote
  (same pools, same parameters);
- ``api.build_task_pools`` draws the pools of ``metaif train`` (folder) and stable pools from tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import own_helpers as H  # noqa: E402

from metaif_cli import api  # noqa: E402
from metaif_cli import constants as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"hessian": {"num_tasks": 6}, "evaluation": {"num_tasks": 4}, "dtype": "float64"}
CLI_SETTINGS = ["hessian.num_tasks=6", "evaluation.num_tasks=4", "dtype=float64", "plots=false", "progress=false"]


def _config(folder: Path) -> api.TrainConfig:
    return api.TrainConfig(
        seed=1, progress=False, data=api.DataConfig(root="./data", cache=".cache/metaif"),
        dataset=api.DatasetConfig(name="folder", path=str(folder), image_size=8, channels=1, ways=3, shots=1,
                                  queries=2, num_train_tasks=8, num_val_tasks=3, num_test_tasks=4,
                                  split_fractions=[0.34, 0.33, 0.33]),
        model=api.ModelConfig(name="mlp", hidden=8, layers=1),
        meta=api.MetaConfig(name="anil", inner_steps=2, inner_lr=0.5),
        optim=api.OptimConfig(steps=5, eval_every=5, checkpoint_every=5, num_checkpoints=1, meta_batch_size=4))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data) -> tuple[api.TrainConfig, Path]:
    from metaif_cli.train.command import run_train

    base = tmp_path_factory.mktemp("api")
    cfg = _config(H.write_digit_folder(base / "digits", classes=9, per_class=5))
    run_train(cfg, base / "run")
    return cfg, base / "run"


def test_api_and_cli_scores_are_identical(trained, tmp_path):
    _, run = trained
    cli_dir = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "metaif_cli.cli", "score", f"run={run}", *CLI_SETTINGS,
                           f"hydra.run.dir={cli_dir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = api.score(run, **SETTINGS)
    assert scores.out_dir is None
    assert list(scores.task_scores.columns) == ["task_id", C.SCORE_COLUMN, "rank", "method", "corrupted"]
    assert scores.task_scores.to_csv(index=False) == (cli_dir / C.TASK_SCORES_CSV).read_text()
    assert scores.instance_scores.to_csv(index=False) == (cli_dir / C.INSTANCE_SCORES_CSV).read_text()
    loaded = api.load_scores(cli_dir)
    assert torch.equal(loaded.ihvp, scores.ihvp) and scores.ihvp.ndim == 1
    assert loaded.summary["settings"] == scores.summary["settings"]
    with pytest.raises(api.MetaifError, match="unknown setting 'hesian'"):
        api.score(run, hesian={"num_tasks": 2})


def test_write_run_from_module_prefixed_state_dict_equals_trained_run(trained, tmp_path):
    cfg, run = trained
    lam = torch.load(run / C.MODEL_PT, weights_only=False)["lam"]
    results = api.write_run(tmp_path / "mine", {f"module.{k}": v for k, v in lam.items()}, cfg)
    assert results["test_acc"] == json.loads((run / C.RESULTS_JSON).read_text())["test_acc"]
    for name in (C.TASKS_CSV, C.SPLIT_JSON, C.TRAIN_CONFIG_JSON):
        assert (tmp_path / "mine" / name).read_text() == (run / name).read_text(), name
    mine = torch.load(tmp_path / "mine" / C.MODEL_PT, weights_only=False)["lam"]
    assert all(torch.equal(mine[k], lam[k]) for k in lam)
    with pytest.raises(api.MetaifError, match="already holds"):
        api.write_run(tmp_path / "mine", lam, cfg)
    with pytest.raises(api.MetaifError, match="missing keys: head.bias"):
        api.write_run(tmp_path / "other", {k: v for k, v in lam.items() if k != "head.bias"}, cfg)
    assert not (tmp_path / "other").exists()


def test_task_pools_from_folder_and_tensors(trained):
    cfg, run = trained
    pools = api.build_task_pools(cfg.dataset, seed=cfg.seed)
    assert pools.table.to_csv(index=False) == (run / C.TASKS_CSV).read_text()
    batch = pools.batch("train")
    assert batch.x_spt.shape == (8, 3, 1, 8, 8) and batch.y_qry.shape == (8, 6)
    images, labels = pools.dataset.images, pools.dataset.labels
    a = api.build_task_pools(images, labels, settings=cfg.dataset, seed=4)
    b = api.build_task_pools(images.clone(), labels.clone(), settings=cfg.dataset, seed=4)
    assert a.table.equals(b.table) and not a.table.equals(pools.table)
    ids = a.table.instance_id.to_numpy()
    assert (a.dataset.labels[torch.as_tensor(ids.copy())].numpy() == a.table["class"].astype(int).to_numpy()).all()


def test_example_script_runs(tmp_path, shared_data):
    """``scripts/example_own_model.py`` at CI size: own folder, own network and loop, import, score."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["--out", str(tmp_path / "ex"), "--data", str(shared_data), "--steps", "3", "--tasks", "10",
            "--per-class", "20", "--queries", "3", "--top", "3"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "example_own_model.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "most harmful training tasks" in proc.stdout
    scores = api.load_scores(tmp_path / "ex" / "scores")
    assert len(scores.task_scores) == 10 and scores.task_scores[C.SCORE_COLUMN].notna().all()
    assert (tmp_path / "ex" / "run" / C.MODEL_PT).exists()
