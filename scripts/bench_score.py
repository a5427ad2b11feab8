"""Benchmark ``metaif score`` on the real Omniglot subset (issue: fast and scalable scoring).

Writes ``bench_score.csv`` (one row per measured configuration) and ``bench_score.json``:

1. time to score all tasks and all instances vs the wall time of the training run that
   produced the model (the paper: 65.69 s vs 316.74 s, about 20%; target under 5%);
2. time per solver and Hessian form on that run;
3. accuracy of each solver against ``dense`` at the same damping, on a small model
   (dense needs one HVP per parameter) trained here on the same data.

Usage:
    python scripts/bench_score.py --run outputs/train/<omniglot run> [--out outputs/bench]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from metaif_cli.config import DataConfig, DatasetConfig, MetaConfig, ModelConfig, OptimConfig, TrainConfig
from metaif_cli.influence import compute
from metaif_cli.io import save_csv, save_json
from metaif_cli.meta.params import FlatSpec
from metaif_cli.score_config import HessianConfig, ScoreConfig, SolverConfig
from metaif_cli.scoring import build_problem, load_run, run_method

log = logging.getLogger("bench_score")


def timed_scores(run, cfg: ScoreConfig) -> tuple[float, compute.ScoreOutput]:
    t0 = time.perf_counter()
    out = run_method(run, cfg)
    return time.perf_counter() - t0, out


def solver_rows(run, base: ScoreConfig, label: str) -> list[dict]:
    """Every Hessian form x solver on ``run``: seconds of the iHVP ``s`` alone, iterations, residual."""
    rows = []
    theta = FlatSpec.of(run.lam).flatten(run.lam)
    for form in ("exact", "no_third_order", "gamma"):
        cfg_form = replace(base, hessian=replace(base.hessian, form=form))
        problem = build_problem(run, cfg_form)
        b = problem.eval_grad(theta)[1].mean(0)
        t0 = time.perf_counter()
        curvature = compute.choose_damping(problem, theta, cfg_form)
        lanczos_s = time.perf_counter() - t0
        for solver in ("cg", "neumann", "lissa"):
            cfg = replace(cfg_form, solver=replace(base.solver, name=solver, allow_unconverged=True))
            t0 = time.perf_counter()
            res = compute.solve_ihvp(problem, theta, b, cfg, curvature)[0]
            rows.append({"part": label, "form": form, "solver": solver, "seconds": time.perf_counter() - t0,
                         "lanczos_seconds": lanczos_s, "iterations": res.iterations,
                         "relative_residual": res.residual, "damping": curvature.damping})
            log.info("%s", rows[-1])
    return rows


def small_run(root: str, out: Path) -> Path:
    """A small cnn4 on the same Omniglot data, so ``dense`` (one HVP per parameter) is affordable."""
    from metaif_cli.commands.train import run_train

    cfg = TrainConfig(seed=0, device="cpu", progress=False, data=DataConfig(root=root, cache=".cache/metaif"),
                      dataset=DatasetConfig(name="omniglot", ways=5, shots=1, queries=5, num_train_tasks=64,
                                            num_val_tasks=10, num_test_tasks=32, image_size=28),
                      model=ModelConfig(name="cnn4", hidden=4, layers=4, norm="batch"),
                      meta=MetaConfig(name="maml", inner_steps=3, inner_lr=0.4),
                      optim=OptimConfig(steps=200, meta_batch_size=8, eval_every=100, checkpoint_every=100))
    run_dir = out / "small_run"
    run_train(cfg, run_dir)
    return run_dir


def accuracy_rows(run_dir: Path) -> list[dict]:
    """Each solver and form against ``dense`` at the same damping: relative error and cosine of ``s``."""
    run = load_run(run_dir, dtype="float64")
    rows = []
    for form in ("exact", "no_third_order", "gamma"):
        base = ScoreConfig(run=str(run_dir), progress=False, hessian=HessianConfig(form=form),
                           solver=SolverConfig(name="dense"))
        problem = build_problem(run, base)
        theta = FlatSpec.of(run.lam).flatten(run.lam)
        b = problem.eval_grad(theta)[1].mean(0)
        curvature = compute.choose_damping(problem, theta, base)
        t0 = time.perf_counter()
        ref = compute.solve_ihvp(problem, theta, b, base, curvature)[0]
        dense_s = time.perf_counter() - t0
        rows.append({"part": "accuracy", "form": form, "solver": "dense", "seconds": dense_s, "rel_error_vs_dense": 0.0,
                     "cosine_vs_dense": 1.0, "relative_residual": ref.residual, "damping": curvature.damping,
                     "num_parameters": theta.numel()})
        for solver, extra in (("cg", {}), ("neumann", {"terms": 200}), ("lissa", {"depth": 200, "repeats": 2})):
            cfg = replace(base, solver=replace(base.solver, name=solver, allow_unconverged=True, **extra))
            t0 = time.perf_counter()
            res = compute.solve_ihvp(problem, theta, b, cfg, curvature)[0]
            seconds = time.perf_counter() - t0
            rows.append({"part": "accuracy", "form": form, "solver": solver, "seconds": seconds,
                         "rel_error_vs_dense": float((res.x - ref.x).norm() / ref.x.norm()),
                         "cosine_vs_dense": float(torch.nn.functional.cosine_similarity(res.x, ref.x, dim=0)),
                         "relative_residual": res.residual, "iterations": res.iterations,
                         "damping": curvature.damping, "num_parameters": theta.numel()})
            log.info("%s", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished metaif train run on Omniglot")
    parser.add_argument("--out", default="outputs/bench", help="folder for bench_score.csv/json")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--parts", nargs="*", default=["score", "solvers", "accuracy"],
                        help="score: scoring vs training time; solvers: per form and solver; accuracy: vs dense")
    parser.add_argument("--presets", nargs="*", default=["default", "fast"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run)
    train_seconds = json.loads((run_dir / "results.json").read_text())["train_seconds"]
    run = load_run(run_dir)
    rows = []
    presets = {
        "default": ScoreConfig(run=str(run_dir), progress=False),
        "fast": ScoreConfig(run=str(run_dir), progress=False,
                            hessian=HessianConfig(num_tasks=32, lanczos_iters=10),
                            solver=SolverConfig(name="cg", max_iter=30, tol=1e-3)),
    }
    for name, cfg in presets.items():
        if "score" not in args.parts or name not in args.presets:
            continue
        seconds, out_ = timed_scores(run, cfg)
        rows.append({"part": "score_vs_train", "preset": name, "seconds": seconds, "train_seconds": train_seconds,
                     "score_over_train": seconds / train_seconds, "iterations": out_.solve.iterations,
                     "relative_residual": out_.solve.residual, **{f"t_{k}": v for k, v in out_.seconds.items()}})
        log.info("%s", rows[-1])
    if "solvers" in args.parts:
        rows += solver_rows(run, presets["fast"], "solvers")
    if "accuracy" in args.parts:
        rows += accuracy_rows(small_run(args.data_root, out))
    frame = pd.DataFrame(rows)
    save_csv(frame, out / "bench_score.csv")
    save_json({"rows": rows, "device": str(run.exp.device), "torch": torch.__version__,
               "threads": torch.get_num_threads()}, out / "bench_score.json")
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
