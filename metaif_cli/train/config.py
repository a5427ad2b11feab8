"""Typed configuration of ``metaif train`` (method §1): the outer loop and the root config.

Hydra composes ``conf/train/train.yaml`` on top of :class:`TrainConfig` (registered in the
ConfigStore by the command layer), so a misspelt key or a wrong type fails at
composition. Library code receives these dataclasses, never a raw DictConfig
(STYLE, lightning-hydra-template). Value checks live in ``__post_init__`` and raise
:class:`~metaif_cli.errors.MetaifError` with the fix in the message. The parts of the
config owned by the core live beside the code that uses them: :mod:`metaif_cli.data.config`,
:mod:`metaif_cli.models.config`, :mod:`metaif_cli.meta.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from metaif_cli.errors import MetaifError
from metaif_cli.checks import at_most, choice, integer, positive
from metaif_cli.data.config import CorruptionConfig, DataConfig, DatasetConfig
from metaif_cli.meta.config import MetaConfig
from metaif_cli.models.config import ModelConfig
from metaif_cli.train.loggers import LoggerConfig


@dataclass
class OptimConfig:
    """The outer loop: meta-batches, the optimiser and checkpointing.

    ``batch_seed``: seed of the meta-batch order alone (null: the run's ``seed``), so that
    batch-order noise can be measured with the pool and the initialisation held fixed.
    """

    steps: int = 1000
    meta_batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    delta_reg: float = 0.0
    eval_every: int = 100
    num_checkpoints: int = 5
    checkpoint_every: int = 100
    batch_seed: Optional[int] = None

    def __post_init__(self) -> None:
        for key in ("steps", "meta_batch_size", "eval_every", "checkpoint_every"):
            integer(f"optim.{key}", getattr(self, key), minimum=1)
        integer("optim.num_checkpoints", self.num_checkpoints, minimum=0)
        if self.batch_seed is not None:
            integer("optim.batch_seed", self.batch_seed, minimum=0)
        positive("optim.lr", self.lr)
        positive("optim.delta_reg", self.delta_reg, allow_zero=True)
        choice("optim.optimizer", self.optimizer, ("adam", "sgd"))

    def checkpoint_note(self, kept: list[int]) -> str | None:
        """A line saying where checkpoints land when ``checkpoint_every`` suggests other steps (None: they agree).

        ``num_checkpoints`` decides the kept checkpoints (evenly spaced); ``checkpoint_every`` only how often
        the resume state is saved: the two are independent, and a user who set both must be told which wins.
        """
        if len(kept) < self.num_checkpoints:  # e.g. debug=fast's 2 with optim.steps=1: resolved, and said
            return (f"optim.num_checkpoints={self.num_checkpoints} but optim.steps={self.steps} has room for "
                    f"{len(kept)}: keeping checkpoints at steps {', '.join(map(str, kept))}")
        if all(step % self.checkpoint_every == 0 for step in kept):
            return None
        return (f"optim.num_checkpoints={self.num_checkpoints} keeps checkpoints at steps "
                f"{', '.join(map(str, kept))} (evenly spaced over optim.steps={self.steps}); "
                f"optim.checkpoint_every={self.checkpoint_every} only sets how often the resume state "
                "(checkpoint_last.pt) and metrics.csv are saved")


@dataclass
class TrainConfig:
    """Root of ``metaif train`` (``conf/train/train.yaml``)."""

    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    threads: Optional[int] = None
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        choice("device", self.device, ("auto", "cpu", "cuda"))
        choice("dtype", self.dtype, ("float32", "float64"))
        integer("seed", self.seed, minimum=0)
        if self.threads is not None:
            integer("threads", self.threads, minimum=1)
        largest = 3.4028234663852886e38 if self.dtype == "float32" else 1.7976931348623157e308
        for name, value in (("optim.lr", self.optim.lr), ("optim.delta_reg", self.optim.delta_reg),
                            ("meta.inner_lr", self.meta.inner_lr), ("meta.eta", self.meta.eta)):
            if isinstance(value, (int, float)) and abs(value) > largest:  # a step would overflow the parameters
                raise MetaifError(f"{name}={value} does not fit in dtype={self.dtype} (largest {largest:.4g}); "
                                  "use a usual value, e.g. optim.lr=1e-3")
        at_most("optim.meta_batch_size", self.optim.meta_batch_size, self.dataset.num_train_tasks,
                "the training pool (dataset.num_train_tasks)",
                "lower optim.meta_batch_size or raise dataset.num_train_tasks")

    @property
    def batch_seed(self) -> int:
        """Seed of the meta-batch order: ``optim.batch_seed``, else ``seed``."""
        return self.seed if self.optim.batch_seed is None else self.optim.batch_seed

    @property
    def init_seed(self) -> int:
        """Seed of the initialisation: ``model.init_seed``, else ``seed``."""
        return self.seed if self.model.init_seed is None else self.model.init_seed
