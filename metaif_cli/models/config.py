"""Typed configuration of the network (method §1): ``mlp`` or ``cnn4`` and their norms, or
``custom``: the user's factory (:mod:`metaif_cli.models.custom`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from metaif_cli.checks import choice, integer
from metaif_cli.errors import MetaifError

MODELS = ("mlp", "cnn4", "custom")
NORMS = ("batch", "group", "none")
# Nonlinearities: relu (the default, MAML's) and smooth ones, whose training map has no kinks, so
# that a first-order prediction of retraining (method §5, (5.4)) can be near exact.
ACTIVATIONS = ("relu", "gelu", "softplus", "tanh")
POOLS = ("max", "avg", "stride")


@dataclass
class ModelConfig:
    """The network: ``mlp``, ``cnn4`` (parameters named ``body.*`` and ``head.*``) or ``custom``.

    ``init_seed``: seed of the initialisation alone (null: the run's ``seed``). ``activation``: the
    nonlinearity after every hidden layer; ``pool``: cnn4's down-sampling (``max``, ``avg`` (smooth),
    or ``stride`` 2 convolutions).
    """

    name: str = "mlp"
    hidden: int = 64
    layers: int = 2
    norm: str = "none"
    groups: int = 4
    pool: str = "max"
    activation: str = "relu"
    factory: Optional[str] = None  # custom: "package.module:make_net" or "path/to/file.py:make_net"
    kwargs: Any = None  # custom: dict of keyword arguments of the factory (Any: Hydra can set it whole)
    head: str = "fc"  # custom: name of the final nn.Linear (adapted alone by ANIL)
    init_seed: Optional[int] = None

    def __post_init__(self) -> None:
        choice("model.name", self.name, MODELS)
        choice("model.norm", self.norm, NORMS)
        choice("model.pool", self.pool, POOLS)
        choice("model.activation", self.activation, ACTIVATIONS)
        integer("model.hidden", self.hidden, minimum=1)
        integer("model.layers", self.layers, minimum=1)
        integer("model.groups", self.groups, minimum=1)
        if self.init_seed is not None:
            integer("model.init_seed", self.init_seed, minimum=0)
        if self.kwargs is not None and not isinstance(self.kwargs, dict):
            raise MetaifError(f"model.kwargs={self.kwargs!r} must be a mapping, e.g. 'model.kwargs={{ways: 5}}'")
        where, _, attr = (self.factory or "").rpartition(":")
        if where.endswith(".py"):  # saved runs must find the file from any working directory
            self.factory = f"{Path(where).expanduser().resolve()}:{attr}"
        if self.norm == "group" and self.hidden % self.groups:
            raise MetaifError(f"model.groups={self.groups} must divide model.hidden={self.hidden}")
