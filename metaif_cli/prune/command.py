"""``metaif prune-and-retrain run=<train run dir>``: remove harmful data and retrain (SPEC sections 5-6)."""

from __future__ import annotations

from metaif_cli.hydra_app import output_dir, quiet_libraries, run_hydra_app, save_hydra_config, to_typed
from metaif_cli.prune.config import PruneConfig
from metaif_cli.prune.pipeline import prune_and_retrain
from metaif_cli.prune.report import compact, loo_summary

SCHEMAS = {"prune_schema": PruneConfig}


def _task(cfg) -> None:
    quiet_libraries()
    out = prune_and_retrain(to_typed(cfg), output_dir(), save_hydra_config)
    table = out["results"]
    if out["protocol"] == "remove":
        print(compact(table))
    else:
        for mode, s in loo_summary(table).items():
            print(f"{mode:>5}: Pearson {s['pearson']:.3f}  Spearman {s['spearman']:.3f}  "
                  f"sign {s['sign_agreement']:.2f}  cos(delta_lam) {s['cos_delta_lam_median']:.3f}  n={s['n']}")
    print(f"outputs in {output_dir()}")


def main() -> None:
    run_hydra_app(_task, "prune_and_retrain", "prune-and-retrain", SCHEMAS)
