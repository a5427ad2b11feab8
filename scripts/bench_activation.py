"""What smooth training costs: meta-test accuracy of each ``model.activation`` (issue 20).

A smooth network (``gelu``, ``softplus``, ``tanh`` instead of ``relu``) gives a training map
without kinks, so that a first-order prediction of a retraining (docs/method.md section 5,
(5.4)) can be near exact. This script measures what it costs in meta-test accuracy on the
fidelity configurations of ``scripts/bench_fidelity.py`` (digits and MNIST: an MLP with one
hidden layer of 32, 300 Adam steps, 100 training tasks, 5-way 1-shot), trained through the
command line with ``--seeds`` initialisations and batch orders (``seed=0,1,...``) per activation.

Writes ``bench_activation.csv`` (one row per dataset, activation and seed: ``test_acc``,
``test_loss``, ``train_seconds``) and ``bench_activation_summary.csv`` (per dataset and activation:
mean accuracy over seeds with its Student-t 95% interval, and the paired difference to ``relu``
over the same seeds with its interval; a difference whose interval holds 0 is a tie).

Usage:
    python scripts/bench_activation.py --data-root /work/shared/data              # digits and MNIST, 3 seeds
    python scripts/bench_activation.py --datasets digits --seeds 2 --out /tmp/act  # smaller
Reruns skip finished trainings (``metaif train`` resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_fidelity import CONFIGS, CPU, metaif  # noqa: E402

from metaif_cli.io import save_csv  # noqa: E402
from metaif_cli.reports.intervals import mean_ci95  # noqa: E402

ACTIVATIONS = ("relu", "gelu", "softplus", "tanh")


def mean_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and its Student-t 95% interval ``(mean, low, high)``."""
    mean, half = mean_ci95(values)
    return mean, mean - half, mean + half


def train(dataset: str, activation: str, seed: int, out: Path, data_root: str) -> dict:
    """Train one run (or find it finished) and return its ``results.json`` figures."""
    run = out / dataset / f"{activation}-seed{seed}"
    overrides = [o.format(data_root=data_root) for o in CONFIGS[dataset]] + CPU
    metaif(["train", *overrides, f"model.activation={activation}", f"seed={seed}", f"hydra.run.dir={run}"],
           out / "logs" / f"{dataset}-{activation}-{seed}.log")
    res = json.loads((run / "results.json").read_text())
    return {"dataset": dataset, "activation": activation, "seed": seed, "test_acc": res["test_acc"],
            "test_loss": res["test_loss"], "train_seconds": res["train_seconds"]}


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy per dataset and activation, and the paired difference to ``relu`` (same seeds)."""
    out = []
    for (dataset, activation), g in rows.groupby(["dataset", "activation"], sort=False):
        relu = rows[(rows.dataset == dataset) & (rows.activation == "relu")].set_index("seed").test_acc
        acc = g.set_index("seed").test_acc
        mean, low, high = mean_ci(acc.to_numpy())
        diff = (acc - relu.reindex(acc.index)).to_numpy()
        d_mean, d_low, d_high = mean_ci(diff) if activation != "relu" else (0.0, 0.0, 0.0)
        verdict = "tie" if d_low <= 0 <= d_high else ("better" if d_low > 0 else "worse")
        out.append({"dataset": dataset, "activation": activation, "seeds": len(acc), "test_acc": mean,
                    "test_acc_ci_low": low, "test_acc_ci_high": high, "diff_vs_relu": d_mean,
                    "diff_ci_low": d_low, "diff_ci_high": d_high,
                    "verdict_vs_relu": "-" if activation == "relu" else verdict,
                    "train_seconds": float(g.train_seconds.mean())})
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_activation")
    parser.add_argument("--results", type=Path, default=REPO / "scripts" / "results")
    args = parser.parse_args()
    rows = pd.DataFrame([train(d, a, s, args.out, args.data_root) for d in args.datasets.split(",")
                         for a in ACTIVATIONS for s in range(args.seeds)])
    summary = summarise(rows)
    save_csv(rows, args.results / "bench_activation.csv")
    save_csv(summary, args.results / "bench_activation_summary.csv")
    with pd.option_context("display.width", 200, "display.precision", 4):
        print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
