"""Issue 21, kinds 3, 4, 7, 8 and 9: results of different settings or runs never mix, stale data is
refused, absurd sizes are refused before the work, Hydra habits, and checks made before the work.

- kind 3: an output folder is owned by one command at a time (a lock naming its holder); an
  overwrite removes every artefact of the old result; ``score.json`` carries the fingerprint of
  the run and of each table, checked by ``prune-and-retrain scores=``; a folder of another command
  (the training run itself) is refused.
- kind 4: a dataset records a content fingerprint (Omniglot's cache is keyed by the files'
  content stamps); a run records it, and training on, resuming or scoring with other images is a
  one-line refusal naming the fix.
- kind 7: task pools and retraining plans that cannot fit in memory or on disk are refused at once.
- kind 8: unknown keys added with ``+``, mistyped groups, sweeps with invalid jobs, ``data.root=``
  for a copied run, ``~`` in ``run=``.
- kind 9: a prune rerun with other ranking settings, a truncated ``tasks.csv``, are refused before
  anything is computed or replaced.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metaif_cli import constants as C
from metaif_cli.influence.config import HessianConfig
from metaif_cli.ownership import LOCK_NAME, acquire, owned_dir, release
from metaif_cli.prune.config import LdsConfig, PruneConfig
from metaif_cli.prune.pipeline import prune_and_retrain
from metaif_cli.prune.scores import read_scores_dir
from metaif_cli.score.config import RunDataConfig, ScoreConfig
from metaif_cli.score.pipeline import score
from metaif_cli.score.run import load_run
from metaif_cli.train.command import run_train
from test_train import _train_cfg
from refusal_helpers import refused, snapshot

STEPS = ["optim.steps=4", "optim.eval_every=4", "optim.checkpoint_every=2", "optim.num_checkpoints=1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("integrity") / "run"
    run_train(_train_cfg(*STEPS), run)
    return run


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def _score_cfg(run: Path | str, **kw) -> ScoreConfig:
    kw.setdefault("hessian", HessianConfig(lanczos_iters=5))
    kw.setdefault("plots", False)
    return ScoreConfig(run=str(run), progress=False, **kw)


# ------------------------------------------------------------------ kind 3: one owner, no mixed results


def test_folder_held_by_a_command_is_refused_naming_the_holder_when_not_waiting(tmp_path):
    with owned_dir(tmp_path / "a" / "out", "score"):
        text = refused(acquire, tmp_path / "a" / "out", "score", wait=False, fragment="in use by metaif score (pid")
        assert "hydra.run.dir" in text
    assert not (tmp_path / "a").exists()  # created by the lock, empty: removed again, parents too


def test_second_command_on_a_folder_waits_until_the_first_is_done(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    events: list[str] = []
    waiting = threading.Event()

    class Told(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for it to finish" in record.getMessage():
                waiting.set()

    handler = Told()
    logging.getLogger("metaif_cli.ownership").addHandler(handler)
    try:
        fd = acquire(folder, "train")

        def second() -> None:
            with owned_dir(folder, "score"):
                events.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(60), "the second command did not say it waits"
        events.append("first done")
        release(folder, fd)
        thread.join(60)
    finally:
        logging.getLogger("metaif_cli.ownership").removeHandler(handler)
    assert events == ["first done", "second"]
    assert not (folder / LOCK_NAME).exists()


def test_shards_share_a_folder_and_the_last_removes_the_lock(tmp_path):
    a = acquire(tmp_path, "score", shared=True, wait=False)
    b = acquire(tmp_path, "score", shared=True, wait=False)
    refused(acquire, tmp_path, "score", wait=False, fragment="in use")
    release(tmp_path, a)
    assert (tmp_path / LOCK_NAME).exists()
    release(tmp_path, b)
    assert not (tmp_path / LOCK_NAME).exists()


def test_overwrite_removes_every_artefact_of_the_old_result(run_copy, tmp_path):
    out = tmp_path / "scores"
    score(_score_cfg(run_copy, plots=True, grid_size=2), out)
    assert (out / C.INSTANCE_SCORES_CSV).exists() and (out / "score_distribution_instance.png").exists()
    score(_score_cfg(run_copy, unit="task", overwrite=True), out)
    left = sorted(p.name for p in out.iterdir())
    assert C.INSTANCE_SCORES_CSV not in left and C.INSTANCE_GRID_PNG not in left, left
    assert not any("instance" in name or name.endswith(".png") for name in left), left
    run = load_run(run_copy, "cpu")
    refused(read_scores_dir, out, run, "support", fragment="no instance table")


def test_prune_scores_of_another_version_of_the_run_are_refused(run_copy, tmp_path):
    out = tmp_path / "scores"
    score(_score_cfg(run_copy, unit="task", method="loss"), out)
    assert len(read_scores_dir(out, load_run(run_copy, "cpu"), "task").table) > 0
    shutil.rmtree(run_copy)
    run_train(_train_cfg(*STEPS, "seed=3"), run_copy)  # another run at the same path
    refused(read_scores_dir, out, load_run(run_copy, "cpu"), "task", fragment="another version of")


def test_prune_scores_table_not_recorded_in_score_json_is_refused(run_copy, tmp_path):
    out = tmp_path / "scores"
    score(_score_cfg(run_copy, unit="task", method="loss"), out)
    run = load_run(run_copy, "cpu")
    table = out / C.TASK_SCORES_CSV
    table.write_text(table.read_text().replace("False", "True"))  # the same shape, other content
    refused(read_scores_dir, out, run, "task", fragment="not the table score.json recorded")


def test_score_into_the_training_run_folder_is_refused_and_keeps_its_files(run_copy):
    before = snapshot(run_copy)
    refused(score, _score_cfg(run_copy), run_copy, fragment="is the training run itself")
    assert snapshot(run_copy) == before


def test_commands_refuse_a_folder_holding_another_commands_output(run_copy, tmp_path):
    out = tmp_path / "scores"
    score(_score_cfg(run_copy, unit="task", method="loss"), out)
    refused(run_train, _train_cfg(*STEPS), out, fragment="holds the output of metaif score")
    cfg = PruneConfig(run=str(run_copy), progress=False, methods=["random"], fractions=[0.2], update="edit",
                      score=_score_cfg(run_copy))
    refused(prune_and_retrain, cfg, out, fragment="holds the output of metaif score")
    refused(score, _score_cfg(tmp_path / "other-run"), run_copy.parent / "nowhere", fragment="does not exist")
    assert not (run_copy.parent / "nowhere").exists()  # a refused command leaves no folder behind


# ------------------------------------------------------------------ kind 9: checks before the work


def test_truncated_tasks_csv_is_refused_before_any_computation(run_copy, tmp_path):
    path = run_copy / C.TASKS_CSV
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])
    out = tmp_path / "scores"
    refused(score, _score_cfg(run_copy), out, fragment=str(path))
    assert not out.exists()


def test_prune_rerun_with_other_score_settings_is_refused_before_anything_is_replaced(run_copy, tmp_path):
    out = tmp_path / "prune"
    cfg = PruneConfig(run=str(run_copy), progress=False, methods=["loss"], fractions=[0.2],
                      score=_score_cfg(run_copy))
    prune_and_retrain(cfg, out)
    before = snapshot(out)
    other = dataclasses.replace(cfg, score=_score_cfg(run_copy, evaluation=dataclasses.replace(
        cfg.score.evaluation, kind="margin")))
    text = refused(prune_and_retrain, other, out, fragment="score.evaluation.kind")
    assert "other settings" in text
    assert snapshot(out) == before
    prune_and_retrain(dataclasses.replace(cfg, fractions=[0.2, 0.4]), out)  # what does not change the rankings may


# ------------------------------------------------------------------ kind 7: absurd sizes


def test_task_pool_too_large_for_memory_is_refused_before_building(tmp_path):
    text = refused(run_train, _train_cfg(*STEPS, "dataset.num_train_tasks=1000000000"), tmp_path / "r",
                    fragment="of memory")
    assert "dataset.num_train_tasks" in text
    assert not (tmp_path / "r").exists()


def test_retraining_plan_that_cannot_fit_is_refused_before_any_work(run_copy, tmp_path):
    cfg = PruneConfig(run=str(run_copy), progress=False, protocol="lds", methods=["loss"],
                      lds=LdsConfig(num_subsets=1_000_000, seeds=1000), score=_score_cfg(run_copy))
    text = refused(prune_and_retrain, cfg, tmp_path / "p", fragment="1000001000 retrainings")
    assert "lds.num_subsets" in text
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------------ kind 4: stale data


def _png(rng: np.random.Generator, size: int = 10) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size)) > 0.7).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _omniglot(root: Path, classes: int = 8, per_class: int = 20, seed: int = 0) -> Path:
    """``root/images_background/Alpha/characterCC/*.png``: random 10x10 strokes."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / "images_background" / "Alpha" / f"character{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"{c:02d}_{i:02d}.png").write_bytes(_png(rng))
    return root


def _rewrite_same_size(root: Path, count: int, seed: int = 1) -> int:
    """Rewrite ``count`` PNGs with other images of exactly the same byte size (a later modification time)."""
    import os

    rng = np.random.default_rng(seed)
    done = 0
    for path in sorted(root.rglob("*.png"))[:count]:
        old = path.read_bytes()
        for _ in range(2000):
            new = _png(rng)
            if len(new) == len(old) and new != old:
                st = path.stat()
                path.write_bytes(new)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks: a later time
                done += 1
                break
    assert done, "no same-size image found"
    return done


def _omniglot_cfg(root: Path, cache: Path, *extra: str):
    return _train_cfg(*STEPS, "dataset=omniglot", "dataset.image_size=10", "dataset.split_by=instance",
                      "dataset.split_fractions=[0.4,0.3,0.3]", "dataset.num_train_tasks=12",
                      "dataset.num_val_tasks=3", "dataset.num_test_tasks=6", f"data.root={root}",
                      f"data.cache={cache}", *extra)


def test_omniglot_images_rewritten_in_place_with_same_sizes_are_read_again(tmp_path):
    from metaif_cli.data.omniglot import load_omniglot

    root = _omniglot(tmp_path / "omni")
    first = load_omniglot(root, image_size=10, cache_dir=tmp_path / "cache")
    assert len(first.fingerprint) == 64
    assert load_omniglot(root, image_size=10, cache_dir=tmp_path / "cache").fingerprint == first.fingerprint
    _rewrite_same_size(root, 40)
    second = load_omniglot(root, image_size=10, cache_dir=tmp_path / "cache")
    assert second.fingerprint != first.fingerprint
    assert not np.array_equal(first.images.numpy(), second.images.numpy())


def test_run_on_changed_data_is_refused_when_scored_or_resumed_naming_the_fix(tmp_path):
    root, cache = _omniglot(tmp_path / "omni"), tmp_path / "cache"
    run = tmp_path / "run"
    cfg = _omniglot_cfg(root, cache)
    run_train(cfg, run)
    assert (run / C.DATA_FINGERPRINT_JSON).exists()
    load_run(run, "cpu")  # unchanged data: accepted
    _rewrite_same_size(root, 60)
    text = refused(load_run, run, "cpu", fragment="differ from those")
    assert "point data.root=" in text and C.DATA_FINGERPRINT_JSON in text
    refused(score, _score_cfg(run), tmp_path / "scores", fragment="point data.root=")
    text = refused(run_train, cfg, run, fragment="differ from those")
    assert "restore the data" in text


def test_copied_run_is_pointed_at_local_data_with_data_root(tmp_path):
    from test_train import typed_config

    root, cache = _omniglot(tmp_path / "omni"), tmp_path / "cache"
    run = tmp_path / "run"
    run_train(_omniglot_cfg(root, cache), run)
    local = tmp_path / "local-copy"
    shutil.move(root, local)
    refused(load_run, run, "cpu", fragment="data.root=")
    loaded = load_run(run, "cpu", data=RunDataConfig(root=str(local)))
    assert loaded.train_cfg.data.root == str(local)
    cfg = typed_config("score", [f"run={run}", f"data.root={local}", "unit=task", "method=loss", "progress=false",
                                 "plots=false"])
    assert cfg.data.root == str(local)
    summary = score(cfg, tmp_path / "scores")
    assert summary["n_tasks"] == 12
    pcfg = typed_config("prune_and_retrain", [f"run={run}", f"data.root={local}"])
    assert pcfg.data.root == str(local)


def test_run_given_with_a_tilde_is_expanded(run_copy, monkeypatch):
    monkeypatch.setenv("HOME", str(run_copy.parent))
    assert load_run("~/run", "cpu").run_dir == run_copy.resolve()


# ------------------------------------------------------------------ kind 8: Hydra habits


def _metaif(*args: str, cwd: Path) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "metaif_cli.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_setting_names_know_nested_and_optional_settings():
    from metaif_cli.prune.config import PruneConfig
    from metaif_cli.settings_names import closest, known_setting
    from metaif_cli.train.config import TrainConfig

    assert known_setting(TrainConfig, "optim.steps") and known_setting(TrainConfig, "dataset.path")
    assert not known_setting(TrainConfig, "optim.stepz") and not known_setting(TrainConfig, "datset")
    assert known_setting(PruneConfig, "score.hessian.damping") and known_setting(PruneConfig, "data.root")
    assert closest("optim.stepz", TrainConfig, []) == " (did you mean optim.steps=?)"
    assert closest("datset", None, ["dataset", "model"]) == " (did you mean dataset=?)"


def test_unknown_setting_added_with_plus_is_refused_and_a_group_typo_gets_did_you_mean(tmp_path):
    added = _metaif("train", "+optim.stepz=5", "debug=fast", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    typo = _metaif("train", "datset=omniglot", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    for proc, fragment in ((added, "did you mean optim.steps=?"), (typo, "did you mean dataset=?")):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[-1].startswith("metaif train: error:") and fragment in lines[-1], proc.stderr
    assert "+datset" not in typo.stderr  # no advice to append the typo
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sweep_runs_its_valid_jobs_and_exits_2_naming_the_refused_ones(tmp_path):
    proc = _metaif("train", "-m", "dataset.ways=1,3", "debug=fast", "model.hidden=8",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "dataset.ways=1 is not valid" in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "1 job(s) of the sweep refused" in last and "dataset.ways=1" in last, proc.stderr
    finished = list((tmp_path / "sweep").rglob(C.MODEL_PT))
    assert len(finished) == 1  # the valid job ran


# ------------------------------------------------------------------ the other places of each kind


def test_api_load_scores_refuses_a_table_left_by_an_earlier_scoring(run_copy, tmp_path):
    from metaif_cli.api import load_scores

    out = tmp_path / "scores"
    score(_score_cfg(run_copy, unit="task", method="loss"), out)
    assert load_scores(out).task_scores is not None
    (out / C.INSTANCE_SCORES_CSV).write_text("task_id,rank,corrupted\n0,1,False\n")
    refused(load_scores, out, fragment="not part of the result")


def test_prune_folder_of_an_earlier_version_of_the_run_is_refused(run_copy, tmp_path):
    from metaif_cli.io import save_json
    from metaif_cli.prune.preflight import check_out_dir

    out = tmp_path / "prune"
    cfg = PruneConfig(run=str(run_copy), progress=False, score=_score_cfg(run_copy))
    save_json({**dataclasses.asdict(cfg), "run_fingerprint": "0" * 64}, out / C.PRUNE_CONFIG_JSON)
    refused(check_out_dir, out, cfg, load_run(run_copy, "cpu").fingerprint, fragment="earlier version of run=")


def test_shards_of_another_version_of_the_run_are_not_merged(run_copy, tmp_path):
    from metaif_cli.score.pipeline import _merge_shards

    cfg = _score_cfg(run_copy, unit="task", method="loss")
    out = tmp_path / "scores"
    score(dataclasses.replace(cfg, shard="0/2"), out)
    score(dataclasses.replace(cfg, shard="1/2"), out)
    assert _merge_shards(out, 2, dataclasses.replace(cfg, shard="1/2"), load_run(run_copy, "cpu").fingerprint)
    refused(_merge_shards, out, 2, dataclasses.replace(cfg, shard="1/2"), "f" * 64, fragment="another version")


def test_damaged_checkpoint_is_refused_before_any_scoring(run_copy, tmp_path):
    ckpt = sorted((run_copy / C.CHECKPOINT_DIR).glob("step_*.pt"))[0]
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    out = tmp_path / "scores"
    refused(score, _score_cfg(run_copy, method="tracin", unit="task"), out, fragment=str(ckpt))
    assert not out.exists()


def test_absurd_checkpoint_count_keeps_every_step_without_counting_to_it():
    from metaif_cli.train.loop import checkpoint_steps

    assert checkpoint_steps(6, 10**12) == [1, 2, 3, 4, 5, 6]
    assert checkpoint_steps(6, 2) == [3, 6]


def test_trak_projection_too_large_for_memory_is_refused(run_copy, tmp_path):
    from metaif_cli.influence.baseline_config import TrakConfig

    cfg = _score_cfg(run_copy, method="trak", unit="task", trak=TrakConfig(proj_dim=10**12))
    refused(score, cfg, tmp_path / "scores", fragment="lower trak.proj_dim")


def test_home_in_an_override_value_is_expanded_before_hydra_reads_it(monkeypatch, tmp_path):
    from metaif_cli.cli import expand_home

    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_home("run=~/base") == f"run={tmp_path}/base"
    assert expand_home("runs=~/a,~/b") == f"runs={tmp_path}/a,{tmp_path}/b"
    assert expand_home("~optim.steps") == "~optim.steps"  # Hydra's deletion
    assert expand_home("method=if") == "method=if"
    proc = _metaif("score", "run=~/base", cwd=tmp_path)
    assert proc.returncode == 2 and f"{tmp_path}/base does not exist" in proc.stderr, proc.stderr
