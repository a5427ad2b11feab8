"""Typed configuration: the dataclasses behind every YAML file in ``conf/``.

Hydra composes ``conf/<command>.yaml`` on top of these schemas (registered in the
ConfigStore by :func:`register_configs`), so a misspelt key or a wrong type fails at
composition. Library code receives these dataclasses, never a raw DictConfig
(STYLE, lightning-hydra-template). Value checks live in ``__post_init__`` and raise
:class:`~metaif_cli.errors.MetaifError` with the fix in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from metaif_cli.errors import MetaifError

DATASETS = ("digits", "omniglot", "mnist", "miniimagenet")
MODELS = ("mlp", "cnn4")
NORMS = ("batch", "group", "none")
META = ("maml", "anil", "imaml")


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise MetaifError(f"{name}={value!r} is not valid; choose one of: {', '.join(options)}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise MetaifError(f"{name}={value} is not valid; it must be {bound}")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise MetaifError(f"{name}={value} is not valid; it must be in [0, 1)")


@dataclass
class DataConfig:
    """Where datasets live: ``root`` is ``$METAIF_DATA`` or ``./data``; processed copies go to
    ``cache`` (``$METAIF_CACHE`` or ``./.cache/metaif``)."""

    root: str = "${oc.env:METAIF_DATA,./data}"
    cache: str = "${oc.env:METAIF_CACHE,.cache/metaif}"


@dataclass
class DatasetConfig:
    """The dataset and the few-shot tasks drawn from it (SPEC section 1)."""

    name: str = "digits"
    ways: int = 5
    shots: int = 1
    queries: int = 5
    num_train_tasks: int = 200
    num_val_tasks: int = 50
    num_test_tasks: int = 200
    split_by: str = "class"
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    image_size: Optional[int] = None
    rotations: bool = False
    download: bool = False

    def __post_init__(self) -> None:
        _choice("dataset.name", self.name, DATASETS)
        _choice("dataset.split_by", self.split_by, ("class", "instance"))
        for key in ("ways", "shots", "queries", "num_train_tasks", "num_val_tasks", "num_test_tasks"):
            _positive(f"dataset.{key}", getattr(self, key))
        if self.ways < 2:
            raise MetaifError(f"dataset.ways={self.ways} is not valid; a task needs at least 2 classes")
        if len(self.split_fractions) != 3 or any(f <= 0 for f in self.split_fractions):
            raise MetaifError("dataset.split_fractions must be three positive numbers (train, val, test)")


@dataclass
class CorruptionConfig:
    """Label corruption for the harmful-data experiments (SPEC section 6).

    ``task_mode``: ``permute`` shuffles the labels among a task's instances (support and
    query independently), ``replace`` gives every instance a random wrong label, ``shift``
    keeps the support and labels every query instance of class ``c`` as ``c + 1`` (a
    consistent wrong rule, which meta-training learns: the most harmful of the three). Instance
    corruption flips single labels to a random wrong one in the roles listed.
    """

    task_fraction: float = 0.0
    task_mode: str = "replace"
    instance_fraction: float = 0.0
    instance_roles: list[str] = field(default_factory=lambda: ["support", "query"])

    def __post_init__(self) -> None:
        _fraction("corruption.task_fraction", self.task_fraction)
        _fraction("corruption.instance_fraction", self.instance_fraction)
        _choice("corruption.task_mode", self.task_mode, ("permute", "replace", "shift"))
        for role in self.instance_roles:
            _choice("corruption.instance_roles", role, ("support", "query"))


@dataclass
class ModelConfig:
    """The network: ``mlp`` or ``cnn4`` (parameters named ``body.*`` and ``head.*``)."""

    name: str = "mlp"
    hidden: int = 64
    layers: int = 2
    norm: str = "none"
    groups: int = 4
    pool: str = "max"

    def __post_init__(self) -> None:
        _choice("model.name", self.name, MODELS)
        _choice("model.norm", self.norm, NORMS)
        _choice("model.pool", self.pool, ("max", "stride"))
        _positive("model.hidden", self.hidden)
        _positive("model.layers", self.layers)
        if self.norm == "group" and self.hidden % self.groups:
            raise MetaifError(f"model.groups={self.groups} must divide model.hidden={self.hidden}")


@dataclass
class MetaConfig:
    """The meta-learner and its inner level (SPEC section 1).

    ``inner_lr`` is the step ``alpha``; ``eta`` the proximal strength of iMAML;
    ``cg_iters`` the fixed number of conjugate-gradient steps iMAML's meta-gradient uses.
    """

    name: str = "maml"
    first_order: bool = False
    inner_steps: int = 5
    inner_lr: float = 0.5
    eval_inner_steps: Optional[int] = None
    eta: float = 1.0
    cg_iters: int = 10
    vmap: bool = True

    def __post_init__(self) -> None:
        _choice("meta.name", self.name, META)
        _positive("meta.inner_lr", self.inner_lr)
        _positive("meta.inner_steps", self.inner_steps)
        _positive("meta.eta", self.eta)
        _positive("meta.cg_iters", self.cg_iters)
        if self.name == "imaml" and self.first_order:
            raise MetaifError("meta.first_order applies to maml/anil only; iMAML's meta-gradient is implicit")

    @property
    def mode(self) -> str:
        """``implicit`` for iMAML, ``unrolled`` for MAML and ANIL (SPEC section 1)."""
        return "implicit" if self.name == "imaml" else "unrolled"


@dataclass
class OptimConfig:
    """The outer loop: meta-batches, the optimiser and checkpointing."""

    steps: int = 1000
    meta_batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    delta_reg: float = 0.0
    eval_every: int = 100
    num_checkpoints: int = 5
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        _positive("optim.steps", self.steps)
        _positive("optim.meta_batch_size", self.meta_batch_size)
        _positive("optim.lr", self.lr)
        _positive("optim.delta_reg", self.delta_reg, allow_zero=True)
        _positive("optim.eval_every", self.eval_every)
        _positive("optim.num_checkpoints", self.num_checkpoints, allow_zero=True)
        _positive("optim.checkpoint_every", self.checkpoint_every)
        _choice("optim.optimizer", self.optimizer, ("adam", "sgd"))


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

    def __post_init__(self) -> None:
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("dtype", self.dtype, ("float32", "float64"))
        if self.threads is not None:
            _positive("threads", self.threads)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (called by the command layer only)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    from metaif_cli.score_config import register_score_configs

    register_score_configs(cs)
