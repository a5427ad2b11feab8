"""Retraining throughput: batched retraining (``retrain.batch=K``) against the sequential and joblib launchers (issue 19).

On the fidelity configurations of ``scripts/bench_fidelity.py`` (digits: MLP 32, 300 Adam
steps on meta-batches of 16, 100 tasks; MNIST; the Omniglot subset MLP), this script trains
the run once (``metaif train``, resumed when present), then retrains LDS-like subsets of it
(half the tasks removed, drawn with a fixed seed) with each engine, every measurement in a
fresh Python process (one torch thread) so that its peak resident memory is its own:

- ``sequential``: ``launch(jobs, "sequential")``, the single-run loop, one after the other;
- ``joblib``: ``launch(jobs, "joblib", n_jobs)`` (worker processes; the machine's cores);
- ``batched``: ``launch(jobs, "sequential", batch=K)``: one stack of K models for several K.

Each row: dataset, engine, K (models per process), retrainings, wall seconds, seconds per
retraining, retrainings per hour, the ratio to sequential measured in the same run, the
peak RSS of the measuring process (joblib: of the parent and the largest worker, summed
over workers), the load average at the start. All measurements of a dataset are taken side
by side in one run of this script: the machine is shared, so compare ratios, not seconds
across runs.

Usage:
    python scripts/bench_retrain.py --datasets digits --ks 1 4 16 64      # digits only
    python scripts/bench_retrain.py --data-root /work/shared/data --datasets digits mnist omniglot
    python scripts/bench_retrain.py --device cuda --ks 64 256 1024        # on a GPU
Writes ``scripts/results/bench_retrain.csv`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_fidelity import CONFIGS, CPU, metaif  # noqa: E402

log = logging.getLogger("bench_retrain")
COLUMNS = ["dataset", "engine", "k", "n_jobs", "retrainings", "wall_seconds", "seconds_per_retraining",
           "retrainings_per_hour", "speedup_vs_sequential", "peak_rss_mb", "device", "load_average"]


def jobs_for(run: Path, count: int, where: Path, device: str):
    """``count`` cold retrainings of ``run``, each without a seeded half of its tasks (as ``protocol=lds``)."""
    import numpy as np

    from metaif_cli.prune.lds import draw_subsets
    from metaif_cli.prune.units import Unit
    from metaif_cli.prune.update import retrain_job
    from metaif_cli.score.run import load_run

    loaded = load_run(run, device)
    n = len(loaded.exp.pools["train"])
    subsets = draw_subsets(n, count, 0.5, seed=0)
    jobs = [retrain_job(loaded, [Unit("task", int(i)) for i in np.asarray(s)], where / f"r{j}")
            for j, s in enumerate(subsets)]
    for job in jobs:
        job.config["device"] = device
    return jobs


def measure(args) -> dict:
    """One measurement in this process (``--measure``): print its row as JSON."""
    import torch

    from metaif_cli.prune.launch import launch

    torch.set_num_threads(1)
    where = Path(args.work) / f"{args.engine}-{args.k}"
    shutil.rmtree(where, ignore_errors=True)
    jobs = jobs_for(Path(args.run), args.count, where, args.device)
    if args.engine != "joblib":  # the process's one-time start-up (imports, data) is not a retraining's cost
        from metaif_cli.prune import launch as launch_module

        launch_module._experiment(json.dumps(jobs[0].config, sort_keys=True))
        torch.optim.Adam([torch.zeros(1)])
    load = os.getloadavg()[0]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.engine == "joblib":
        launch(jobs, "joblib", n_jobs=args.n_jobs)
    else:
        launch(jobs, "sequential", batch=args.k)
    if args.device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.engine == "joblib":
        rss += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 * args.n_jobs
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    kept = [torch.load(where / f"r{j}" / "model.pt", weights_only=True)["lam"] for j in range(min(3, args.count))]
    torch.save(kept, where.parent / f"lams-{args.engine}-{args.k}.pt")  # compared with sequential's by the parent
    shutil.rmtree(where, ignore_errors=True)
    return {"engine": args.engine, "k": args.k, "n_jobs": args.n_jobs if args.engine == "joblib" else 1,
            "retrainings": args.count, "wall_seconds": wall, "seconds_per_retraining": wall / args.count,
            "retrainings_per_hour": 3600 * args.count / wall, "peak_rss_mb": rss, "peak_gpu_mb": gpu,
            "device": args.device, "load_average": load}


def agreement(where: Path, engine: str, k: int) -> float:
    """Largest ``max|lam - lam_seq| / max|lam_seq|`` over the parameters of the retrainings both engines ran."""
    import torch

    mine = torch.load(where / f"lams-{engine}-{k}.pt", weights_only=True)
    ref = torch.load(where / "lams-sequential-1.pt", weights_only=True)
    return max(float((a[n].double() - b[n].double()).abs().max() / b[n].double().abs().max())
               for a, b in zip(mine, ref) for n in b)


def run_measure(run: Path, work: Path, engine: str, k: int, count: int, n_jobs: int, device: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--measure", "--run", str(run), "--work", str(work), "--engine", engine,
           "--k", str(k), "--count", str(count), "--n-jobs", str(n_jobs), "--device", device]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("%s K=%d: %d retrainings in %.1f s (%.2f s each, %.0f MB)", engine, k, count, row["wall_seconds"],
             row["seconds_per_retraining"], row["peak_rss_mb"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits"], choices=list(CONFIGS))
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--ks", nargs="+", type=int, default=[4, 16, 64, 128])
    p.add_argument("--sequential", type=int, default=3, help="retrainings timed with the sequential launcher")
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="override optim.steps (a shorter smoke run)")
    p.add_argument("--work", default="/tmp/bench_retrain")
    p.add_argument("--out", default=str(REPO / "scripts" / "results" / "bench_retrain.csv"))
    # one measurement (internal)
    p.add_argument("--measure", action="store_true")
    p.add_argument("--run"), p.add_argument("--engine"), p.add_argument("--k", type=int, default=1)
    p.add_argument("--count", type=int, default=1)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work, rows = Path(args.work), []
    for dataset in args.datasets:
        run = work / dataset / "run"
        overrides = [o.format(data_root=args.data_root) for o in CONFIGS[dataset]] + CPU
        if args.steps:
            overrides.append(f"optim.steps={args.steps}")
        metaif(["train", *overrides, f"hydra.run.dir={run}"], work / "logs" / f"{dataset}-train.log")
        plan = [("sequential", 1, args.sequential)]
        if args.device == "cpu" and args.n_jobs > 1:
            plan.append(("joblib", 1, args.sequential * args.n_jobs))
        plan += [("batched", k, k) for k in args.ks]
        part = [{"dataset": dataset, **run_measure(run, work / dataset, e, k, c, args.n_jobs, args.device)}
                for e, k, c in plan]
        base = part[0]["retrainings_per_hour"]
        for row in part:
            row["speedup_vs_sequential"] = row["retrainings_per_hour"] / base
            row["max_rel_diff_vs_sequential"] = agreement(work / dataset, row["engine"], row["k"])
        rows += part
        table = pd.DataFrame(rows)
        table = table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False, float_format="%.4g")
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
