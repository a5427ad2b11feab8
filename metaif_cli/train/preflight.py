"""Checks ``metaif train`` makes before it writes anything (method §1: a run directory holds
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
from metaif_cli.checks import available_memory, differing_keys, fits
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_json, load_torch, resolved_path, save_json
from metaif_cli.train.config import TrainConfig
from metaif_cli.train.experiment import config_dict, config_from_dict

# memory per instance row: the pools (~140 B) and tasks.csv (~70 B), measured on digits (20,000 tasks), doubled
BYTES_PER_INSTANCE = 400
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


def record_data(run_dir: Path, dataset) -> None:
    """Write ``data_fingerprint.json``: the content fingerprint of the images the run is trained on."""
    save_json({"dataset": dataset.name, "fingerprint": dataset.fingerprint, "num_images": len(dataset.labels),
               "num_classes": dataset.num_classes}, run_dir / C.DATA_FINGERPRINT_JSON)


def check_data(run_dir: Path, dataset, root: str, fix: str) -> None:
    """Refuse images that differ from those the run in ``run_dir`` recorded (no record: an older run, accepted)."""
    path = run_dir / C.DATA_FINGERPRINT_JSON
    if not path.exists():
        return
    saved = load_json(path, f"delete it to accept the data as it is now, or {fix}", keys=("fingerprint",))
    if saved["fingerprint"] != dataset.fingerprint:
        raise MetaifError(f"the {dataset.name} images under data.root={root} differ from those {run_dir} was trained "
                          f"on (data fingerprint {str(saved['fingerprint'])[:12]} in {C.DATA_FINGERPRINT_JSON}, "
                          f"{dataset.fingerprint[:12]} now); {fix}")


def check_run_dir(run_dir: Path, cfg: TrainConfig, dataset=None) -> None:
    """Refuse, before writing, a ``run_dir`` that holds a run with other settings than ``cfg``
    (or, given the loaded ``dataset``, that was started on other images)."""
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
    if dataset is not None:
        check_data(run_dir, dataset, cfg.data.root, "restore the data the run started on, or train into another "
                   "hydra.run.dir")


def check_sizes(dataset) -> None:
    """Refuse, before building anything, task pools too large for this machine's memory (``dataset``:
    the :class:`~metaif_cli.data.config.DatasetConfig`)."""
    tasks = dataset.num_train_tasks + dataset.num_val_tasks + dataset.num_test_tasks
    rows = tasks * dataset.ways * (dataset.shots + dataset.queries)
    fits(f"task pools of {tasks} tasks ({rows} instances in tasks.csv)", rows * BYTES_PER_INSTANCE,
         available_memory(), "memory", "use fewer tasks (dataset.num_train_tasks, num_val_tasks, num_test_tasks) "
         "or fewer ways, shots or queries")
