"""Typed configuration of the meta-learner and its inner level (method §1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from metaif_cli.checks import choice, integer, positive
from metaif_cli.errors import MetaifError

META = ("maml", "anil", "imaml")


@dataclass
class MetaConfig:
    """The meta-learner and its inner level (method §1).

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
        choice("meta.name", self.name, META)
        positive("meta.inner_lr", self.inner_lr)
        integer("meta.inner_steps", self.inner_steps, minimum=1)
        if self.eval_inner_steps is not None:  # 0: evaluate the meta-parameters without adaptation
            integer("meta.eval_inner_steps", self.eval_inner_steps, minimum=0)
        positive("meta.eta", self.eta)
        integer("meta.cg_iters", self.cg_iters, minimum=1)
        if self.name == "imaml" and self.first_order:
            raise MetaifError("meta.first_order applies to maml/anil only; iMAML's meta-gradient is implicit")

    @property
    def mode(self) -> str:
        """``implicit`` for iMAML, ``unrolled`` for MAML and ANIL (method §1)."""
        return "implicit" if self.name == "imaml" else "unrolled"
