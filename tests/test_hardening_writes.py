"""Issue 13, kind 8: interrupted writes and resume leave no trace.

A kill is injected at each rename that publishes a file (the seam
:func:`metaif_cli.io._replace`), leaving the temporary behind as a real kill does; the
rerun must finish with every file equal to an uninterrupted run's (byte for byte where
the content is equal), no ``.tmp`` left, files with the usual mode, and ``.pt`` bytes
that do not depend on the temporary name.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest
import torch

from metaif_cli import constants as C
from metaif_cli import io as mio
from metaif_cli.train.command import run_train
from test_train import _train_cfg

RESUME = ["optim.steps=6", "optim.checkpoint_every=2", "optim.eval_every=3", "optim.num_checkpoints=2"]
# the content of these differs between any two runs (wall time); compared field by field below
TIMED = {C.RESULTS_JSON, C.CHECKPOINT_LAST, C.CHECKPOINT_PREV}


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the process's own cleanup runs."""


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _kill_at(monkeypatch, n: int) -> list[str]:
    """Make the ``n``-th rename (0-based) kill the process, leaving its temporary on disk."""
    seen: list[str] = []
    real = mio._replace

    def replace(src, dst):
        seen.append(Path(dst).name)
        if len(seen) - 1 == n:
            monkeypatch.setattr(mio, "_discard", lambda tmp: None)  # a killed process cleans nothing
            raise Killed(dst)
        real(src, dst)

    monkeypatch.setattr(mio, "_replace", replace)
    return seen


def _assert_same_tensors(x, y) -> None:
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            _assert_same_tensors(x[k], y[k])
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y)
        for i, j in zip(x, y):
            _assert_same_tensors(i, j)
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y.to(x.dtype)), (x, y)
    else:
        assert float(x) == float(y) if isinstance(x, (int, float)) else x == y


def _assert_same_run(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if Path(name).name in TIMED:
            continue
        if name.startswith(C.CHECKPOINT_DIR):  # hold optimiser state since method=trajectory: compared by value
            _assert_same_tensors(torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True))
            continue
        assert fa[name] == fb[name], f"{name} differs"
    for name in (C.CHECKPOINT_LAST, C.CHECKPOINT_PREV):
        x, y = (torch.load(d / name, weights_only=True) for d in (a, b))
        assert x["step"] == y["step"] and x["metrics"] == y["metrics"]
        for k in x["lam"]:
            assert torch.equal(x["lam"][k], y["lam"][k])
    assert mio.load_json(a / C.RESULTS_JSON)["test_acc"] == mio.load_json(b / C.RESULTS_JSON)["test_acc"]


def test_interrupted_writes_kill_at_every_rename_resumes_to_identical_files(tmp_path, monkeypatch):
    cfg = _train_cfg(*RESUME)
    straight = tmp_path / "straight"
    with monkeypatch.context() as m:
        renames = _kill_at(m, -1)
        run_train(cfg, straight)
    assert C.METRICS_CSV in renames and C.CHECKPOINT_LAST in renames
    # the case of the bug report: killed between the final checkpoint_last.pt and the final metrics.csv
    final_ckpt = max(i for i, n in enumerate(renames) if n == C.CHECKPOINT_LAST)
    assert renames[final_ckpt + 1] == C.METRICS_CSV
    for n in range(len(renames)):
        d = tmp_path / f"kill{n}"
        with monkeypatch.context() as m:
            _kill_at(m, n)
            with pytest.raises(Killed):
                run_train(cfg, d)
        if renames[n] != C.CHECKPOINT_PREV:  # the others publish a temporary; a kill leaves it
            assert list(d.rglob(".*.tmp")), "the simulated kill should leave its temporary"
        run_train(cfg, d)
        assert not list(d.rglob("*.tmp")), f"kill at rename {n} ({renames[n]}) left a temporary"
        _assert_same_run(straight, d)
    assert len(pd.read_csv(straight / C.METRICS_CSV)) == 6


def test_interrupted_writes_metrics_csv_rewritten_after_final_checkpoint(tmp_path, monkeypatch):
    cfg = _train_cfg(*RESUME)
    with monkeypatch.context() as m:
        seen = _kill_at(m, -1)
        real = mio._replace

        def replace(src, dst):  # kill at the final metrics.csv, right after the final checkpoint
            if Path(dst).name == C.METRICS_CSV and seen.count(C.CHECKPOINT_LAST) == 3:
                m.setattr(mio, "_discard", lambda tmp: None)
                raise Killed(dst)
            real(src, dst)

        m.setattr(mio, "_replace", replace)
        with pytest.raises(Killed):
            run_train(cfg, tmp_path)
    assert len(pd.read_csv(tmp_path / C.METRICS_CSV)) == 4
    run_train(cfg, tmp_path)
    assert pd.read_csv(tmp_path / C.METRICS_CSV).step.tolist() == [1, 2, 3, 4, 5, 6]


def test_interrupted_writes_pt_bytes_identical_across_runs(tmp_path):
    cfg = _train_cfg("optim.steps=2")
    run_train(cfg, tmp_path / "a")
    run_train(cfg, tmp_path / "b")
    for name in [C.MODEL_PT, *(f"{C.CHECKPOINT_DIR}/{p.name}" for p in (tmp_path / "a" / C.CHECKPOINT_DIR).iterdir())]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # the temporary's name is not stored inside: same object, different targets, same bytes
    obj = {"lam": {"w": torch.arange(3.0)}, "step": 1}
    mio.save_torch(obj, tmp_path / "x.pt")
    mio.save_torch(obj, tmp_path / "other_name.pt")
    assert (tmp_path / "x.pt").read_bytes() == (tmp_path / "other_name.pt").read_bytes()
    assert b".tmp" not in (tmp_path / "x.pt").read_bytes()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_interrupted_writes_files_get_the_usual_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        mio.save_json({"a": 1}, tmp_path / "a.json")
        mio.save_torch({"a": torch.zeros(1)}, tmp_path / "a.pt")
        mio.save_csv(pd.DataFrame({"a": [1]}), tmp_path / "a.csv")
        mio.write_text("x", tmp_path / "a.md")
    finally:
        os.umask(old)
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


def test_interrupted_writes_stale_temporaries_are_cleaned(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    leftovers = [tmp_path / f".model.pt.metaif-{dead}-abcd1234.tmp", tmp_path / f".results.json.metaif-{dead}-0a1b2c3d.tmp",
                 tmp_path / "sub" / f".metrics.csv.metaif-{dead}-00ff00ff.tmp"]
    live = tmp_path / f".tasks.csv.metaif-{os.getppid()}-deadbeef.tmp"  # a writer still running: kept
    for p in [*leftovers, live]:
        p.parent.mkdir(exist_ok=True)
        p.write_text("partial")
    mio.save_json({}, tmp_path / "model.pt")  # a write of a name removes that name's leftovers
    assert not leftovers[0].exists() and leftovers[1].exists()
    assert mio.clean_stale_temporaries(tmp_path) == 2
    assert not any(p.exists() for p in leftovers) and live.exists()


def test_interrupted_writes_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with mio.atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_writes_cleaning_spares_a_write_in_progress(tmp_path):
    with mio.atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("being written")
        assert mio.clean_stale_temporaries(tmp_path) == 0 and tmp.exists()
    assert (tmp_path / "f.txt").read_text() == "being written"
    left = tmp_path / f".g.txt.metaif-{os.getpid()}-0badc0de.tmp"  # ours, but no write in progress: a leftover
    left.write_text("x")
    assert mio.clean_stale_temporaries(tmp_path) == 1


def test_interrupted_writes_score_cleans_leftovers_of_a_killed_run(tmp_path):
    import dataclasses

    from metaif_cli.score.config import ScoreConfig
    from metaif_cli.score.pipeline import score

    run = tmp_path / "run"
    run_train(_train_cfg("optim.steps=2"), run)
    out = tmp_path / "score"
    out.mkdir()
    dead = 2**22 + 777
    left = [out / f".task_scores.csv.metaif-{dead}-0a0b0c0d.tmp", out / f".some_plot.png.metaif-{dead}-11223344.tmp"]
    for p in left:
        p.write_text("half")
    cfg = ScoreConfig(run=str(run), method="loss", plots=False, progress=False)
    score(cfg, out)
    assert not any(p.exists() for p in left) and not list(out.rglob("*.tmp"))
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".csv", ".pt")}
    score(dataclasses.replace(cfg), out)  # a rerun writes the same bytes
    assert first == {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".csv", ".pt")}
