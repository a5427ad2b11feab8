"""Per-instance outer functions: query losses and the accuracy-margin surrogate (method §1).

``instance_values(params, x, y, kind)`` returns one number per instance: the
cross-entropy (``mean_loss``, ``per_task``) or the margin ``max_{c != y} z_c - z_y``
(``margin``, lower is better like a loss, negative iff the instance is classified right).
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaif_cli.meta.learner import MetaLearner
from metaif_cli.meta.params import Params
from metaif_cli.models.networks import logits


def instance_values(learner: MetaLearner, params: Params, x: Tensor, y: Tensor, kind: str = "mean_loss") -> Tensor:
    """``[B]`` per-instance loss (or margin) at ``params``."""
    if kind != "margin":
        return learner.instance_losses(params, x, y)
    z = logits(learner.model, params, x)  # [B, ways]
    true = z.gather(-1, y[:, None]).squeeze(-1)
    is_true = torch.arange(z.shape[-1], device=z.device) == y[:, None]  # [B, ways]; vmap-safe, unlike one_hot
    wrong = z.masked_fill(is_true, float("-inf")).amax(-1)
    return wrong - true


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``(1/|Q|) sum_j v_j values_j`` with the fixed normaliser of method §1."""
    return (weights * values).sum() / weights.shape[-1]
