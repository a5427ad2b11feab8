"""Typed configuration of ``metaif prune-and-retrain`` (SPEC sections 5-6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from metaif_cli.checks import choice, positive
from metaif_cli.errors import MetaifError
from metaif_cli.score.config import METHODS, ScoreConfig


@dataclass
class PruneConfig:
    """Root of ``metaif prune-and-retrain`` (``conf/prune_and_retrain.yaml``)."""

    run: str = "???"
    scores: Optional[str] = None
    protocol: str = "remove"
    unit: str = "task"
    methods: list[str] = field(default_factory=lambda: ["if", "random", "loss", "direct_if", "grad_sim",
                                                          "tracin", "oracle"])
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5])
    update: str = "retrain"
    grad_ascent_steps: int = 5
    grad_ascent_lr: float = 1e-3
    retrain_subset: Optional[int] = None
    num_units: int = 20
    loo_modes: list[str] = field(default_factory=lambda: ["cold", "warm"])
    warm_steps: int = 200
    launcher: str = "sequential"
    n_jobs: int = 2
    score: ScoreConfig = field(default_factory=ScoreConfig)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        choice("protocol", self.protocol, ("remove", "loo"))
        choice("unit", self.unit, ("task", "support", "query"))
        choice("update", self.update, ("retrain", "edit", "grad_ascent"))
        choice("launcher", self.launcher, ("sequential", "joblib", "submitit"))
        for m in self.methods:
            choice("methods", m, METHODS + ("oracle", "retrain"))
        for f in self.fractions:
            if not 0 < f < 1:
                raise MetaifError(f"fractions must lie in (0, 1); got {f}")
        for m in self.loo_modes:
            choice("loo_modes", m, ("cold", "warm"))
        positive("num_units", self.num_units)
        positive("warm_steps", self.warm_steps)
