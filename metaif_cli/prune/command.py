"""``metaif prune-and-retrain run=<train run dir>``: remove harmful data and retrain (SPEC sections 5-6)."""

from __future__ import annotations

from metaif_cli.hydra_app import output_dir, quiet_libraries, run_hydra_app, save_hydra_config, to_typed
from metaif_cli.prune.config import PruneConfig
from metaif_cli.prune import lds
from metaif_cli.prune.pipeline import prune_and_retrain
from metaif_cli.prune.report import compact, loo_summary

SCHEMAS = {"prune_schema": PruneConfig}


def _task(cfg) -> None:
    quiet_libraries()
    out = prune_and_retrain(to_typed(cfg), output_dir(), save_hydra_config)
    table = out["results"]
    if out["protocol"] == "remove":
        print(compact(table))
        if "unpruned_test_acc_sd_seeds" in out:
            print(f"unpruned model: sd of test accuracy over {out['retrain_seeds']} batch orders "
                  f"{out['unpruned_test_acc_sd_seeds']:.4f}")
    elif out["protocol"] == "lds":
        print(lds.compact(table))
        sd_full = out["sd_f_full_over_seeds"]
        print(f"noise ceiling {out['ceiling'] if out['ceiling'] is not None else float('nan'):.3f}, null band "
              f"+-{out['null_band']:.3f} (M={out['num_subsets']}, R={out['seeds']}); sd of f: full pool over seeds "
              f"{'-' if sd_full is None else f'{sd_full:.4f}'}, across subsets {out['sd_target_across_subsets']:.4f}")
    else:
        for mode, s in loo_summary(table).items():
            print(f"{mode:>5}: Pearson {s['pearson']:.3f}  Spearman {s['spearman']:.3f}  "
                  f"sign {s['sign_agreement']:.2f}  cos(delta_lam) {s['cos_delta_lam_median']:.3f}  n={s['n']}")
    print(f"outputs in {output_dir()}")


def main() -> None:
    run_hydra_app(_task, "prune_and_retrain", "prune-and-retrain", SCHEMAS)
