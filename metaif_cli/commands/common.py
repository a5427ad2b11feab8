"""Helpers shared by the command modules: typed configs out of Hydra, the run directory."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf



def to_typed(cfg: DictConfig) -> object:
    """Resolve interpolations and build the dataclass tree (runs ``__post_init__`` checks)."""
    return OmegaConf.to_object(cfg)


def output_dir() -> Path:
    """This Hydra job's run directory."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def quiet_libraries() -> None:
    """Keep third-party loggers at WARNING so metaif's own INFO lines stay readable."""
    for name in ("matplotlib", "PIL", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
