"""``metaif prune-and-retrain run=<train run dir>``: remove harmful data and retrain (method §5-6)."""

from __future__ import annotations

from metaif_cli.hydra_app import output_dir, quiet_libraries, run_hydra_app, save_hydra_config, to_typed
from metaif_cli.prune.config import PruneConfig
from metaif_cli.prune.pipeline import prune_and_retrain

SCHEMAS = {"prune_schema": PruneConfig}


def _task(cfg) -> None:
    """Run the protocol; its result table is logged (console and ``prune_and_retrain.log``) by the pipeline."""
    quiet_libraries()
    prune_and_retrain(to_typed(cfg), output_dir(), save_hydra_config)
    print(f"outputs in {output_dir()}")


def main() -> None:
    run_hydra_app(_task, "prune_and_retrain", "prune-and-retrain", SCHEMAS)
