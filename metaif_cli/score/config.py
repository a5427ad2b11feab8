"""Typed configuration of ``metaif score`` (method §2-4): the root config, shard and unit
references, and the settings that determine the scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from metaif_cli.checks import choice, in_range, integer, positive
from metaif_cli.errors import MetaifError
from metaif_cli.io import resolved_path
from metaif_cli.influence.baseline_config import EkfacConfig, TrakConfig
from metaif_cli.influence.config import EvaluationConfig, HessianConfig, SolverConfig
from metaif_cli.influence.trajectory import TrajectoryConfig

UNITS = ("task", "instance", "all")
METHODS = ("if", "random", "loss", "direct_if", "grad_sim", "tracin", "ekfac_if", "trak", "trajectory")


@dataclass
class EnsembleConfig:
    """``checkpoints``: average the scores at the final point and the last ``checkpoints - 1``
    saved checkpoints (1: the final point only; refused when the run kept fewer).

    ``null`` (the default): ``method=if`` averages over the final point and up to
    ``DEFAULT_IF_CHECKPOINTS - 1`` = 4 saved checkpoints before it, as many as the run kept (the
    setting chosen by the LDS benchmark, docs/results.md "Fidelity"); every other method scores at the
    final point alone.
    """

    checkpoints: Optional[int] = None

    def __post_init__(self) -> None:
        if self.checkpoints is not None:
            integer("ensemble.checkpoints", self.checkpoints, minimum=1)


@dataclass
class RunDataConfig:
    """Where the run's images are read from now: ``root``/``cache`` replace the run's own
    ``data.root``/``data.cache`` (null: the run's), e.g. for a run copied from another machine.
    The images found must be those the run was trained on (their fingerprint is checked)."""

    root: Optional[str] = None
    cache: Optional[str] = None

    def __post_init__(self) -> None:
        for key in ("root", "cache"):
            value = getattr(self, key)
            if value is not None and not str(value).strip():
                raise MetaifError(f"data.{key}= is empty; pass a folder, or leave it out to use the run's own")


@dataclass
class ScoreConfig:
    """Root of ``metaif score`` (``conf/score/score.yaml``).

    ``ensemble.checkpoints``, ``runs``: average the scores over several points or runs of the
    same pool (:mod:`metaif_cli.score.ensemble`).
    ``chunk``: tasks per vmapped call in every pass over tasks; memory grows with it. ``auto``
    (the default): as many as ``chunk_budget_mb`` holds for this model, at most 32
    (:mod:`metaif_cli.influence.chunking`); a number is used as given.
    ``factory``: a ``model=custom`` run's factory (``module:function`` or ``file.py:function``), named
    by the user: a run directory only names its factory for checking, it never chooses code to import.
    """

    run: str = "???"
    data: RunDataConfig = field(default_factory=RunDataConfig)
    unit: str = "all"
    method: str = "if"
    derivative: str = "auto"
    support_third_order: bool = True
    hessian: HessianConfig = field(default_factory=HessianConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    ekfac: EkfacConfig = field(default_factory=EkfacConfig)
    trak: TrakConfig = field(default_factory=TrakConfig)
    inner_solver: str = "cg"
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    runs: list[str] = field(default_factory=list)
    inner_tol: float = 1e-8
    inner_max_iter: int = 200
    chunk: Any = "auto"  # "auto" or a whole number (Any: Hydra takes both)
    chunk_budget_mb: float = 1024.0
    pred_delta_lam: list[str] = field(default_factory=list)
    shard: Optional[str] = None
    seed: int = 0
    device: Optional[str] = None
    dtype: Optional[str] = None
    factory: Optional[str] = None
    overwrite: bool = False
    plots: bool = True
    grid_size: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        choice("unit", self.unit, UNITS)
        choice("method", self.method, METHODS)
        choice("derivative", self.derivative, ("auto", "unrolled", "implicit"))
        choice("inner_solver", self.inner_solver, ("cg", "ekfac"))
        if self.chunk != "auto":
            if isinstance(self.chunk, str) and self.chunk.strip().isdigit():
                self.chunk = int(self.chunk)
            if isinstance(self.chunk, bool) or not isinstance(self.chunk, int):
                raise MetaifError(f"chunk={self.chunk!r} is not valid; use chunk=auto or a whole number such as chunk=8")
            integer("chunk", self.chunk, minimum=1)
        positive("chunk_budget_mb", self.chunk_budget_mb)
        integer("seed", self.seed, minimum=0)
        integer("grid_size", self.grid_size, minimum=1)
        integer("inner_max_iter", self.inner_max_iter, minimum=1)
        in_range("inner_tol", self.inner_tol, 0.0, 1.0, low_open=True, high_open=True)
        if not str(self.run).strip():
            raise MetaifError("run= is empty; pass run=<a directory written by metaif train>")
        if self.device is not None:
            choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.dtype is not None:
            choice("dtype", self.dtype, ("float32", "float64"))
        if self.shard is not None:
            parse_shard(self.shard)
        for unit in self.pred_delta_lam:
            parse_unit_ref(unit)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/k"`` -> ``(i, k)`` with ``0 <= i < k``."""
    try:
        i, k = (int(p) for p in str(text).split("/"))
    except ValueError:
        i, k = -1, 0
    if not 0 <= i < k:
        raise MetaifError(f"shard={text!r} is not valid; write shard=i/k with 0 <= i < k, e.g. shard=0/4")
    return i, k


def parse_unit_ref(text: str) -> tuple[str, int, str | None, int | None]:
    """``task:K`` or ``support:K:J`` / ``query:K:J`` (task K, position J) -> parts."""
    parts = str(text).split(":")
    try:
        if parts[0] == "task" and len(parts) == 2:
            return "task", int(parts[1]), None, None
        if parts[0] in ("support", "query") and len(parts) == 3:
            return "instance", int(parts[1]), parts[0], int(parts[2])
    except ValueError:
        pass
    raise MetaifError(f"unit reference {text!r} is not valid; write task:K, support:K:J or query:K:J")


def settings_of(cfg: ScoreConfig) -> dict:
    """The settings that determine the scores (saved beside them and checked on reuse)."""
    # where the data is read from does not change the scores (the run's data fingerprint is checked)
    ignore = {"overwrite", "progress", "plots", "shard", "pred_delta_lam", "grid_size", "chunk", "chunk_budget_mb",
              "factory", "data"}
    # a library baseline's settings matter only to that method
    ignore |= {key for key, method in (("ekfac", "ekfac_if"), ("trak", "trak")) if cfg.method != method}
    if cfg.method != "trajectory":
        ignore.add("trajectory")
    out = {k: v for k, v in asdict(cfg).items() if k not in ignore}
    # ensembles: recorded only when used, so single-point settings files stay as they were
    if out["ensemble"] == asdict(EnsembleConfig()):
        del out["ensemble"]
    if not out["runs"]:
        del out["runs"]
    out["run"] = resolved_path(cfg.run)  # a relative path or a trailing slash names the same run
    return out
