"""Typed configuration of ``metaif prune-and-retrain`` (SPEC sections 5-6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from metaif_cli.checks import choice, in_range, integer, non_empty, positive
from metaif_cli.errors import MetaifError
from metaif_cli.score.config import METHODS, ScoreConfig


@dataclass
class PruneConfig:
    """Root of ``metaif prune-and-retrain`` (``conf/prune_and_retrain/prune_and_retrain.yaml``)."""

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
        non_empty("methods", self.methods, "[if,random]")
        non_empty("fractions", self.fractions, "[0.1,0.2]")
        non_empty("loo_modes", self.loo_modes, "[cold,warm]")
        for f in self.fractions:
            in_range("fractions", f, 0.0, 1.0, low_open=True, high_open=True)
        for m in self.loo_modes:
            choice("loo_modes", m, ("cold", "warm"))
        integer("num_units", self.num_units, minimum=1)
        integer("warm_steps", self.warm_steps, minimum=1)
        integer("grad_ascent_steps", self.grad_ascent_steps, minimum=1)
        positive("grad_ascent_lr", self.grad_ascent_lr)
        integer("n_jobs", self.n_jobs, minimum=1)
        integer("seed", self.seed, minimum=0)
        if self.retrain_subset is not None:
            integer("retrain_subset", self.retrain_subset, minimum=1)
        if self.scores is not None and not str(self.scores).strip():
            raise MetaifError("scores= is empty; pass scores=<a metaif score directory> or leave it out")
        if len(set(self.methods)) != len(self.methods):
            raise MetaifError(f"methods={self.methods} names a method twice; list each once")
