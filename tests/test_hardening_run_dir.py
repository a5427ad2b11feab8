"""Issue 13, kind 9: a damaged run directory.

Every artefact one command reads from another's directory (weights, checkpoints, JSON,
CSV) gives one line naming the file and what to do; an interrupted training whose last
checkpoint is damaged resumes from the previous good one or says it cannot; a finished
run with a damaged ``model.pt`` is completed again; a truncated ``task_scores.csv``
passed as ``scores=`` is detected.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from metaif_cli import constants as C
from metaif_cli import io as mio
from metaif_cli.train.command import run_train
from metaif_cli.errors import MetaifError
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.prune import launch as prune_launch
from metaif_cli.prune import scores as prune_scores
from metaif_cli.score.outputs import score_column
from metaif_cli.score.run import load_run, read_tasks_csv, tracin_checkpoints
from test_train import _train_cfg
from run_fixtures import STEPS

REPO = Path(__file__).resolve().parents[1]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _one_line(exc: pytest.ExceptionInfo, path: Path, *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and str(path) in text, text
    for needle in needles:
        assert needle in text, text


# ---------------------------------------------------------------- the reported case


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_damaged_run_directory_truncated_model_pt_refused_by_score(run_copy, keep):
    truncate(run_copy / C.MODEL_PT, keep)
    with pytest.raises(MetaifError) as exc:
        load_run(run_copy, "cpu")
    _one_line(exc, run_copy / C.MODEL_PT, "corrupt or unreadable", "rerun the metaif train command")


def test_damaged_run_directory_score_cli_one_line_exit_2(run_copy, tmp_path):
    truncate(run_copy / C.MODEL_PT, 0.0)
    out = tmp_path / "score"
    res = subprocess.run([sys.executable, "-m", "metaif_cli.cli", "score", f"run={run_copy}", "progress=false",
                          "plots=false", f"hydra.run.dir={out}"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert "Traceback" not in res.stderr
    assert lines[-1].startswith("metaif score: error: corrupt or unreadable:") and str(run_copy / C.MODEL_PT) in lines[-1]
    assert not (out / C.TASK_SCORES_CSV).exists() and not (out / C.SCORE_JSON).exists()


# ---------------------------------------------------------------- the other artefacts scoring reads


def test_damaged_run_directory_results_json(run_copy):
    (run_copy / C.RESULTS_JSON).write_text('{"test_acc": 0.5,')
    with pytest.raises(MetaifError) as exc:
        load_run(run_copy, "cpu")
    _one_line(exc, run_copy / C.RESULTS_JSON, "corrupt or unreadable")


def test_damaged_run_directory_model_pt_not_a_checkpoint(run_copy):
    torch.save({"something": torch.zeros(1)}, run_copy / C.MODEL_PT)
    with pytest.raises(MetaifError) as exc:
        load_run(run_copy, "cpu")
    _one_line(exc, run_copy / C.MODEL_PT, "lacks")


def test_damaged_run_directory_tasks_csv_truncated(run_copy):
    run = load_run(run_copy, "cpu")
    truncate(run_copy / C.TASKS_CSV, 0.7)
    with pytest.raises(MetaifError) as exc:
        read_tasks_csv(run)
    _one_line(exc, run_copy / C.TASKS_CSV, "corrupt or unreadable")
    # cut exactly at a line end: parses, but rows are missing
    lines = (run_copy / C.TASKS_CSV).read_text().splitlines(keepends=True)
    (run_copy / C.TASKS_CSV).write_text("".join(lines[:-1]))
    with pytest.raises(MetaifError, match="rows"):
        read_tasks_csv(run)


def test_damaged_run_directory_tracin_checkpoint(run_copy):
    run = load_run(run_copy, "cpu")
    ckpt = sorted((run_copy / C.CHECKPOINT_DIR).glob("step_*.pt"))[0]
    truncate(ckpt, 0.3)
    with pytest.raises(MetaifError) as exc:
        tracin_checkpoints(run)
    _one_line(exc, ckpt, "corrupt or unreadable")


def test_damaged_run_directory_pickle_that_runs_code_is_refused(run_copy):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(run_copy / C.MODEL_PT, "wb") as f:
        pickle.dump({"lam": Evil()}, f)
    with pytest.raises(MetaifError, match="corrupt or unreadable"):
        load_run(run_copy, "cpu")


# ---------------------------------------------------------------- training: resume past damage


def test_damaged_run_directory_finished_run_with_damaged_model_is_completed_again(run_copy, monkeypatch):
    good = (run_copy / C.MODEL_PT).read_bytes()
    truncate(run_copy / C.MODEL_PT, 0.5)

    def fail(*args, **kwargs):
        raise AssertionError("completing from the final checkpoint needs no training step")

    monkeypatch.setattr(MetaLearner, "meta_gradient", fail)
    run_train(_train_cfg(*STEPS), run_copy)
    assert (run_copy / C.MODEL_PT).read_bytes() == good


def test_damaged_run_directory_finished_run_with_truncated_metrics_is_completed_again(run_copy):
    good = (run_copy / C.METRICS_CSV).read_bytes()
    lines = good.decode().splitlines(keepends=True)
    (run_copy / C.METRICS_CSV).write_text("".join(lines[:3]))
    run_train(_train_cfg(*STEPS), run_copy)
    assert (run_copy / C.METRICS_CSV).read_bytes() == good


def _interrupted(tmp_path: Path, monkeypatch, at_step: int) -> Path:
    run = tmp_path / "interrupted"
    calls = {"n": 0}
    real = MetaLearner.meta_gradient

    def meta_gradient(learner, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return real(learner, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(MetaLearner, "meta_gradient", meta_gradient)
        with pytest.raises(KeyboardInterrupt):
            run_train(_train_cfg(*STEPS), run)
    return run


def test_damaged_run_directory_damaged_last_checkpoint_resumes_from_previous(finished, tmp_path, monkeypatch):
    run = _interrupted(tmp_path, monkeypatch, at_step=6)  # checkpoints at steps 2 and 4 written
    assert torch.load(run / C.CHECKPOINT_PREV, weights_only=True)["step"] == 2
    truncate(run / C.CHECKPOINT_LAST, 0.4)
    run_train(_train_cfg(*STEPS), run)
    for name in (C.MODEL_PT, C.METRICS_CSV):
        assert (run / name).read_bytes() == (finished / name).read_bytes(), name


def test_damaged_run_directory_every_checkpoint_damaged_says_it_cannot(tmp_path, monkeypatch):
    run = _interrupted(tmp_path, monkeypatch, at_step=6)
    truncate(run / C.CHECKPOINT_LAST, 0.4)
    (run / C.CHECKPOINT_PREV).write_bytes(b"")
    with pytest.raises(MetaifError) as exc:
        run_train(_train_cfg(*STEPS), run)
    _one_line(exc, run / C.CHECKPOINT_LAST, "cannot resume", "delete")


def test_damaged_run_directory_damaged_retraining_is_retrained_not_trusted(run_copy):
    job = prune_launch.RetrainJob(run_dir=str(run_copy), config=json.loads((run_copy / C.TRAIN_CONFIG_JSON)
                                                                          .read_text()),
                                  weights={k: v for k, v in torch.load(run_copy / C.MODEL_PT,
                                                                       weights_only=True)["weights"].items()})
    assert prune_launch.finished_results(job) is not None
    truncate(run_copy / C.MODEL_PT, 0.5)
    assert prune_launch.finished_results(job) is None


# ---------------------------------------------------------------- scores= of prune-and-retrain


def _scores_dir(tmp_path: Path, run, method: str = "loss") -> Path:
    d = tmp_path / "scores"
    d.mkdir()
    n = len(run.exp.pools["train"])
    col = score_column(method)
    frame = pd.DataFrame({"task_id": range(n), col: [float(-i) for i in range(n)], "rank": range(1, n + 1),
                          "method": method, "corrupted": False})
    mio.save_csv(frame, d / C.TASK_SCORES_CSV)
    mio.save_json({"run": str(run.run_dir), "method": method, "total_seconds": 1.0, "settings": {}},
                  d / C.SCORE_JSON)
    return d


@pytest.mark.parametrize("damage", ["mid_line", "line_end", "garbage", "no_column"])
def test_damaged_run_directory_truncated_task_scores_detected(run_copy, tmp_path, damage):
    run = load_run(run_copy, "cpu")
    d = _scores_dir(tmp_path, run)
    assert len(prune_scores.read_scores_dir(d, run, "task").table) == len(run.exp.pools["train"])
    path = d / C.TASK_SCORES_CSV
    text = path.read_text()
    if damage == "mid_line":
        path.write_text(text[: len(text) - 7])
    elif damage == "line_end":
        path.write_text("".join(text.splitlines(keepends=True)[:-3]))
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff\xfe" * 50)
    else:
        path.write_text(text.replace("rank", "rnk"))
    with pytest.raises(MetaifError) as exc:
        prune_scores.read_scores_dir(d, run, "task")
    _one_line(exc, path, "corrupt or unreadable", "rerun the metaif score command")


def test_damaged_run_directory_score_json(run_copy, tmp_path):
    run = load_run(run_copy, "cpu")
    d = _scores_dir(tmp_path, run)
    truncate(d / C.SCORE_JSON, 0.5)
    with pytest.raises(MetaifError) as exc:
        prune_scores.read_scores_dir(d, run, "task")
    _one_line(exc, d / C.SCORE_JSON, "corrupt or unreadable")


def test_damaged_run_directory_selection_cache_is_recomputed(tmp_path):
    folder = tmp_path / C.SELECTION_DIR
    folder.mkdir()
    mio.save_json({"method": "loss", "column": "s", "seconds": 1.0, "source": "x", "settings": None},
                  folder / "loss.json")
    (folder / "loss.csv").write_text("unit_id,s,rank,corrupted\ntask:0,1.0,1,Fa")
    assert prune_scores.load_ranking(tmp_path, "loss", None) is None


def test_damaged_run_directory_shard_file(tmp_path):
    from metaif_cli.score.config import ScoreConfig
    from metaif_cli.score.pipeline import _merge_shards

    (tmp_path / C.SHARD_DIR).mkdir()
    for j in range(2):
        (tmp_path / C.SHARD_DIR / f"shard_{j}_of_2.pt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(MetaifError) as exc:
        _merge_shards(tmp_path, 2, ScoreConfig(run="x"))
    _one_line(exc, tmp_path / C.SHARD_DIR / "shard_0_of_2.pt", "rerun that shard")


def test_damaged_run_directory_score_settings_json(tmp_path):
    from metaif_cli.score.config import ScoreConfig
    from metaif_cli.score.pipeline import check_settings

    (tmp_path / C.SCORE_SETTINGS_JSON).write_text('{"method": "if", ')
    with pytest.raises(MetaifError) as exc:
        check_settings(tmp_path, ScoreConfig(run="x"))
    _one_line(exc, tmp_path / C.SCORE_SETTINGS_JSON, "corrupt or unreadable", "overwrite=true")
