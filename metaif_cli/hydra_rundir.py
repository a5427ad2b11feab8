"""The run directory a refused command leaves behind: Hydra creates it before metaif's checks run,
so a Hydra callback records whether it existed and what it held, and a refusal removes only what
this invocation created (issue 21, kind 2; docs/design.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

HYDRA_SUBDIR = ".hydra"

_BEFORE: dict[str, frozenset[str] | None] = {}  # directory -> its entries before Hydra ran (None: absent)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.1
    _HydraCallback = object  # type: ignore[assignment,misc]


def _record(config: DictConfig, key: str) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        HydraConfig.instance().set_config(config)  # run_job sets it too, right after this callback
        folder = Path(os.path.abspath(str(OmegaConf.select(config, key))))  # as Hydra's runtime.output_dir
    except Exception:  # an unresolvable directory fails in Hydra itself, with its own message
        return
    _BEFORE[str(folder)] = frozenset(p.name for p in folder.iterdir()) if folder.is_dir() else None


class RunDirRecord(_HydraCallback):
    """Hydra callback (``hydra.callbacks.run_dir`` in every root config): records, before Hydra
    creates the run directory (the sweep directory under ``-m``), whether it existed and what it
    held, so that a refused command removes only what it created (:func:`remove_if_only_hydra`)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _record(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _record(config, "hydra.sweep.dir")


def _entries_before(run_dir: Path) -> frozenset[str] | None | bool:
    """What ``run_dir`` held before this command: its entries, None (created now) or False (unknown)."""
    key = os.path.abspath(run_dir)
    if key in _BEFORE:
        return _BEFORE[key]
    parent = _BEFORE.get(os.path.dirname(key), False)  # a job of a sweep
    if parent is None or (parent is not False and run_dir.name not in parent):
        return None
    return False


def remove_if_only_hydra() -> None:
    """After a refused command, remove what it created and nothing else.

    A run directory this invocation created, holding nothing but Hydra's own files (``.hydra/``,
    the job log), is deleted; in a directory that existed before, only the job log Hydra opened
    is removed, when it is new and nothing else was added. A directory whose history is unknown
    (no record of the ``run_dir`` callback) is left as it is.
    """
    import shutil

    from hydra.core.hydra_config import HydraConfig

    try:
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
    except ValueError:  # no Hydra context: nothing was created
        return
    if not run_dir.is_dir() or Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        return
    before = _entries_before(run_dir)
    log_name = f"{hydra_cfg.job.name}.log"
    if before is None:
        if all(p.name in (HYDRA_SUBDIR, log_name) for p in run_dir.iterdir()):
            logging.shutdown()  # the job log is open
            shutil.rmtree(run_dir, ignore_errors=True)
    elif before is not False:
        added = {p.name for p in run_dir.iterdir()} - before
        if added == {log_name} and (run_dir / log_name).is_file():
            logging.shutdown()
            (run_dir / log_name).unlink(missing_ok=True)
