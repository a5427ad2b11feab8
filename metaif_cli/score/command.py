"""``metaif score run=<train run dir>``: task- and instance-influence scores (method §2-4)."""

from __future__ import annotations

from metaif_cli.hydra_app import output_dir, quiet_libraries, run_hydra_app, save_hydra_config, to_typed
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.pipeline import score

SCHEMAS = {"score_schema": ScoreConfig}


def _task(cfg) -> None:
    quiet_libraries()
    score(to_typed(cfg), output_dir(), save_hydra_config)


def main() -> None:
    run_hydra_app(_task, "score", "score", SCHEMAS)
