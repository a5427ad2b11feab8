#!/usr/bin/env python
"""Peak memory (RSS) and seconds of ``metaif train`` and ``metaif score`` against the pool size and
the model size (issue 22; README "Scale").

Every row is one command in its own process; its peak resident memory is the child's
``ru_maxrss`` (``os.wait4``), its seconds the wall time of the whole command (loading
included). Parts:

- ``pool``: 1,000 / 4,000 / 20,000 training tasks of 28x28 Omniglot images (the real
  ``images_background_small*`` zips under ``--omniglot``, rotations on) and, with
  ``--mini``, of 84x84x3 images written in the Mini-ImageNet cache format (``mini-imagenet-
  cache-{train,validation,test}.pkl``) with SYNTHETIC pixels (uniform random uint8; memory and
  speed only), ``--mini-images`` per class; cnn4 32 filters, strided, 1 inner step
  (``omniglot_cpu``'s network).
- ``width``: the 1,000-task Omniglot pool under an MLP of width 32 to 2048 and a cnn4 of 16 to
  64 filters; the ``chunk`` that ``chunk=auto`` chose is read from the score log.

Runs are kept short for a shared 2-core machine: training takes ``--steps`` steps; scoring
covers a shard of the pool (``shard=0/K`` with K = pool / ``--shard-tasks``: the unit pass over
that many tasks, the whole pool built as index tensors), ``hessian.num_tasks``,
``evaluation.num_tasks`` and the CG iterations are lowered and an unconverged solve allowed,
a single point (``ensemble.checkpoints=1``). What a row measures is what grows with the
pool or the model: the pool's tensors, the images, one chunk of tasks and ``s``; the work
of the passes (linear in the tasks covered) is not the default's.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_scale.py --omniglot /work/shared/data --mini
    # writes scripts/results/bench_scale.csv (--out), prints the table
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["part", "dataset", "model", "width", "pool_tasks", "command", "chunk", "seconds", "peak_rss_mb", "rc",
           "settings"]
SCORE_FAST = ["hessian.num_tasks=16", "evaluation.num_tasks=16", "solver.max_iter=10", "solver.allow_unconverged=true",
              "ensemble.checkpoints=1", "plots=false", "progress=false"]


def run(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float, int]:
    """``(seconds, peak RSS in MB, return code)`` of one command in its own process."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, proc.returncode


def write_mini(root: Path, images_per_class: int, seed: int = 0) -> Path:
    """Mini-ImageNet cache pickles (64/16/20 classes) with synthetic uint8 pixels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s, (split, classes) in enumerate((("train", 64), ("validation", 16), ("test", 20))):
        path = root / f"mini-imagenet-cache-{split}.pkl"
        if path.exists():
            continue
        data = rng.integers(0, 256, (classes * images_per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n{s}{c:07d}": list(range(c * images_per_class, (c + 1) * images_per_class))
                      for c in range(classes)}
        with open(path, "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=4)
    return root


def dataset_args(name: str, root: Path, tasks: int) -> list[str]:
    common = [f"data.root={root}", f"dataset.num_train_tasks={tasks}", "dataset.num_val_tasks=20",
              "dataset.num_test_tasks=50"]
    if name == "omniglot28":
        return ["dataset=omniglot", "dataset.image_size=28", "dataset.rotations=true", "dataset.ways=5",
                "dataset.shots=1", "dataset.queries=5", *common]
    return ["dataset=miniimagenet", "dataset.image_size=84", "dataset.ways=5", "dataset.shots=5",
            "dataset.queries=15", *common]


def model_args(model: str, width: int) -> list[str]:
    if model == "mlp":
        return ["model=mlp", f"model.hidden={width}", "model.layers=2", "meta.inner_steps=5"]
    return ["model=cnn4", f"model.hidden={width}", "model.layers=4", "model.pool=stride", "meta.inner_steps=1",
            "meta.inner_lr=0.4"]


def bench_one(part: str, dataset: str, root: Path, tasks: int, model: str, width: int, args, work: Path) -> list[dict]:
    """Train then score one configuration; a row per command."""
    tag = f"{part}-{dataset}-{model}{width}-{tasks}"
    run_dir = work / tag / "train"
    metaif = [sys.executable, "-m", "metaif_cli.cli"]
    train = [*metaif, "train", *dataset_args(dataset, root, tasks), *model_args(model, width),
             f"optim.steps={args.steps}", f"optim.meta_batch_size={args.meta_batch}", "optim.num_checkpoints=1",
             f"optim.eval_every={args.steps}", "progress=false", f"hydra.run.dir={run_dir}"]
    shard = f"shard=0/{max(1, tasks // args.shard_tasks)}"
    scores = {"train": train,
              "score_default": [*metaif, "score", f"run={run_dir}", shard, *SCORE_FAST,
                                f"hydra.run.dir={work / tag / 'score'}"],
              "score_unit_task": [*metaif, "score", f"run={run_dir}", "unit=task", shard, *SCORE_FAST,
                                  f"hydra.run.dir={work / tag / 'score_task'}"]}
    rows = []
    for command, cmd in scores.items():
        if part == "width" and command == "score_default" and not args.width_default:
            continue
        log = work / f"{tag}-{command}.log"
        seconds, rss, rc = run(cmd, work, log)
        text = log.read_text(errors="replace")
        found = re.findall(r"chunk=auto: (\d+) tasks", text)
        rows.append({"part": part, "dataset": dataset, "model": model, "width": width, "pool_tasks": tasks,
                     "command": command, "chunk": int(found[-1]) if found else None, "seconds": round(seconds, 1),
                     "peak_rss_mb": round(rss, 1), "rc": rc,
                     "settings": "" if command == "train" else " ".join([shard, *SCORE_FAST[:5]])})
        print(rows[-1], flush=True)
        if rc != 0:
            print(text[-2000:], file=sys.stderr)
            break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--omniglot", type=Path, default=Path("/work/shared/data"), help="data.root holding Omniglot")
    ap.add_argument("--mini", action="store_true", help="also the 84x84x3 synthetic Mini-ImageNet pools")
    ap.add_argument("--mini-images", type=int, default=100, help="synthetic images per class (full data: 600)")
    ap.add_argument("--pools", type=int, nargs="*", default=[1000, 4000, 20000])
    ap.add_argument("--mini-pools", type=int, nargs="+", default=[1000, 20000])
    ap.add_argument("--mlp-widths", type=int, nargs="+", default=[32, 256, 2048])
    ap.add_argument("--cnn-widths", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--parts", nargs="+", default=["pool", "width"])
    ap.add_argument("--width-default", action="store_true", help="also the default (unit=all) score per width")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--shard-tasks", type=int, default=32, help="tasks in the scored shard")
    ap.add_argument("--work", type=Path, default=Path("/tmp/metaif-bench-scale"))
    ap.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench_scale.csv")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if "pool" in args.parts:
        for tasks in args.pools:
            rows += bench_one("pool", "omniglot28", args.omniglot, tasks, "cnn4", 32, args, args.work)
        if args.mini:
            mini = write_mini(args.work / "mini", args.mini_images)
            for tasks in args.mini_pools:
                rows += bench_one("pool", "mini84_synthetic", mini, tasks, "cnn4", 32, args, args.work)
    if "width" in args.parts:
        for model, widths in (("mlp", args.mlp_widths), ("cnn4", args.cnn_widths)):
            for width in widths:
                rows += bench_one("width", "omniglot28", args.omniglot, 1000, model, width, args, args.work)
    table = pd.DataFrame(rows, columns=COLUMNS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from metaif_cli.io import save_csv

    save_csv(table, args.out)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
