"""Where ``metaif train`` sends its per-step metrics (method §1): the ``logger`` config group.

``logger=csv`` (default) is what metaif always did: ``metrics.csv`` in the run
directory, rewritten at every checkpoint. ``logger=tensorboard`` also writes event
files through :mod:`torch.utils.tensorboard` to ``<run>/tensorboard`` (or
``logger.log_dir``) for a live view of long runs (``tensorboard --logdir outputs/train``):
``train/loss`` and ``train/lr`` at every step, ``val/loss`` and ``val/acc`` at every
evaluation. A resumed run purges the events past its checkpoint, so each step is shown
once. ``metrics.csv`` is written with either logger (other commands and the plots read it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from metaif_cli.errors import MetaifError

log = logging.getLogger(__name__)

LOGGERS = ("csv", "tensorboard")
TAGS = {"train_loss": "train/loss", "lr": "train/lr", "val_loss": "val/loss", "val_acc": "val/acc"}
TENSORBOARD_DIR = "tensorboard"


@dataclass
class LoggerConfig:
    """``conf/logger/<name>.yaml``: ``name`` (csv or tensorboard) and, for tensorboard, ``log_dir``."""

    name: str = "csv"
    log_dir: Optional[str] = None  # tensorboard: default <run dir>/tensorboard

    def __post_init__(self) -> None:
        if self.name not in LOGGERS:
            raise MetaifError(f"logger={self.name!r} is not valid; choose one of: {', '.join(LOGGERS)}")


class MetricLogger:
    """Receives the metrics of each step; the csv logger needs nothing more than the loop's metrics.csv."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(MetricLogger):
    """Scalars to TensorBoard event files; ``start`` > 0 purges the events at or after it (resume)."""

    def __init__(self, log_dir: Path, start: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is a dependency; a trimmed environment may lack it
            raise MetaifError(f"logger=tensorboard needs the tensorboard package ({exc}); "
                              "pip install tensorboard, or use logger=csv") from exc
        log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(log_dir), purge_step=start + 1 if start else None)
        log.info("TensorBoard events in %s (tensorboard --logdir %s)", log_dir, log_dir)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if key in TAGS:
                self.writer.add_scalar(TAGS[key], float(value), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def make_logger(cfg: LoggerConfig, run_dir: Path, start: int = 0) -> MetricLogger:
    """The logger ``cfg`` names, for a run in ``run_dir`` resuming after step ``start``."""
    if cfg.name == "tensorboard":
        return TensorBoardLogger(Path(cfg.log_dir).expanduser() if cfg.log_dir else run_dir / TENSORBOARD_DIR,
                                 start)
    return MetricLogger()
