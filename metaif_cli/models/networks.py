"""Networks as pure functions of a parameter dict (method §1, "Known trap").

``build_model`` returns an ``nn.Module`` whose parameters are named ``body.*`` (feature
extractor) and ``head.*`` (linear classifier). The meta-learners never mutate it: they
call :func:`features` and :func:`logits` with a parameter dict through
``torch.func.functional_call``. Normalisation layers are written with primitive tensor
ops because ``torch.nn.functional.batch_norm`` gives wrong third-order derivatives and
wrong meta-gradients under ``vmap``; they always use the statistics of the batch at
hand (transductive, as in MAML) and keep no running buffers.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaif_cli.errors import MetaifError
from metaif_cli.models.config import ModelConfig
from metaif_cli.models.norms import BatchNormPrimitive, GroupNormPrimitive

Params = dict[str, Tensor]


def _norm(cfg: ModelConfig, channels: int) -> nn.Module:
    if cfg.norm == "batch":
        return BatchNormPrimitive(channels)
    if cfg.norm == "group":
        return GroupNormPrimitive(cfg.groups, channels)
    return nn.Identity()


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus, "tanh": nn.Tanh}
_POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def _cnn_body(cfg: ModelConfig, in_channels: int) -> nn.Sequential:
    """``cfg.layers`` blocks of conv3x3-norm-activation with max or average pooling (or stride 2,
    MAML's Omniglot net)."""
    blocks: list[nn.Module] = []
    channels = in_channels
    for _ in range(cfg.layers):
        stride = 2 if cfg.pool == "stride" else 1
        blocks += [nn.Conv2d(channels, cfg.hidden, 3, stride=stride, padding=1), _norm(cfg, cfg.hidden),
                   _ACTIVATIONS[cfg.activation]()]
        if cfg.pool in _POOLS:
            blocks.append(_POOLS[cfg.pool](2, ceil_mode=True))
        channels = cfg.hidden
    blocks.append(nn.Flatten())
    return nn.Sequential(*blocks)


def _mlp_body(cfg: ModelConfig, in_features: int) -> nn.Sequential:
    blocks: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(cfg.layers):
        blocks += [nn.Linear(width, cfg.hidden), _norm(cfg, cfg.hidden), _ACTIVATIONS[cfg.activation]()]
        width = cfg.hidden
    return nn.Sequential(*blocks)


class MetaModel(nn.Module):
    """``body`` (features) followed by a linear ``head`` (one logit per way)."""

    def __init__(self, body: nn.Module, feature_dim: int, ways: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def parameter_count(cfg: ModelConfig, image_shape: tuple[int, int, int], ways: int) -> int:
    """The number of parameters ``build_model`` would allocate for ``mlp`` or ``cnn4`` (computed, not built)."""
    c, h, w = image_shape
    norm = 2 * cfg.hidden if cfg.norm != "none" else 0
    if cfg.name == "cnn4":
        body = (9 * c * cfg.hidden + cfg.hidden + norm) + (cfg.layers - 1) * (9 * cfg.hidden ** 2 + cfg.hidden + norm)
        for _ in range(cfg.layers):  # max-pool (ceil) and stride 2 (padding 1) both halve, rounding up
            h, w = -(-h // 2), -(-w // 2)
        features = cfg.hidden * h * w
    else:
        body = (c * h * w * cfg.hidden + cfg.hidden + norm) + (cfg.layers - 1) * (cfg.hidden ** 2 + cfg.hidden + norm)
        features = cfg.hidden
    return body + features * ways + ways


def physical_memory() -> int | None:
    """Bytes of memory of this machine (None when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_size(cfg: ModelConfig, image_shape: tuple[int, int, int], ways: int) -> None:
    """Refuse, before allocating, a built-in network whose parameters alone exceed this machine's memory."""
    count, memory = parameter_count(cfg, image_shape, ways), physical_memory()
    if memory is not None and 4 * count > memory:
        raise MetaifError(f"model.hidden={cfg.hidden} with model.layers={cfg.layers} gives {count:.3g} parameters "
                          f"({4 * count / 2**30:.3g} GiB in float32), more than this machine's memory "
                          f"({memory / 2**30:.3g} GiB); lower model.hidden or model.layers")


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int], ways: int, seed: int) -> MetaModel:
    """Build the network with parameters drawn from ``seed`` (float32, CPU); ``custom``: the user's factory.

    The size of a built-in network is checked before anything is allocated (:func:`check_size`).
    """
    if cfg.name == "custom":
        from metaif_cli.models.custom import build_custom

        if not cfg.factory:
            raise MetaifError("model=custom needs model.factory=package.module:make_net (and model.kwargs, model.head)")
        return build_custom(cfg.factory, cfg.kwargs, cfg.head, image_shape, ways, seed)  # type: ignore[return-value]
    check_size(cfg, image_shape, ways)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c, h, w = image_shape
        body = _cnn_body(cfg, c) if cfg.name == "cnn4" else _mlp_body(cfg, c * h * w)
        with torch.no_grad():
            feature_dim = body(torch.zeros(2, c, h, w)).shape[1]
        return MetaModel(body, feature_dim, ways)


def params_of(model: nn.Module, dtype: torch.dtype, device: torch.device) -> Params:
    """The model's parameters as a plain dict of detached tensors (the meta-parameters ``lam``)."""
    return {k: v.detach().to(device=device, dtype=dtype).clone() for k, v in model.named_parameters()}


def split_params(params: Mapping[str, Tensor]) -> tuple[Params, Params]:
    """Split a parameter dict into its ``body.*`` and ``head.*`` parts (prefixes kept)."""
    body = {k: v for k, v in params.items() if k.startswith("body.")}
    head = {k: v for k, v in params.items() if k.startswith("head.")}
    return body, head


def features(model: MetaModel, body_params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Body forward pass with ``body.*`` parameters: ``[B, C, H, W] -> [B, D]``."""
    stripped = {k[len("body."):]: v for k, v in body_params.items()}
    return functional_call(model.body, stripped, (x,))


def head_logits(head_params: Mapping[str, Tensor], feats: Tensor) -> Tensor:
    """Linear head ``[B, D] -> [B, ways]`` from ``head.weight`` and ``head.bias``."""
    return feats @ head_params["head.weight"].T + head_params["head.bias"]


def logits(model: MetaModel, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Full forward pass with a parameter dict: ``[B, C, H, W] -> [B, ways]``."""
    body, head = split_params(params)
    return head_logits(head, features(model, body, x))
