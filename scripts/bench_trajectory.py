"""Benchmark ``method=trajectory`` against the training run it replays (issue 10: at most 4x training).

For each meta-learner, trains a small run on the bundled digits (one torch thread) and then scores
it with ``method=trajectory`` in the same process, ``--repeats`` times side by side (train, score,
train, score, ...: both see the same machine load), and reports the median seconds of each and
their ratio. Training time is ``train_seconds`` of ``results.json`` (the training loop with its periodic
validation, not the data loading). The scoring time is the whole ``run_method`` call (loading the checkpoints, the
replay of every segment, the reverse pass and ``D f``). Writes
``scripts/results/bench_trajectory.csv`` and ``.json``.

Usage:
    OMP_NUM_THREADS=1 python scripts/bench_trajectory.py [--steps 100] [--repeats 2] [--out scripts/results]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from metaif_cli.data.config import DatasetConfig
from metaif_cli.io import save_csv, save_json
from metaif_cli.meta.config import MetaConfig
from metaif_cli.models.config import ModelConfig
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.methods import run_method
from metaif_cli.score.run import load_run
from metaif_cli.train.command import run_train
from metaif_cli.train.config import OptimConfig, TrainConfig


def train_config(meta: str, steps: int, dtype: str) -> TrainConfig:
    return TrainConfig(
        seed=0, device="cpu", dtype=dtype, progress=False, threads=1,
        dataset=DatasetConfig(name="digits", ways=5, shots=1, queries=5, num_train_tasks=50, num_val_tasks=10,
                              num_test_tasks=20, split_by="instance", split_fractions=[0.6, 0.1, 0.3]),
        model=ModelConfig(name="mlp", hidden=32, layers=2),
        meta=MetaConfig(name=meta, inner_steps=3, inner_lr=0.4),
        optim=OptimConfig(steps=steps, meta_batch_size=8, lr=1e-3, eval_every=steps, checkpoint_every=steps,
                          num_checkpoints=5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--metas", nargs="+", default=["maml", "anil"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for meta in args.metas:
        train_s, score_s, seconds = [], [], {}
        for rep in range(args.repeats):
            work = Path(tempfile.mkdtemp(prefix="bench_traj_"))
            try:
                results = run_train(train_config(meta, args.steps, args.dtype), work / "run")
                train_s.append(float(results["train_seconds"]))
                run = load_run(work / "run")
                cfg = ScoreConfig(run=str(work / "run"), method="trajectory", progress=False, plots=False)
                t0 = time.perf_counter()
                out = run_method(run, cfg)
                score_s.append(time.perf_counter() - t0)
                seconds = out.seconds
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"{meta} repeat {rep}: train {train_s[-1]:.1f} s, trajectory {score_s[-1]:.1f} s "
                  f"({score_s[-1] / train_s[-1]:.2f}x)", flush=True)
        rows.append({"meta": meta, "steps": args.steps, "dtype": args.dtype, "repeats": args.repeats,
                     "train_seconds": statistics.median(train_s), "trajectory_seconds": statistics.median(score_s),
                     "ratio": statistics.median(score_s) / statistics.median(train_s),
                     **{f"stage_{k}_seconds": v for k, v in seconds.items()}})
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    save_csv(frame, args.out / "bench_trajectory.csv")
    save_json({"rows": rows, "threads": 1, "machine": platform.machine(), "torch": torch.__version__,
               "note": "train = train_seconds of results.json (the training loop, its periodic validation "
                       "included; not data loading or plots); trajectory = the whole run_method call (checkpoints, "
                       "replay, reverse pass, D f); median over repeats, measured alternately in one process"},
              args.out / "bench_trajectory.json")
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
