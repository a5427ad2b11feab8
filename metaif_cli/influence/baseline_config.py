"""Settings of the library baselines ``ekfac_if`` (kronfluence) and ``trak`` (traker), method §4.

Both are typed, validated on construction (NaN and ranges) and raise one-line
:class:`~metaif_cli.errors.MetaifError` messages that name the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from metaif_cli.errors import MetaifError

EKFAC_STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


def _finite_positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    ok = value is not None and not (isinstance(value, float) and math.isnan(value)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise MetaifError(f"{name}={value} is not valid; it must be a finite number {bound}")


@dataclass
class EkfacConfig:
    """``method=ekfac_if``: kronfluence's EK-FAC influence without the inner level.

    ``strategy``: kronfluence's Hessian approximation (``ekfac`` is the paper's baseline;
    ``kfac``, ``diagonal``, ``identity`` for ablations). ``damping``: added to the EK-FAC
    eigenvalues, on top of the run's ``optim.delta_reg`` (the outer L2, part of ``H``);
    ``null`` uses kronfluence's heuristic, 0.1 x the mean eigenvalue of each layer (then
    ``delta_reg`` is not added). ``use_empirical_fisher``: observed labels instead of labels
    sampled from the model (the true Fisher, kronfluence's default). ``max_examples``:
    fit the factors on at most this many query instances (null = all).
    """

    strategy: str = "ekfac"
    damping: Optional[float] = None
    use_empirical_fisher: bool = False
    max_examples: Optional[int] = None

    def __post_init__(self) -> None:
        if self.strategy not in EKFAC_STRATEGIES:
            raise MetaifError(f"ekfac.strategy={self.strategy!r} is not valid; choose one of: "
                              f"{', '.join(EKFAC_STRATEGIES)}")
        if self.damping is not None:
            _finite_positive("ekfac.damping", self.damping, allow_zero=True)
        if self.max_examples is not None:
            _finite_positive("ekfac.max_examples", self.max_examples)


@dataclass
class TrakConfig:
    """``method=trak``: TRAK through traker, without the inner level.

    ``proj_dim``: dimension of the random projection of the per-instance gradients (lowered
    to the number of parameters or of training instances when larger: ``X^T X`` would be
    singular). ``num_checkpoints``: models averaged, the final ``lam`` plus the latest
    ``num_checkpoints - 1`` checkpoints saved by training (``optim.num_checkpoints``).
    ``lambda_reg``: ridge term added to ``X^T X`` (traker's ``lambda_reg``).
    """

    proj_dim: int = 512
    num_checkpoints: int = 1
    lambda_reg: float = 0.0

    def __post_init__(self) -> None:
        _finite_positive("trak.proj_dim", self.proj_dim)
        _finite_positive("trak.num_checkpoints", self.num_checkpoints)
        _finite_positive("trak.lambda_reg", self.lambda_reg, allow_zero=True)
        for key in ("proj_dim", "num_checkpoints"):
            if int(getattr(self, key)) != getattr(self, key):
                raise MetaifError(f"trak.{key}={getattr(self, key)} is not valid; it must be an integer")
