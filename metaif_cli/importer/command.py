"""``metaif import run_dir=<new> weights=<state_dict file> [model=... dataset=... meta=... optim...]``:
the Hydra entry point of the ``importer`` command package (method §1).
"""

from __future__ import annotations

from metaif_cli.hydra_app import output_dir, quiet_libraries, run_hydra_app, save_hydra_config, to_typed
from metaif_cli.importer.config import ImportConfig
from metaif_cli.importer.run import import_run

SCHEMAS = {"import_schema": ImportConfig}


def _task(cfg) -> None:
    quiet_libraries()
    typed = to_typed(cfg)
    results = import_run(typed, output_dir(), save_hydra_config)
    print(f"meta-test accuracy {results['test_acc']:.4f} +- {results['test_acc_ci95']:.4f}; "
          f"run directory {output_dir()}")


def main() -> None:
    run_hydra_app(_task, "import", "import", SCHEMAS)
