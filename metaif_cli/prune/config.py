"""Typed configuration of ``metaif prune-and-retrain`` (method §5-6; ``lds.*``: method §5, LDS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from metaif_cli.checks import choice, in_range, integer, non_empty, positive
from metaif_cli.errors import MetaifError
from metaif_cli.score.config import METHODS, RunDataConfig, ScoreConfig


LDS_VARY = ("batch_order", "init", "both")


@dataclass
class LdsConfig:
    """``protocol=lds``: the linear datamodeling score (method §5; :mod:`metaif_cli.prune.lds`).

    ``num_subsets`` random subsets (M) each keep a ``fraction`` (alpha) of the units; each is
    retrained ``seeds`` times (R), varying the meta-batch order, the initialisation or both
    (``vary``); the first retraining keeps the run's own. ``bootstrap``: resamples of the
    subsets for the 95% interval. ``retrain_dir``: where the retrainings live (null:
    ``lds-retrains/`` beside the output directory, shared by every method and rerun).
    """

    num_subsets: int = 50
    fraction: float = 0.5
    seeds: int = 3
    vary: str = "batch_order"
    bootstrap: int = 1000
    retrain_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:  # also refuses NaN
            raise MetaifError(f"lds.fraction={self.fraction} is not valid; it is the fraction of units each subset "
                              "keeps and must lie strictly between 0 and 1, e.g. lds.fraction=0.5")
        if not self.seeds >= 1:
            raise MetaifError(f"lds.seeds={self.seeds} is not valid; retrain each subset at least once (lds.seeds=3 "
                              "gives a noise ceiling)")
        if not self.num_subsets >= 3:
            raise MetaifError(f"lds.num_subsets={self.num_subsets} is not valid; a rank correlation across subsets "
                              "needs at least 3 (50 is the default)")
        if not self.bootstrap >= 1:
            raise MetaifError(f"lds.bootstrap={self.bootstrap} is not valid; it must be >= 1 (default 1000)")
        choice("lds.vary", self.vary, LDS_VARY)
        for key in ("seeds", "num_subsets", "bootstrap"):
            integer(f"lds.{key}", getattr(self, key))


@dataclass
class RetrainConfig:
    """How retrainings are executed (:mod:`metaif_cli.prune.launch`); no number depends on it.

    ``batch``: retrainings of the run trained together in one process as a stack of models
    (:mod:`metaif_cli.train.batched`; each launcher job runs one such batch); 1 trains them
    one at a time with the single-run loop; null (default): :data:`AUTO_BATCH` for ``model=mlp``
    (the best K measured by ``scripts/bench_retrain.py`` on the fidelity MLPs), 1 for ``cnn4``
    and custom models (not measured; their stacks take far more memory).
    """

    batch: Optional[int] = None

    def __post_init__(self) -> None:
        if self.batch is not None:
            integer("retrain.batch", self.batch, minimum=1)

    def size_for(self, model: str) -> int:
        """The batch size used for a run of ``model`` (``model.name``)."""
        if self.batch is not None:
            return self.batch
        return AUTO_BATCH if model == "mlp" else 1


AUTO_BATCH = 64  # scripts/results/bench_retrain.csv: the fastest K on the digits fidelity MLP


@dataclass
class PruneConfig:
    """Root of ``metaif prune-and-retrain`` (``conf/prune_and_retrain/prune_and_retrain.yaml``)."""

    run: str = "???"
    data: RunDataConfig = field(default_factory=RunDataConfig)
    scores: Optional[str] = None
    protocol: str = "remove"
    unit: str = "task"
    # sized for a first look (3 retrainings); the paper's E1 grid is experiment=e1_tasks
    methods: list[str] = field(default_factory=lambda: ["if", "random", "loss"])
    fractions: list[float] = field(default_factory=lambda: [0.2])
    update: str = "retrain"
    grad_ascent_steps: int = 5
    grad_ascent_lr: float = 1e-3
    retrain_subset: Optional[int] = None
    num_units: int = 20
    loo_modes: list[str] = field(default_factory=lambda: ["cold", "warm"])
    warm_steps: int = 200
    retrain_seeds: int = 1
    lds: LdsConfig = field(default_factory=LdsConfig)
    launcher: str = "sequential"
    n_jobs: int = 2
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        choice("protocol", self.protocol, ("remove", "loo", "lds"))
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
        integer("retrain_seeds", self.retrain_seeds, minimum=1)
        if self.retrain_seeds > 1 and self.update != "retrain" and self.protocol == "remove":
            raise MetaifError(f"retrain_seeds={self.retrain_seeds} applies to update=retrain only; "
                              f"update={self.update} does not retrain")
        if self.retrain_seeds > 1 and self.protocol == "lds":
            raise MetaifError(f"retrain_seeds={self.retrain_seeds} applies to protocol=remove and loo; protocol=lds "
                              f"retrains every subset lds.seeds times: use lds.seeds={self.retrain_seeds}")
