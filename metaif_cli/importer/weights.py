"""Read a ``state_dict`` saved elsewhere and fit it to a metaif model (``lam``; method §1).

Accepted: a plain ``model.state_dict()``, learn2learn's ``MAML(model).state_dict()`` (every key
prefixed ``module.``), ``torch.nn.DataParallel``'s (also ``module.``), or a dict holding one under
``state_dict``/``model_state_dict``. Files are read with ``torch.load(weights_only=True)``: a
pickle that would run code is refused. A dict that does not fit the network is refused with its
missing and unexpected keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from metaif_cli.models.config import ModelConfig
from metaif_cli.errors import MetaifError
from metaif_cli.meta.params import Params, non_finite

PREFIXES = ("module.", "_orig_mod.")  # learn2learn MAML / DataParallel, torch.compile
NESTED = ("state_dict", "model_state_dict", "model")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load ``path`` safely and unwrap it to a flat ``{name: tensor}`` with wrapper prefixes removed.

    Raises:
        MetaifError: the file is missing, not loadable with ``weights_only=True``, or holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MetaifError(f"weights={path} does not exist; pass the file saved with torch.save(model.state_dict())")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or unsafe file
        raise MetaifError(f"weights={path} cannot be read with torch.load(weights_only=True) "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); save a plain "
                          "state_dict: torch.save(model.state_dict(), path)") from None
    for key in NESTED:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise MetaifError(f"weights={path} holds no state dict of tensors; save torch.save(model.state_dict(), path)")
    bad = non_finite(obj)
    if bad:
        raise MetaifError(f"weights={path} holds NaN or infinite values (in {bad[0]}): the weights diverged; "
                          "import weights saved before the divergence")
    return strip_prefixes(obj)


def strip_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove a wrapper's prefix shared by every key (``module.`` of learn2learn's ``MAML``)."""
    sd = dict(state_dict)
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _refuse(missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        parts.append(f"wrong shapes: {', '.join(shapes)}")
    if parts:
        raise MetaifError("the state dict does not fit model=... ; " + "; ".join(parts)
                          + "; pass the model settings it was trained with")


def fit_builtin(model: nn.Module, sd: Mapping[str, Tensor]) -> Params:
    """``lam`` of a built-in network (``body.*``/``head.*``) from a state dict with the same names,
    converted explicitly to the dtype of ``model`` (the run's ``dtype``: float64 weights stay float64)."""
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(p.shape)}" for k, p in expected.items()
              if k in sd and sd[k].shape != p.shape]
    _refuse(missing, unexpected, shapes)
    return {k: sd[k].detach().to(dtype=p.dtype, copy=True) for k, p in expected.items()}  # the run's dtype


def fit_custom(cfg: ModelConfig, sd: Mapping[str, Tensor], image_shape: tuple[int, int, int], ways: int,
               seed: int, dtype: torch.dtype = torch.float32) -> Params:
    """``lam`` of a ``model=custom`` network: load ``sd`` into the user's network, then convert it.

    The network is moved to ``dtype`` (the run's) before loading, so the weights are converted
    once, explicitly, to the run's dtype (float64 weights stay float64 in a float64 run). Norm
    layers are converted after loading, so their affine state comes from ``sd`` (running
    statistics, which metaif does not use, must be present if the network has them).
    """
    from metaif_cli.models.custom import BATCH_NORMS, build_user_net, wrap_user_net

    if not cfg.factory:
        raise MetaifError("model=custom needs model.factory=package.module:make_net (and model.kwargs, model.head)")
    net = build_user_net(cfg.factory, cfg.kwargs, seed).to(dtype)
    expected = net.state_dict()
    # running statistics of batch norms are optional: metaif normalises with batch statistics
    unused = {f"{name}.{b}" for name, m in net.named_modules() if isinstance(m, BATCH_NORMS)
              for b, _ in m.named_buffers(recurse=False)}
    missing = sorted(set(expected) - set(sd) - unused)
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(t.shape)}" for k, t in expected.items()
              if k in sd and sd[k].shape != t.shape]
    _refuse(missing, unexpected, shapes)
    net.load_state_dict(sd, strict=False)
    model = wrap_user_net(net, cfg.head, image_shape, ways)
    return {k: v.detach().clone() for k, v in model.named_parameters()}
