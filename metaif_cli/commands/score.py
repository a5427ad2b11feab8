"""``metaif score run=<train run dir>``: task- and instance-influence scores (SPEC sections 2-4)."""

from __future__ import annotations

from metaif_cli.cli import run_hydra_app
from metaif_cli.commands.common import output_dir, quiet_libraries, to_typed
from metaif_cli.score_pipeline import score


def _task(cfg) -> None:
    quiet_libraries()
    score(to_typed(cfg), output_dir())


def main() -> None:
    run_hydra_app(_task, "score", "score")
