"""Benchmark ``metaif score`` on the real Omniglot subset (issue: fast and scalable scoring).

Writes ``bench_score.csv`` (one row per measured configuration) and ``bench_score.json``:

1. time to score all tasks and all instances vs the wall time of the training run that
   produced the model (the paper: 65.69 s vs 316.74 s, about 20%; target under 5%), for
   the default settings and cheaper ones, with their scores' Spearman against the default
   form at the final point alone (``point``), and the ratio of the whole scoring to the unit pass;
2. time per solver and Hessian form on that run;
   ``products``: one total-Hessian product per form (``exact``, ``no_third_order``,
   ``gauss_newton``), timed side by side (interleaved repeats), and its ratio to ``exact``;
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
from scipy.stats import spearmanr

from metaif_cli.data.config import DataConfig, DatasetConfig
from metaif_cli.influence import compute
from metaif_cli.influence.config import HessianConfig, SolverConfig
from metaif_cli.io import save_csv, save_json
from metaif_cli.meta.config import MetaConfig
from metaif_cli.meta.params import FlatSpec
from metaif_cli.models.config import ModelConfig
from metaif_cli.score.config import EnsembleConfig, ScoreConfig
from metaif_cli.score.methods import build_problem, run_method
from metaif_cli.score.run import load_run
from metaif_cli.train.config import OptimConfig, TrainConfig

log = logging.getLogger("bench_score")


def timed_scores(run, cfg: ScoreConfig) -> tuple[float, compute.ScoreOutput]:
    t0 = time.perf_counter()
    out = run_method(run, cfg)
    return time.perf_counter() - t0, out


def agreement(out: compute.ScoreOutput, ref: compute.ScoreOutput) -> dict:
    """Spearman of task / query / support scores and cosine of ``s`` against a reference scoring."""
    row = {} if out.s is None else {"cos_s_vs_point": float(torch.nn.functional.cosine_similarity(out.s, ref.s, dim=0))}
    for field in ("task", "query", "support"):
        a, b = getattr(out.scores, field).reshape(-1), getattr(ref.scores, field).reshape(-1)
        if not torch.isnan(a).any():
            row[f"spearman_{field}_vs_point"] = float(spearmanr(a.numpy(), b.numpy())[0])
    return row


def preset_configs(run_dir: Path) -> dict[str, ScoreConfig]:
    """``default``: the shipped settings (Gauss-Newton, averaged over the final point and up to 4
    saved checkpoints); ``point``: the same at the final point alone; ``point_tasks``: ``point``
    for ``unit=task`` (no support reverse pass); ``exact_point``: the paper's exact total Hessian
    at the final point (the default before the LDS benchmark); ``point_seed1``: ``point`` with
    another seeded Hessian subsample (the sampling noise of ``s``); ``point_tol3``: CG to 1e-3;
    ``point_lanczos20``: the damping chosen from the first 20 Lanczos steps instead of the
    default 8 (the default before it was measured here: CG then runs at least 20 products);
    ``point_tasks_lanczos20``: both;
    ``fast``: Hessian on 32 tasks, CG to 1e-3, final point; ``fast_tasks``: ``fast`` for ``unit=task``."""
    base = ScoreConfig(run=str(run_dir), progress=False)
    point = replace(base, ensemble=EnsembleConfig(checkpoints=1))
    loose = replace(base.solver, tol=1e-3)
    fast = replace(point, hessian=replace(base.hessian, num_tasks=32), solver=loose)
    return {"point": point, "default": base, "point_tasks": replace(point, unit="task"),
            "exact_point": replace(point, hessian=replace(base.hessian, form="exact")),
            "point_seed1": replace(point, seed=1), "point_tol3": replace(point, solver=loose),
            "point_lanczos20": replace(point, hessian=replace(base.hessian, lanczos_iters=20)),
            "point_tasks_lanczos20": replace(point, unit="task", hessian=replace(base.hessian, lanczos_iters=20)),
            "fast": fast, "fast_tasks": replace(fast, unit="task")}


def score_rows(run, run_dir: Path, train_seconds: float, names: list[str]) -> list[dict]:
    """Scoring every task (and instance, unless ``unit=task``) vs the training run's wall time."""
    rows, ref = [], None
    for name, cfg in preset_configs(run_dir).items():
        if name not in names:
            continue
        seconds, out = timed_scores(run, cfg)
        if name == "point":
            ref = out
        row = {"part": "score_vs_train", "preset": name, "unit": cfg.unit, "hessian_tasks": cfg.hessian.num_tasks,
               "lanczos_iters": cfg.hessian.damping_iters(), "tol": cfg.solver.tol, "seconds": seconds,
               "train_seconds": train_seconds, "score_over_train": seconds / train_seconds,
               "num_tasks": len(out.scores.task), "members": len(out.members or [None]),
               "score_over_unit_pass": seconds / out.seconds["score_units"],
               **{f"t_{k}": v for k, v in out.seconds.items()}}
        if out.solve is not None:  # single point (an ensemble reports each member's solve in out.members)
            row.update(iterations=out.solve.iterations, relative_residual=out.solve.residual,
                       damping=out.curvature.damping)
        if ref is not None and name != "point":
            row.update(agreement(out, ref))
        rows.append(row)
        log.info("%s", row)
    return rows


def solver_rows(run, base: ScoreConfig, label: str) -> list[dict]:
    """Every Hessian form x solver on ``run``: seconds of the iHVP ``s`` alone, iterations, residual.

    ``damping_choice``: ``in_solve`` is the shipped path (``cg`` with ``auto_damping``: the
    damping is chosen from the same Lanczos basis that solves); ``lanczos_first`` estimates
    the spectrum by separate Lanczos steps (``lanczos_seconds``), then runs each solver.
    """
    rows = []
    theta = FlatSpec.of(run.lam).flatten(run.lam)
    problem = build_problem(run, base)  # the form only changes the products (``cfg.hessian``)
    b = problem.eval_grad(theta)[1].mean(0)
    for form in ("exact", "no_third_order", "gamma", "gauss_newton"):
        cfg_form = replace(base, hessian=replace(base.hessian, form=form),
                           solver=replace(base.solver, name="cg", allow_unconverged=True))
        t0 = time.perf_counter()
        res, curvature = compute.solve_ihvp(problem, theta, b, cfg_form)
        rows.append({"part": label, "form": form, "solver": "cg", "damping_choice": "in_solve",
                     "seconds": time.perf_counter() - t0, "iterations": res.iterations,
                     "relative_residual": res.residual, "damping": curvature.damping})
        log.info("%s", rows[-1])
        t0 = time.perf_counter()
        curvature = compute.choose_damping(problem, theta, cfg_form, b)
        lanczos_s = time.perf_counter() - t0
        for solver in ("cg", "neumann", "lissa"):
            cfg = replace(cfg_form, solver=replace(cfg_form.solver, name=solver))
            t0 = time.perf_counter()
            res = compute.solve_ihvp(problem, theta, b, cfg, curvature)[0]
            rows.append({"part": label, "form": form, "solver": solver, "damping_choice": "lanczos_first",
                         "seconds": time.perf_counter() - t0, "lanczos_seconds": lanczos_s,
                         "iterations": res.iterations, "relative_residual": res.residual,
                         "damping": curvature.damping})
            log.info("%s", rows[-1])
    return rows


def product_rows(run, base: ScoreConfig, repeats: int = 5) -> list[dict]:
    """Seconds of one total-Hessian product per form over the Hessian's tasks, measured side by
    side: the forms alternate within each repeat, so load on the machine hits them alike.
    ``ratio_to_exact`` is the median time over the median time of ``exact``."""
    import statistics

    theta = FlatSpec.of(run.lam).flatten(run.lam)
    problem = build_problem(run, base)
    index = compute.hessian_index(problem.n, base)
    vec = problem.eval_grad(theta)[1].mean(0)
    forms = ("exact", "no_third_order", "gauss_newton")
    times: dict[str, list[float]] = {f: [] for f in forms}
    for f in forms:  # warm-up
        problem.hvp(theta, vec, index, f)
    for _ in range(repeats):
        for f in forms:
            t0 = time.perf_counter()
            problem.hvp(theta, vec, index, f)
            times[f].append(time.perf_counter() - t0)
    exact = statistics.median(times["exact"])
    rows = [{"part": "products", "form": f, "tasks": len(index), "repeats": repeats,
             "seconds": statistics.median(times[f]), "ratio_to_exact": statistics.median(times[f]) / exact}
            for f in forms]
    for row in rows:
        log.info("%s", row)
    return rows


def small_run(root: str, out: Path) -> Path:
    """A small cnn4 on the same Omniglot data, so ``dense`` (one HVP per parameter) is affordable."""
    from metaif_cli.train.command import run_train

    cfg = TrainConfig(seed=0, device="cpu", progress=False, data=DataConfig(root=root, cache=".cache/metaif"),
                      dataset=DatasetConfig(name="omniglot", ways=5, shots=1, queries=5, num_train_tasks=64,
                                            num_val_tasks=10, num_test_tasks=32, image_size=28),
                      model=ModelConfig(name="cnn4", hidden=4, layers=4, norm="batch", pool="stride"),
                      meta=MetaConfig(name="maml", inner_steps=1, inner_lr=0.4),
                      optim=OptimConfig(steps=1000, meta_batch_size=8, eval_every=500, checkpoint_every=500))
    run_dir = out / "small_run"
    run_train(cfg, run_dir)
    return run_dir


def accuracy_rows(run_dir: Path) -> list[dict]:
    """Each solver and form against ``dense`` at the same damping: relative error and cosine of ``s``.

    The Hessian is taken on 16 tasks: the oracle and the solvers see the same operator, and
    ``dense`` costs one product per parameter.
    """
    run = load_run(run_dir, dtype="float64")
    rows = []
    theta = FlatSpec.of(run.lam).flatten(run.lam)
    problem = build_problem(run, ScoreConfig(run=str(run_dir), progress=False))  # the form changes the products only
    b = problem.eval_grad(theta)[1].mean(0)
    for form in ("exact", "no_third_order", "gamma", "gauss_newton"):
        base = ScoreConfig(run=str(run_dir), progress=False, hessian=HessianConfig(form=form, num_tasks=16),
                           solver=SolverConfig(name="dense"))
        curvature = compute.choose_damping(problem, theta, base, b)
        t0 = time.perf_counter()
        ref = compute.solve_ihvp(problem, theta, b, base, curvature)[0]
        dense_s = time.perf_counter() - t0
        rows.append({"part": "accuracy", "form": form, "solver": "dense", "seconds": dense_s, "rel_error_vs_dense": 0.0,
                     "cosine_vs_dense": 1.0, "relative_residual": ref.residual, "damping": curvature.damping,
                     "num_parameters": theta.numel()})
        auto, auto_curvature = compute.solve_ihvp(problem, theta, b, replace(
            base, solver=replace(base.solver, name="cg", allow_unconverged=True)))
        if auto_curvature.damping == curvature.damping:  # else: damping doubled in the solve, not comparable
            rows.append({"part": "accuracy", "form": form, "solver": "cg", "damping_choice": "in_solve",
                         "rel_error_vs_dense": float((auto.x - ref.x).norm() / ref.x.norm()),
                         "cosine_vs_dense": float(torch.nn.functional.cosine_similarity(auto.x, ref.x, dim=0)),
                         "relative_residual": auto.residual, "iterations": auto.iterations,
                         "damping": curvature.damping, "num_parameters": theta.numel()})
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
                        help="score: scoring vs training time; solvers: per form and solver; accuracy: vs dense; "
                        "products: one Hessian product per form, side by side")
    parser.add_argument("--repeats", type=int, default=5, help="products: timed repeats per form")
    parser.add_argument("--presets", nargs="*", default=list(preset_configs(Path(".")).keys()))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run)
    train_seconds = json.loads((run_dir / "results.json").read_text())["train_seconds"]
    run = load_run(run_dir)
    rows = score_rows(run, run_dir, train_seconds, args.presets) if "score" in args.parts else []
    if "solvers" in args.parts:
        rows += solver_rows(run, preset_configs(run_dir)["fast"], "solvers")
    if "products" in args.parts:
        rows += product_rows(run, preset_configs(run_dir)["fast"], args.repeats)
    if "accuracy" in args.parts:
        rows += accuracy_rows(small_run(args.data_root, out))
    frame = pd.DataFrame(rows)
    save_csv(frame, out / "bench_score.csv")
    save_json({"rows": rows, "device": str(run.exp.device), "torch": torch.__version__,
               "threads": torch.get_num_threads()}, out / "bench_score.json")
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
