"""Issue 13, kind 16: progress bars and logs.

Bars only on a terminal (``disable=None``), so a log captured from a pipe or a file holds
no carriage return; log lines go through ``tqdm.write``; a solver bar that stops early
ends at 100%; the unit pass has a bar; ``metaif score`` prints no deprecation warning
from our own code path.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaif_cli import progress
from metaif_cli.influence import krylov, solvers

REPO = Path(__file__).resolve().parents[1]
METAIF = [sys.executable, "-m", "metaif_cli.cli"]


class Recorder:
    """Stands in for tqdm: always drawn (to a buffer), remembers every bar it made."""

    made: list = []

    def __new__(cls, *args, **kwargs):
        from tqdm import tqdm

        kwargs.update(disable=False, file=io.StringIO())
        bar = tqdm(*args, **kwargs)
        cls.made.append(bar)
        return bar


@pytest.fixture
def recorder(monkeypatch):
    Recorder.made = []
    monkeypatch.setattr(progress, "tqdm", Recorder)
    monkeypatch.setattr(progress, "_on_terminal", lambda kwargs: True)  # a terminal's bar, drawn to a buffer
    return Recorder.made


def _spd(n: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(1, 3, n, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("solver", ["lanczos-cg", "cg"])
def test_progress_and_logs_solver_bar_ends_at_100_percent(recorder, solver):
    a = _spd()
    b = torch.ones(30, dtype=torch.float64)
    if solver == "cg":
        res = solvers.solve_cg(lambda v: a @ v, b, 0.0, max_iter=100, tol=1e-6, progress=True)
    else:
        res = krylov.solve_auto_damped(lambda v: a @ v, b, 0.0, 2.0, 5, 100, 1e-6, progress=True).result
    assert res.converged and res.iterations < 30  # stopped early
    (bar,) = recorder
    assert bar.n == bar.total == res.iterations or (solver == "cg" and bar.n == bar.total)
    assert bar.disable  # closed
    drawn = [s for s in bar.fp.getvalue().split("\r") if "%" in s]
    assert "100%" in drawn[-1], drawn[-1]


def test_progress_and_logs_bar_not_drawn_off_terminal():
    out = io.StringIO()  # a StringIO is not a terminal
    bar = progress.bar(range(3), enabled=True, file=out)
    assert isinstance(bar, progress.LogBar)
    list(bar)
    assert out.getvalue() == ""
    assert progress.bar(range(3), enabled=False).disable


def test_progress_off_terminal_logs_step_loss_rate_and_time_left(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="metaif.progress")
    bar = progress.bar(total=4, desc="meta-train", unit="step", file=io.StringIO())
    for _ in range(4):
        bar.update(1)
        bar.set_postfix(loss="0.532")
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "metaif.progress"]
    assert any(line.startswith("meta-train 4/4 (100%) loss=0.532 |") for line in lines), lines
    assert any("step/s" in line or "s/step" in line for line in lines), lines
    assert any("left" in line for line in lines), lines


def test_progress_off_terminal_lines_are_spaced_by_the_interval(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="metaif.progress")
    bar = progress.LogBar(total=20, desc="retrain", log_every=30.0, file=io.StringIO())
    now = [0.0]
    monkeypatch.setattr(bar, "_time", lambda: now[0])
    bar.start_t = bar._last_logged = 0.0
    for t in range(0, 90, 10):
        now[0] = float(t)
        bar.display()  # at 0, 10, ..., 80 s: a line at 30 and 60 s only
    assert len([r for r in caplog.records if r.name == "metaif.progress"]) == 2


def test_progress_run_with_output_to_a_file_logs_progress_lines(tmp_path):
    """``metaif train`` with stderr sent to a file: periodic progress lines in the log, no bar."""
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    code = ("import sys; from metaif_cli import progress; progress.LOG_EVERY_SECONDS = 0.0\n"
            "from metaif_cli.cli import main; sys.argv = ['metaif'] + sys.argv[1:]; main()")
    with err.open("w") as stderr:
        res = subprocess.run([sys.executable, "-c", code, "train", "debug=fast", "progress=true", "model.hidden=8",
                              f"hydra.run.dir={run}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, timeout=600)
    text = err.read_text()
    assert res.returncode == 0, text
    assert "\r" not in text
    lines = [line for line in (run / "train.log").read_text().splitlines() if "meta-train " in line]
    assert any("6/6 (100%)" in line and "loss=" in line and "left" in line for line in lines), lines


def test_progress_and_logs_log_records_go_through_tqdm_write():
    from tqdm.contrib.logging import _TqdmLoggingHandler

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    try:
        with progress.redirect_logging():
            assert any(isinstance(h, _TqdmLoggingHandler) for h in root.handlers)
            assert console not in root.handlers
        assert console in root.handlers
    finally:
        root.removeHandler(console)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("progress") / "run"
    res = subprocess.run([*METAIF, "train", "debug=fast", "progress=true", "model.hidden=8", f"hydra.run.dir={run}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    (run.parent / "stderr.txt").write_text(res.stderr)
    return run


def test_progress_and_logs_no_carriage_returns_in_non_terminal_logs(tiny_run):
    assert "\r" not in (tiny_run.parent / "stderr.txt").read_text()
    log_file = tiny_run / "train.log"
    text = log_file.read_text()
    assert "\r" not in text
    assert all(line.startswith("[20") for line in text.splitlines() if line), text


def test_progress_and_logs_unit_pass_has_a_bar(tiny_run, recorder):
    from metaif_cli.score.config import ScoreConfig
    from metaif_cli.score.methods import run_method
    from metaif_cli.score.run import load_run

    run = load_run(tiny_run, "cpu")
    run_method(run, ScoreConfig(run=str(tiny_run), progress=True, plots=False))
    bars = {b.desc: b for b in recorder}
    assert "unit pass" in bars, sorted(bars)
    unit = bars["unit pass"]
    assert unit.n == unit.total == len(run.exp.pools["train"])
    assert all(b.n == b.total for b in recorder if b.total)


def test_progress_and_logs_score_prints_no_deprecation_warning(tiny_run, tmp_path):
    out = tmp_path / "score"
    res = subprocess.run([sys.executable, "-W", "always::FutureWarning", "-W", "always::DeprecationWarning:metaif_cli",
                          "-m", "metaif_cli.cli", "score", f"run={tiny_run}", "plots=false", f"hydra.run.dir={out}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr, res.stderr
    text = (out / "score.log").read_text()
    assert "py.warnings" not in text and "\r" not in text, text


def test_progress_and_logs_jvp_warning_silenced_only_for_torch_import():
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from metaif_cli.progress import load_jvp_decompositions; load_jvp_decompositions()\n"
            "import torch; from torch.func import jvp\n"
            "jvp(lambda x: torch.nn.functional.cross_entropy(x, torch.tensor([0])), (torch.randn(1, 3),),"
            " (torch.randn(1, 3),))\n"
            "try:\n    warnings.warn('ours', FutureWarning)\nexcept FutureWarning:\n    print('still raised')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "still raised"
