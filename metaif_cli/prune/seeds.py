"""Seed-averaged retraining: the batch orders and initialisations of repeated retrainings (method §5).

A retraining repeated ``R`` times varies the meta-batch order (``optim.batch_seed``), the
initialisation (``model.init_seed``) or both (``vary=batch_order|init|both``), with the
task pool, the budget and everything else held at the trained run's values. Variant 0 is
the run's own configuration, unchanged: with ``R = 1`` a retraining is today's cold
retraining (same seed, same batch order, same initialisation). Variants ``1..R-1`` draw
their seeds from ``numpy.random.default_rng([seed, 7919])`` (``seed``: the prune seed), so
they are deterministic given ``seed`` and differ from the run's own and from each other.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import stats

from metaif_cli.errors import MetaifError
from metaif_cli.prune.launch import RetrainJob
from metaif_cli.train.config import TrainConfig

VARY = ("batch_order", "init", "both")
_STREAM = 7919  # separates the seed stream from the subset draws (which use ``seed`` alone)


@dataclass(frozen=True)
class SeedVariant:
    """Retraining ``index`` of ``R``: its batch and init seeds (None: the run's own)."""

    index: int
    batch_seed: int | None = None
    init_seed: int | None = None

    @property
    def tag(self) -> str:
        """``run`` for the run's own seeds, else ``b<batch>``, ``i<init>`` or ``b<batch>-i<init>``."""
        parts = [f"b{self.batch_seed}"] if self.batch_seed is not None else []
        parts += [f"i{self.init_seed}"] if self.init_seed is not None else []
        return "-".join(parts) or "run"

    @property
    def suffix(self) -> str:
        """``""`` for variant 0 (today's directory names), else ``-<tag>``."""
        return "" if self.index == 0 else f"-{self.tag}"

    def apply(self, config: dict) -> dict:
        """The saved training config with this variant's seeds (variant 0: ``config`` itself)."""
        if self.batch_seed is None and self.init_seed is None:
            return config
        out = copy.deepcopy(config)
        if self.batch_seed is not None:
            out["optim"]["batch_seed"] = self.batch_seed
        if self.init_seed is not None:
            out["model"]["init_seed"] = self.init_seed
        return out

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def seed_variants(train_cfg: TrainConfig, count: int, seed: int, vary: str = "batch_order") -> list[SeedVariant]:
    """``count`` variants: the run's own, then ``count - 1`` with fresh seeds drawn from ``seed``."""
    if vary not in VARY:
        raise MetaifError(f"vary={vary!r} is not valid; choose one of: {', '.join(VARY)}")
    rng = np.random.default_rng([seed, _STREAM])
    used = {"batch": {train_cfg.batch_seed}, "init": {train_cfg.init_seed}}

    def draw(kind: str) -> int:
        while True:
            value = int(rng.integers(0, 2**31 - 2))  # training seeds its generator with batch_seed + 1
            if value not in used[kind]:
                used[kind].add(value)
                return value

    out = [SeedVariant(0)]
    for r in range(1, count):
        batch = draw("batch") if vary in ("batch_order", "both") else None
        init = draw("init") if vary in ("init", "both") else None
        out.append(SeedVariant(r, batch, init))
    return out


def with_seeds(job: RetrainJob, variant: SeedVariant) -> RetrainJob:
    """``job`` with ``variant``'s seeds in its config."""
    return dataclasses.replace(job, config=variant.apply(job.config))


def mean_t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean, Student-t half-width and standard deviation (ddof=1) over seeds; half-width and sd NaN for one value."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan"), float("nan")
    sd = float(values.std(ddof=1))
    return mean, float(stats.t.ppf(0.5 + level / 2, values.size - 1) * sd / np.sqrt(values.size)), sd
