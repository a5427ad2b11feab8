"""Typed configuration of the network (SPEC section 1): ``mlp`` or ``cnn4`` and their norms."""

from __future__ import annotations

from dataclasses import dataclass

from metaif_cli.checks import choice, integer
from metaif_cli.errors import MetaifError

MODELS = ("mlp", "cnn4")
NORMS = ("batch", "group", "none")


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
        choice("model.name", self.name, MODELS)
        choice("model.norm", self.norm, NORMS)
        choice("model.pool", self.pool, ("max", "stride"))
        integer("model.hidden", self.hidden, minimum=1)
        integer("model.layers", self.layers, minimum=1)
        integer("model.groups", self.groups, minimum=1)
        if self.norm == "group" and self.hidden % self.groups:
            raise MetaifError(f"model.groups={self.groups} must divide model.hidden={self.hidden}")
