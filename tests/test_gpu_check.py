"""``scripts/gpu_check.py --device cpu``: the GPU check runs end to end on CPU (a few minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path, shared_data):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu",
                           "--data-root", str(shared_data), "--out", str(out)],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    agree = report["agreement"]
    assert agree["passed"] and max(agree["relative_difference"].values()) <= 1e-6
    speed = report["speed"]
    assert speed["train_steps_per_second"] > 0 and speed["score_seconds"] > 0 and speed["n_tasks_scored"] == 64
