"""Read a finished training run (``model.pt``, ``results.json``) and refuse a diverged one (method
§1: the run directory is the interface between commands; section 3: scores are taken at
a finite trained ``lam``).
"""

from __future__ import annotations

import math
from pathlib import Path

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_json, load_torch
from metaif_cli.meta.params import non_finite


def require_finite_run(run_dir: Path, model: dict, results: object) -> None:
    """Refuse a run whose parameters or metrics are NaN or infinite (it diverged: nothing may use it)."""
    bad = non_finite(model.get("lam") or {}) if isinstance(model.get("lam"), dict) else []
    metrics = results if isinstance(results, dict) else {}
    bad += [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise MetaifError(f"{run_dir} holds a diverged run ({bad[0]} is not finite); retrain it with a lower "
                          "optim.lr or meta.inner_lr into a new directory")


def load_trained(run_dir: Path) -> dict:
    """Read ``model.pt`` of a finished run, or explain what is missing."""
    path = run_dir / C.MODEL_PT
    if not run_dir.is_dir():
        raise MetaifError(f"run directory {run_dir} does not exist; pass run=<a directory written by metaif train>")
    if not path.exists() or not (run_dir / C.RESULTS_JSON).exists():
        raise MetaifError(f"{run_dir} holds no finished training run ({C.MODEL_PT} or {C.RESULTS_JSON} missing); "
                          "finish it by rerunning the same metaif train command")
    saved = load_torch(path, f"rerun the metaif train command that wrote {run_dir} to rewrite it",
                       keys=("config", "lam", "model_args"))
    results = load_json(run_dir / C.RESULTS_JSON, f"rerun the metaif train command that wrote {run_dir} to "
                        "rewrite it")
    require_finite_run(run_dir, saved, results)
    if saved.get("format_version") != C.FORMAT_VERSION:
        raise MetaifError(f"{path} was written by an incompatible metaif version "
                          f"(format {saved.get('format_version')}, expected {C.FORMAT_VERSION}); retrain it")
    return saved
