"""Fidelity benchmark: the linear datamodeling score of every scoring method on real data (issue 9).

Runs ``metaif prune-and-retrain protocol=lds`` through the command line for every method
(``if`` with the Hessian forms ``exact``, ``no_third_order``, ``gamma`` and ``gauss_newton``, with
and without a 5-checkpoint ensemble; ``trajectory``, ``direct_if``,
``grad_sim``, ``tracin``, ``loss``, ``random``) on three CPU-sized training runs:

- ``digits``: the built-in digits pool as shipped (100 training tasks, 5-way 1-shot, 10
  queries, 200 test tasks), an MLP with one hidden layer of 32, 300 Adam steps on
  meta-batches of 16; task, support and query units;
- ``mnist``: real MNIST test digits (``dataset=mnist data.root=...``), 100 training tasks,
  5-way 1-shot, the same MLP and budget; task units;
- ``omniglot``: the real Omniglot subset (the two ``images_background_small`` zips) with
  rotations as new classes, 200 training tasks, 5-way 1-shot, 28 px, an MLP with one hidden
  layer of 64, one inner step of 0.4 (three at test), the same budget; task units. (Measured
  here: meta-test accuracy 0.48; 100 tasks without rotations overfit, 0.43 with a test loss
  above chance; a 16-filter cnn4 took 147 s of training against 33 s for this MLP on the
  same loaded machine.)

``--baselines`` adds ``ekfac_if`` and ``trak`` (issue 11; the ``baselines`` extra) to the
same retrainings. ``--default-digits`` uses the digits run exactly as ``metaif train`` ships it (MLP 64x2,
1,000 steps) instead: about twice the cost per retraining.

Measured CPU seconds of one retraining (one thread; ``--time-retraining``): digits 10,
MNIST 17, Omniglot 8; 760 retrainings in all (50 x 3 + 2 per dataset and unit), about 2.3
CPU hours, 1.2 hours of wall time with ``--n-jobs 2`` on an idle 2-core machine, plus
scoring and the evaluation of ``f`` (an estimate, not a measurement: the benchmark was not
run here).

Every configuration uses one torch thread and the CPU. ``M = 50`` subsets keeping half
the units, ``R = 3`` retrainings each (batch orders; the first is the run's own), shared
by every method of a dataset and unit (``lds.retrain_dir``), so the retrainings are paid once.
Writes ``fidelity.csv`` (default ``scripts/results/fidelity.csv``): one row per dataset,
unit and method with the LDS, its 95% bootstrap interval, the noise ceiling, their ratio,
the null band of an unrelated prediction, the scoring seconds and the spread of ``f``.

Usage:
    python scripts/bench_fidelity.py --data-root /work/shared/data --n-jobs 2      # the full benchmark
    python scripts/bench_fidelity.py --quick --out /tmp/fid                         # smoke run (digits, tiny)
    python scripts/bench_fidelity.py --time-retraining --data-root /work/shared/data # time one retraining each
Rerunning resumes: finished trainings, retrainings and scorings are skipped. ``--collect`` runs
nothing and rebuilds the table from the LDS runs already in ``--out``.

Each row also holds its LDS minus the default's (``if`` with the Gauss-Newton Hessian, 5
checkpoints and damping 0.1 of the largest eigenvalue) with a paired bootstrap interval (the same resampled subsets score both): the
test of "beats" and "tied" used in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metaif_cli.io import load_json, save_csv, save_json  # noqa: E402
from metaif_cli.reports.lds import paired_difference_ci  # noqa: E402

log = logging.getLogger("bench_fidelity")

CPU = ["device=cpu", "threads=1", "progress=false", "optim.eval_every=100", "optim.checkpoint_every=100",
       "optim.num_checkpoints=5"]
CONFIGS = {
    "digits": ["dataset=digits", "model.hidden=32", "model.layers=1", "optim.steps=300",
               "optim.meta_batch_size=16"],
    "mnist": ["dataset=mnist", "data.root={data_root}", "dataset.shots=1", "dataset.num_train_tasks=100",
              "dataset.num_test_tasks=200", "model.hidden=32", "model.layers=1", "optim.steps=300",
              "optim.meta_batch_size=16"],
    "omniglot": ["dataset=omniglot", "data.root={data_root}", "dataset.num_train_tasks=200", "dataset.rotations=true",
                 "dataset.num_test_tasks=200", "dataset.image_size=28", "model.hidden=64", "model.layers=1",
                 "meta.inner_steps=1", "meta.inner_lr=0.4", "meta.eval_inner_steps=3", "optim.steps=300",
                 "optim.meta_batch_size=16"],
}
QUICK = ["dataset.num_train_tasks=12", "dataset.num_val_tasks=5", "dataset.num_test_tasks=10", "model.hidden=8",
         "optim.steps=10", "optim.meta_batch_size=4", "optim.eval_every=5", "optim.checkpoint_every=2",
         "optim.num_checkpoints=5"]
UNITS = {"digits": ["task", "support", "query"], "mnist": ["task"], "omniglot": ["task"]}
# one command per scoring variant (name, score overrides, methods); the first also scores every
# baseline and the trajectory derivative on the same retrainings
VARIANTS = [("exact", ["score.hessian.form=exact", "score.ensemble.checkpoints=1"],
             ["random", "loss", "grad_sim", "tracin", "direct_if", "if", "trajectory"]),
            ("no_third_order", ["score.hessian.form=no_third_order", "score.ensemble.checkpoints=1"], ["if"]),
            ("gamma", ["score.hessian.form=gamma", "score.ensemble.checkpoints=1"], ["if"]),
            ("gauss_newton", ["score.hessian.form=gauss_newton", "score.ensemble.checkpoints=1",
                              "score.hessian.damping=0.01"], ["if"]),
            ("exact-ens5", ["score.hessian.form=exact", "score.ensemble.checkpoints=5"], ["if"]),
            ("gauss_newton-ens5", ["score.hessian.form=gauss_newton", "score.ensemble.checkpoints=5",
                                   "score.hessian.damping=0.01"], ["if"]),
            ("gauss_newton-ens5-damping0.1", ["score.hessian.form=gauss_newton", "score.ensemble.checkpoints=5",
                                              "score.hessian.damping=0.1"], ["if"])]
DEFAULT_VARIANT = "gauss_newton-ens5-damping0.1"  # what metaif score's defaults compute for method=if
COLUMNS = ["dataset", "unit", "method", "hessian_form", "ensemble_checkpoints", "damping", "lds", "lds_ci_low", "lds_ci_high", "ceiling",
           "lds_over_ceiling", "null_band", "scoring_seconds", "num_subsets", "seeds", "fraction",
           "sd_f_full_over_seeds", "sd_target_across_subsets", "num_units", "retrain_seconds", "train_seconds",
           "test_acc", "diff_vs_default", "diff_ci_low", "diff_ci_high"]


def metaif(args: list[str], log_path: Path) -> None:
    """Run one ``metaif`` command (single-threaded), its output in ``log_path``; stop on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        fh.write("metaif " + " ".join(args) + "\n")
        fh.flush()
        proc = subprocess.run([sys.executable, "-m", "metaif_cli.cli", *args], cwd=REPO, env=env, stdout=fh,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"metaif {' '.join(args)} failed (exit {proc.returncode}); see {log_path}")
    log.info("%.0f s: metaif %s", time.perf_counter() - t0, " ".join(args))


def train_overrides(dataset: str, data_root: str, quick: bool, default_digits: bool = False) -> list[str]:
    config = ["dataset=digits"] if dataset == "digits" and default_digits else CONFIGS[dataset]
    return [o.format(data_root=data_root) for o in config] + CPU + (QUICK if quick else [])


def train_run(dataset: str, out: Path, data_root: str, quick: bool, default_digits: bool = False) -> Path:
    run = out / dataset / ("run-default" if dataset == "digits" and default_digits else "run")
    metaif(["train", *train_overrides(dataset, data_root, quick, default_digits), f"hydra.run.dir={run}"],
           out / "logs" / f"{dataset}-train.log")
    return run


def run_lds(dataset: str, unit: str, run: Path, out: Path, args) -> None:
    """The LDS commands of one dataset and unit, one per scoring variant (finished retrainings are reused)."""
    for variant, overrides, methods in VARIANTS:
        if args.baselines and variant == "exact":
            methods = methods + ["ekfac_if", "trak"]
        lds_dir = out / dataset / f"lds-{unit}-{variant}"
        metaif(["prune-and-retrain", f"run={run}", "protocol=lds", f"unit={unit}", f"methods=[{','.join(methods)}]",
                f"lds.num_subsets={args.subsets}", f"lds.seeds={args.seeds}", f"lds.fraction={args.fraction}",
                f"lds.retrain_dir={out / dataset / 'retrains'}", *overrides, f"seed={args.seed}",
                f"launcher={args.launcher}", f"n_jobs={args.n_jobs}", "progress=false", f"hydra.run.dir={lds_dir}"],
               out / "logs" / f"{dataset}-{unit}-{variant}.log")


def subset_predictions(lds_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """``lds_subsets.csv`` of one LDS run: the seed-averaged target ``[M]`` and one ``pred_<method>`` column per method."""
    frame = pd.read_csv(lds_dir / "lds_subsets.csv").groupby("subset").mean(numeric_only=True).sort_index()
    return frame["target"].to_numpy(), frame


def lds_rows(dataset: str, unit: str, run: Path, out: Path) -> list[dict]:
    """Rows of ``fidelity.csv`` for one dataset and unit, from the finished LDS runs in ``out``.

    Every row also gets ``diff_vs_default`` = its LDS minus the default's (``if``, Gauss-Newton,
    5 checkpoints), with the 95% interval of that difference over the same bootstrap resamples
    of the subsets (paired); a difference whose interval holds 0 is a tie.
    """
    rows = []
    results_json = load_json(run / "results.json")
    default_dir = out / dataset / f"lds-{unit}-{DEFAULT_VARIANT}"
    target, default = subset_predictions(default_dir) if default_dir.exists() else (None, None)
    for variant, overrides, _ in VARIANTS:
        form = overrides[0].split("=")[1]
        ensemble = int(overrides[1].split("=")[1])
        damping = float(overrides[2].split("=")[1]) if len(overrides) > 2 else None
        lds_dir = out / dataset / f"lds-{unit}-{variant}"
        if not (lds_dir / "lds_results.csv").exists():
            continue
        table = pd.read_csv(lds_dir / "lds_results.csv")
        preds = subset_predictions(lds_dir)[1]
        summary = load_json(lds_dir / "lds_summary.json")
        for rec in table.to_dict("records"):
            is_if = rec["method"] == "if"
            rows.append({**rec, "dataset": dataset, "hessian_form": form if is_if else "",
                         "ensemble_checkpoints": ensemble if is_if else 1,
                         "damping": damping if is_if else None,
                         "null_band": summary["null_band"], "sd_f_full_over_seeds": summary["sd_f_full_over_seeds"],
                         "sd_target_across_subsets": summary["sd_target_across_subsets"],
                         "num_units": summary["num_units"], "retrain_seconds": summary["retrain_seconds"],
                         "train_seconds": results_json["train_seconds"], "test_acc": results_json["test_acc"]})
            if default is not None:
                diff = paired_difference_ci(preds[f"pred_{rec['method']}"].to_numpy(), default["pred_if"].to_numpy(),
                                            target, num=1000, seed=0)
                rows[-1].update(diff_vs_default=diff[0], diff_ci_low=diff[1], diff_ci_high=diff[2])
    return rows


def markdown(table: pd.DataFrame) -> str:
    """The docs/results.md table: LDS [interval], ceiling, ratio, difference to the default [paired interval], scoring seconds."""
    lines = ["| dataset | unit | method | LDS [95% CI] | ceiling | LDS/ceiling | null band | minus default [95% CI] | "
             "scoring s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        ens = f", {r.ensemble_checkpoints} checkpoints" if r.ensemble_checkpoints > 1 else ""
        ens += f", damping {r.damping:g}" if pd.notna(r.damping) else ""
        name = f"if ({r.hessian_form}{ens})" if r.method == "if" else r.method
        diff = "" if pd.isna(r.diff_vs_default) else f"{r.diff_vs_default:+.2f} [{r.diff_ci_low:+.2f}, {r.diff_ci_high:+.2f}]"
        lines.append(f"| {r.dataset} | {r.unit} | {name} | {r.lds:.2f} [{r.lds_ci_low:.2f}, {r.lds_ci_high:.2f}] | "
                     f"{r.ceiling:.2f} | {r.lds_over_ceiling:.2f} | +-{r.null_band:.2f} | {diff} | {r.scoring_seconds:.1f} |")
    return "\n".join(lines) + "\n"


def time_retraining(dataset: str, run: Path, out: Path) -> dict:
    """Wall and CPU seconds of one cold retraining (task 0 removed) of ``run``, in this process, one thread."""
    import torch

    from metaif_cli.prune.launch import launch
    from metaif_cli.prune.units import Unit
    from metaif_cli.prune.update import retrain_job
    from metaif_cli.score.run import load_run

    torch.set_num_threads(1)
    loaded = load_run(run)
    where = out / dataset / "timing-retrain"
    if where.exists():
        import shutil

        shutil.rmtree(where)
    t0, c0 = time.perf_counter(), time.process_time()
    result = launch([retrain_job(loaded, [Unit("task", 0)], where)])[0]
    return {"dataset": dataset, "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "train_loop_seconds": result["train_seconds"], "steps": result["steps"],
            "load_average": os.getloadavg()[0]}


def estimate(timings: list[dict], args) -> dict:
    """Retrainings and the CPU hours they take (scoring and ``f`` come on top, a few percent)."""
    per_unit = args.subsets * args.seeds + args.seeds - 1
    total, seconds = 0, 0.0
    for t in timings:
        n = per_unit * len(UNITS[t["dataset"]])
        total += n
        seconds += n * t["cpu_seconds"]
    return {"retrainings": total, "cpu_hours": seconds / 3600, "wall_hours_at_n_jobs": seconds / 3600 / args.n_jobs,
            "n_jobs": args.n_jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_fidelity")
    parser.add_argument("--results", type=Path, default=None, help="fidelity.csv (default scripts/results/, "
                        "or <out>/fidelity.csv with --quick)")
    parser.add_argument("--data-root", default=os.environ.get("METAIF_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--datasets", default=None, help="comma-separated (default: digits,mnist,omniglot; "
                        "--quick: digits)")
    parser.add_argument("--units", default=None, help="restrict the units (comma-separated)")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launcher", default="joblib")
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--baselines", action="store_true", help="also ekfac_if and trak (kronfluence, traker)")
    parser.add_argument("--default-digits", action="store_true", help="digits as metaif train ships it")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny digits run, 3 subsets x 2 seeds, "
                        "task units")
    parser.add_argument("--collect", action="store_true", help="run nothing: rebuild the table from the finished "
                        "LDS runs in --out (every dataset and unit present)")
    parser.add_argument("--time-retraining", action="store_true", help="train the runs, time one retraining "
                        "of each, estimate the full benchmark; no LDS")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.subsets, args.seeds = min(args.subsets, 3), min(args.seeds, 2)
    datasets = (args.datasets or ("digits" if args.quick else "digits,mnist,omniglot")).split(",")
    units = args.units.split(",") if args.units else None
    if args.quick and units is None:
        units = ["task"]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.time_retraining:
        timings = [time_retraining(d, train_run(d, args.out, args.data_root, args.quick, args.default_digits),
                                   args.out) for d in datasets]
        report = {"timings": timings, "estimate": estimate(timings, args), "subsets": args.subsets,
                  "seeds": args.seeds}
        save_json(report, args.out / "retrain_timing.json")
        print(json.dumps(report, indent=2))
        return
    rows = []
    t0 = time.perf_counter()
    for dataset in datasets:
        if args.collect:
            run = args.out / dataset / "run"
            if not run.exists():
                continue
        else:
            run = train_run(dataset, args.out, args.data_root, args.quick, args.default_digits)
        for unit in UNITS[dataset]:
            if units is None or unit in units:
                if not args.collect:
                    run_lds(dataset, unit, run, args.out, args)
                rows.extend(lds_rows(dataset, unit, run, args.out))
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    results = args.results or (args.out / "fidelity.csv" if args.quick else REPO / "scripts" / "results" / "fidelity.csv")
    save_csv(table, results)
    print(markdown(table))
    print(f"{len(table)} rows in {results} after {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
