"""Batch and group norm written with primitive tensor ops (method §1, "Known trap").

``torch.nn.functional.batch_norm`` gives wrong third-order derivatives (and wrong
meta-gradients under ``vmap``); these compute mean and variance explicitly, always from the
batch at hand (transductive, as in MAML), and keep no running buffers. Used by the built-in
networks and by the conversion of a user's network (:mod:`metaif_cli.models.custom`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BatchNormPrimitive(nn.Module):
    """Batch norm over (N, H, W) from mean and variance, safe under higher-order autodiff."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        shape = [1, -1] + [1] * (x.ndim - 2)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


class GroupNormPrimitive(nn.Module):
    """Group norm from mean and variance per (sample, group), safe under higher-order autodiff."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        g = x.reshape(n, self.groups, -1)  # [N, G, C/G * H * W]
        mean = g.mean(dim=-1, keepdim=True)
        var = ((g - mean) ** 2).mean(dim=-1, keepdim=True)
        x = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        shape = [1, -1] + [1] * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)
