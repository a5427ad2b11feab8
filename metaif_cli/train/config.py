"""Typed configuration of ``metaif train`` (SPEC section 1): the outer loop and the root config.

Hydra composes ``conf/train.yaml`` on top of :class:`TrainConfig` (registered in the
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

from metaif_cli.checks import choice, positive
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
        positive("optim.steps", self.steps)
        positive("optim.meta_batch_size", self.meta_batch_size)
        positive("optim.lr", self.lr)
        positive("optim.delta_reg", self.delta_reg, allow_zero=True)
        positive("optim.eval_every", self.eval_every)
        positive("optim.num_checkpoints", self.num_checkpoints, allow_zero=True)
        positive("optim.checkpoint_every", self.checkpoint_every)
        choice("optim.optimizer", self.optimizer, ("adam", "sgd"))


@dataclass
class TrainConfig:
    """Root of ``metaif train`` (``conf/train.yaml``)."""

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
        if self.threads is not None:
            positive("threads", self.threads)

    @property
    def batch_seed(self) -> int:
        """Seed of the meta-batch order: ``optim.batch_seed``, else ``seed``."""
        return self.seed if self.optim.batch_seed is None else self.optim.batch_seed

    @property
    def init_seed(self) -> int:
        """Seed of the initialisation: ``model.init_seed``, else ``seed``."""
        return self.seed if self.model.init_seed is None else self.model.init_seed
