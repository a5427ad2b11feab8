"""Checks ``metaif train`` makes before it writes anything (SPEC section 1: a run directory holds
one run).

A run directory that already holds a run with other settings is refused before a single
file is written into it (``train_config.json``, ``tasks.csv`` and ``class_split.json`` of the
finished run stay as they were). Settings are compared as the run would use them: display
options (``progress``, ``device``, ``logger``) are ignored and paths are compared resolved,
so ``data.root=data`` and ``data.root=./data/`` are the same setting.
"""

from __future__ import annotations

from pathlib import Path

from metaif_cli import constants as C
from metaif_cli.checks import differing_keys
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_json, load_torch, resolved_path
from metaif_cli.train.config import TrainConfig
from metaif_cli.train.experiment import config_dict, config_from_dict

DISPLAY_ONLY = ("progress", "device", "logger")  # they do not change the result
PATH_KEYS = (("data", "root"), ("data", "cache"))


def comparable(config: dict) -> dict:
    """A saved or current train config reduced to what determines the run."""
    out = {k: v for k, v in config.items() if k not in DISPLAY_ONLY}
    for section, key in PATH_KEYS:
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {**out[section], key: resolved_path(out[section][key])}
    return out


def with_defaults(saved: dict) -> dict:
    """A saved train config with the settings added since it was written at their defaults (a run
    trained before ``model.activation`` existed is a ReLU run); as saved when it cannot be rebuilt."""
    try:
        return config_dict(config_from_dict(saved))
    except (MetaifError, TypeError, ValueError):
        return saved


def saved_configs(run_dir: Path) -> list[tuple[Path, dict]]:
    """The train configs recorded in ``run_dir`` (``train_config.json`` and inside the ``.pt`` files)."""
    fix = f"delete {run_dir} or choose another hydra.run.dir"
    found = []
    path = run_dir / C.TRAIN_CONFIG_JSON
    if path.exists():
        found.append((path, load_json(path, fix)))
    for name in (C.MODEL_PT, C.CHECKPOINT_LAST, C.CHECKPOINT_PREV):
        path = run_dir / name
        if path.exists():
            try:
                found.append((path, load_torch(path, fix, keys=("config",))["config"]))
            except MetaifError:
                continue  # damaged: resume decides (falls back to the previous checkpoint, or says so)
    return found


def check_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse, before writing, a ``run_dir`` that holds a run with other settings than ``cfg``."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise MetaifError(f"hydra.run.dir={run_dir} is a file, not a directory; choose another hydra.run.dir")
    wanted = comparable(config_dict(cfg))
    for path, saved in saved_configs(run_dir):
        have = comparable(with_defaults(saved)) if isinstance(saved, dict) else {}
        if have != wanted:
            differ = differing_keys(have, wanted)
            raise MetaifError(f"{run_dir} holds a run with different settings ({', '.join(differ)} differ, per "
                              f"{path.name}); choose another hydra.run.dir or delete that directory")
