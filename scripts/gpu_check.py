"""GPU check: does metaif give the CPU's numbers on a GPU, and how fast is it there?

    python scripts/gpu_check.py                   # on a CUDA machine: at most ~8 minutes
    python scripts/gpu_check.py --device cpu      # the same checks on CPU only (CI: ~1 minute)

1. **Agreement.** Trains a tiny float64 digits run (MAML, MLP with batch norm, debug=fast)
   on CPU and on ``--device``, scores both (``method=if``, every task and instance) on
   their own device, and checks that the trained parameters and the scores agree to a
   relative ``--rtol`` (1e-6; relative to the largest entry). With ``--device cpu`` both
   runs are on the CPU: the check is then one of determinism.
2. **Speed.** Times ``metaif train experiment=omniglot_5w1s`` (training steps per second,
   from the run's ``results.json``) and ``metaif score`` on that run (seconds, from its
   ``score.json``), on the full Omniglot layout if ``--data-root`` holds it (else the
   shared subset, ``images_background_small{1,2}.zip``). On CUDA the preset runs as it
   is except for ``optim.steps`` (``--steps``); on CPU the pool and the scoring are
   shrunk so that the whole script fits a CI budget.
3. Writes ``--out`` (``scripts/results/gpu_check.json``): versions, device name, the
   largest relative differences, pass/fail, and the timings. Exit status 1 if a check fails.

Every step runs the ``metaif`` command line (``python -m metaif_cli.cli``) in a subprocess,
so the script checks what a user runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["debug=fast", "dtype=float64", "model.hidden=8", "model.layers=1", "model.norm=batch", "meta=maml",
        "meta.inner_steps=1", "progress=false", "threads=1"]
TINY_SCORE = ["method=if", "unit=all", "hessian.num_tasks=null", "hessian.lanczos_iters=10", "solver.tol=1e-10",
              "solver.max_iter=200", "progress=false", "plots=false", "dtype=float64"]


def metaif(args: list[str], budget: float) -> float:
    """Run ``metaif <args>`` and return its wall time; stop the script when it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "metaif_cli.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=budget)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"gpu_check: `metaif {' '.join(args)}` failed (exit {proc.returncode})")
    return time.perf_counter() - t0


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |a|`` (0 when both are zero)."""
    a, b = a.double().flatten(), b.double().flatten()
    scale = float(a.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def agreement(device: str, work: Path, rtol: float, budget: float) -> dict:
    """Train and score the tiny float64 run on CPU and on ``device``; compare parameters and scores."""
    runs = {}
    for name, dev in (("cpu", "cpu"), ("device", device)):
        run, scores = work / f"tiny-{name}" / "run", work / f"tiny-{name}" / "score"
        seconds = metaif(["train", *TINY, f"device={dev}", f"hydra.run.dir={run}"], budget)
        seconds += metaif(["score", f"run={run}", *TINY_SCORE, f"device={dev}", f"hydra.run.dir={scores}"], budget)
        lam = torch.load(run / "model.pt", map_location="cpu", weights_only=False)["lam"]
        runs[name] = {"lam": torch.cat([v.flatten() for v in lam.values()]),
                      "task": torch.tensor(pd.read_csv(scores / "task_scores.csv").sort_values("task_id")
                                           .pred_delta_test_loss.to_numpy()),
                      "instance": torch.tensor(pd.read_csv(scores / "instance_scores.csv")
                                               .sort_values(["task_id", "role", "position"])
                                               .pred_delta_test_loss.to_numpy()),
                      "seconds": seconds}
    diffs = {key: rel_diff(runs["cpu"][key], runs["device"][key]) for key in ("lam", "task", "instance")}
    return {"relative_difference": {"parameters": diffs["lam"], "task_scores": diffs["task"],
                                    "instance_scores": diffs["instance"]},
            "rtol": rtol, "passed": all(d <= rtol for d in diffs.values()),
            "seconds": {"cpu": runs["cpu"]["seconds"], device: runs["device"]["seconds"]}}


def full_omniglot(root: Path) -> bool:
    """True if ``root`` holds the full Omniglot (background and evaluation alphabets)."""
    for base in (root, root / "omniglot"):
        if (base / "images_evaluation.zip").exists() or (base / "omniglot-py" / "images_evaluation").is_dir():
            return True
    return False


def speed(device: str, work: Path, data_root: Path, steps: int, budget: float) -> dict:
    """Training steps per second and scoring seconds of ``experiment=omniglot_5w1s`` on ``device``."""
    full = full_omniglot(data_root)
    run, scores = work / "omniglot" / "run", work / "omniglot" / "score"
    train = ["train", "experiment=omniglot_5w1s", f"device={device}", f"data.root={data_root}", f"optim.steps={steps}",
             f"optim.eval_every={steps}", f"optim.checkpoint_every={steps}", "progress=false"]
    score = ["score", f"run={run}", f"device={device}", "progress=false", "plots=false"]
    if device == "cpu":  # a CI-sized stand-in: same network and task shape, small pool and scoring
        train += ["dataset.num_train_tasks=64", "dataset.num_test_tasks=16", "dataset.num_val_tasks=8",
                  "model.hidden=16", "optim.meta_batch_size=4", "threads=1"]
        score += ["unit=task", "hessian.num_tasks=8", "evaluation.num_tasks=8", "hessian.lanczos_iters=5",
                  "solver.max_iter=10", "solver.allow_unconverged=true"]
    train_wall = metaif([*train, f"hydra.run.dir={run}"], budget)
    results = json.loads((run / "results.json").read_text())
    score_wall = metaif([*score, f"hydra.run.dir={scores}"], budget)
    summary = json.loads((scores / "score.json").read_text())
    return {"data": "full Omniglot" if full else "shared Omniglot subset (images_background_small1/2)",
            "overrides": {"train": train[1:], "score": score[2:]},
            "train_steps": results["steps"], "train_seconds": results["train_seconds"],
            "train_steps_per_second": results["steps"] / results["train_seconds"],
            "train_command_seconds": train_wall, "test_acc": results["test_acc"],
            "score_seconds": summary["total_seconds"], "score_stage_seconds": summary["seconds"],
            "score_command_seconds": score_wall, "n_tasks_scored": summary["n_tasks"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("METAIF_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--steps", type=int, default=None, help="training steps timed (cuda: 300, cpu: 2)")
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds allowed to one command")
    parser.add_argument("--skip-speed", action="store_true", help="only the agreement check")
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --device cpu")
    steps = args.steps or (300 if args.device == "cuda" else 2)
    report = {"device": args.device, "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else
              platform.processor() or platform.machine(),
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="metaif-gpu-check-") as tmp:
        report["agreement"] = agreement(args.device, Path(tmp), args.rtol, args.budget)
        if not args.skip_speed:
            if not (args.data_root / "omniglot").exists() and not full_omniglot(args.data_root):
                report["speed"] = {"skipped": f"no Omniglot under {args.data_root}"}
            else:
                report["speed"] = speed(args.device, Path(tmp), args.data_root.resolve(), steps, args.budget)
    report["total_seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(json.dumps(report, indent=2))
    return 0 if report["agreement"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
