"""Your own network as a metaif model (``model=custom``; method §1, "Known trap").

``model.factory="package.module:make_net"`` (or ``"path/to/file.py:make_net"``) is imported
and called once with ``model.kwargs``; the ``nn.Module`` it returns becomes a
:class:`CustomMetaModel` whose parameters are named ``body.*`` (everything but the final
layer) and ``head.*`` (the final ``nn.Linear`` named by ``model.head``), so MAML, ANIL and
iMAML run it through ``torch.func.functional_call`` like the built-in networks.

``nn.BatchNorm{1,2,3}d`` and ``nn.GroupNorm`` are replaced by metaif's primitive norms with
their affine state copied (``torch.nn.functional.batch_norm`` gives wrong third-order
derivatives; running statistics are dropped: metaif normalises with the statistics of the
batch at hand, as MAML does). A layer not known to be safe under third-order autodiff is
refused with one line naming it.

A run directory records its factory for checking only (:func:`trusted_factory`): reading a run
imports the factory the user names on the command line (``factory=``) or one an installed
package registers as an entry point of group ``metaif.models``, never one named by the run
alone, so opening a crafted run directory cannot run code.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from metaif_cli.errors import MetaifError
from metaif_cli.models.norms import BatchNormPrimitive, GroupNormPrimitive

log = logging.getLogger(__name__)

# Leaf layers whose derivatives of every order torch computes correctly (the built-in networks'
# layers, checked against finite differences in the tests, and pointwise activations).
SAFE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Flatten,
    nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad2d, nn.ConstantPad2d,
    BatchNormPrimitive, GroupNormPrimitive,
)
CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Why some layers are refused (the fix goes in the message).
REFUSED: dict[type[nn.Module], str] = {
    nn.LayerNorm: "its fused kernel is not checked under third-order autodiff; use nn.GroupNorm or nn.BatchNorm, "
                  "which metaif converts",
    nn.InstanceNorm1d: "its fused kernel is not checked under third-order autodiff; use nn.GroupNorm",
    nn.InstanceNorm2d: "its fused kernel is not checked under third-order autodiff; use nn.GroupNorm",
    nn.InstanceNorm3d: "its fused kernel is not checked under third-order autodiff; use nn.GroupNorm",
    nn.LocalResponseNorm: "it is not checked under third-order autodiff; remove it",
    nn.Dropout: "it makes the inner loop random; remove it (influence needs a deterministic network)",
    nn.Dropout1d: "it makes the inner loop random; remove it",
    nn.Dropout2d: "it makes the inner loop random; remove it",
    nn.AlphaDropout: "it makes the inner loop random; remove it",
    nn.RNNBase: "recurrent kernels are not checked under third-order autodiff",
    nn.MultiheadAttention: "its fused attention kernel is not checked under third-order autodiff",
    nn.Embedding: "metaif's tasks are images; it is not supported",
}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class CustomMetaModel(nn.Module):
    """A user network split into ``body`` (its final layer replaced by ``nn.Identity``) and ``head``."""

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def load_factory(factory: str):
    """Import ``"package.module:function"`` or ``"path/to/file.py:function"``.

    The working directory is searched too (the ``metaif`` script does not put it on ``sys.path``).

    Raises:
        MetaifError: malformed path, module not importable, or no such callable.
    """
    where, sep, attr = (factory or "").rpartition(":")
    if not sep or not where or not attr:
        raise MetaifError(f"model.factory={factory!r} is not valid; write it as package.module:make_net "
                          "or path/to/file.py:make_net")
    try:
        if where.endswith(".py"):
            file = Path(where).expanduser()
            if not file.is_file():
                raise MetaifError(f"model.factory={factory!r}: file {file} does not exist")
            spec = importlib.util.spec_from_file_location(f"metaif_user_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(where)
    except MetaifError:
        raise
    except Exception as exc:  # a user's module can fail in any way; say which and why, on one line
        raise MetaifError(f"model.factory={factory!r}: importing {where} failed ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]}); make it importable (pip install -e, or "
                          "PYTHONPATH)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise MetaifError(f"model.factory={factory!r}: {where} has no callable {attr!r}")
    return fn


ENTRY_POINT_GROUP = "metaif.models"  # [project.entry-points."metaif.models"] my_net = "my_pkg.nets:make_net"


def registered_factories() -> set[str]:
    """The factories (``module:function``) installed packages register in group ``metaif.models``
    (read from their metadata: nothing is imported)."""
    from importlib.metadata import entry_points

    return {ep.value.replace(" ", "") for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _same_factory(a: str, b: str) -> bool:
    where_a, _, attr_a = a.rpartition(":")
    where_b, _, attr_b = b.rpartition(":")
    if where_a.endswith(".py") and where_b.endswith(".py"):
        return attr_a == attr_b and Path(where_a).expanduser().resolve() == Path(where_b).expanduser().resolve()
    return a == b


def trusted_factory(saved: str | None, given: str | None, run: str, setting: str = "factory") -> str:
    """The factory a command may import to rebuild the ``model=custom`` run ``run`` whose files name ``saved``.

    The run directory only names it; it is trusted when the user names the same factory
    (``given``, from the command line or the API) or an installed package registers it
    (entry point group ``metaif.models``). Nothing is imported here.

    Raises:
        MetaifError: ``given`` differs from ``saved``, or neither the user nor a package vouches for ``saved``.
    """
    saved = str(saved or "")
    if given:
        if not _same_factory(str(given), saved):
            raise MetaifError(f"{setting}={given!r} is not the factory run {run} was trained with ({saved!r}); "
                              f"pass {setting}={saved!r} or score the run your factory trained")
        return saved
    if saved and saved.replace(" ", "") in registered_factories():
        return saved
    raise MetaifError(f"run {run} uses model=custom with model.factory={saved!r}; metaif never imports code named "
                      f"only by a run directory: if that factory is yours, pass {setting}={saved!r} (or register it "
                      f"as an entry point of group {ENTRY_POINT_GROUP})")


def _convert_norms(net: nn.Module) -> list[str]:
    """Replace batch and group norms in place by the primitive ones, affine state copied; return their names."""
    converted = []
    for name, module in list(net.named_modules()):
        if isinstance(module, BATCH_NORMS):
            new: nn.Module = BatchNormPrimitive(module.num_features, eps=module.eps)
        elif isinstance(module, nn.GroupNorm):
            new = GroupNormPrimitive(module.num_groups, module.num_channels, eps=module.eps)
        else:
            continue
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        ref = next(iter(module.parameters()), None)
        new.to(dtype=ref.dtype if ref is not None else torch.get_default_dtype())
        net.set_submodule(name, new)
        converted.append(name)
    return converted


def check_layers(net: nn.Module) -> None:
    """Refuse the first layer metaif cannot differentiate safely to third order.

    Raises:
        MetaifError: naming the layer, its type and the fix.
    """
    for name, module in net.named_modules():
        label = f"layer {name or '<root>'!r} ({type(module).__name__})"
        for kind, why in REFUSED.items():
            if isinstance(module, kind):
                raise MetaifError(f"model=custom: {label} cannot be used: {why}")
        if isinstance(module, SAFE_LAYERS + CONTAINERS):
            continue
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if own:
            raise MetaifError(f"model=custom: {label} holds parameters ({', '.join(own)}) in a layer type metaif "
                              "has not checked under third-order autodiff; build it from nn.Linear/nn.Conv*/"
                              "norm layers")


def build_user_net(factory: str, kwargs: Mapping[str, Any], seed: int) -> nn.Module:
    """Call the factory once, under ``seed``; the network as the user wrote it (norms unconverted)."""
    fn = load_factory(factory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            net = fn(**dict(kwargs or {}))
        except Exception as exc:
            raise MetaifError(f"model.factory={factory!r} with model.kwargs={dict(kwargs or {})} raised "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(net, nn.Module):
        raise MetaifError(f"model.factory={factory!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net.float()


def wrap_user_net(net: nn.Module, head: str, image_shape: tuple[int, int, int], ways: int) -> CustomMetaModel:
    """Convert norms, check every layer, and split ``net`` at its final layer ``head``.

    Raises:
        MetaifError: ``head`` missing, not an ``nn.Linear`` with bias and ``ways`` outputs, or not
            the last operation of the forward pass; a refused layer (see :func:`check_layers`).
    """
    try:
        head_layer = net.get_submodule(head)
    except AttributeError:
        names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        raise MetaifError(f"model.head={head!r} is not a layer of the network; its nn.Linear layers are: "
                          f"{', '.join(names) or 'none'}") from None
    if not isinstance(head_layer, nn.Linear) or head_layer.bias is None:
        raise MetaifError(f"model.head={head!r} is a {type(head_layer).__name__}; it must be the final "
                          "nn.Linear (with bias) that outputs one logit per way")
    if head_layer.out_features != ways:
        raise MetaifError(f"model.head={head!r} has {head_layer.out_features} outputs but dataset.ways={ways}; "
                          "pass the number of ways through model.kwargs")
    converted = _convert_norms(net)
    check_layers(net)
    net.train()
    dtype = next(net.parameters()).dtype
    probe = torch.randn(4, *image_shape, generator=torch.Generator().manual_seed(0), dtype=dtype)  # [4, C, H, W]
    with torch.no_grad():
        try:
            expected = net(probe)
        except Exception as exc:
            raise MetaifError(f"model=custom: the network fails on images of shape {list(image_shape)} "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); check "
                              "dataset.image_size/dataset.channels against model.kwargs") from None
        net.set_submodule(head, nn.Identity())
        model = CustomMetaModel(net, head_layer)
        if expected.shape != (4, ways) or not torch.allclose(model(probe), expected, atol=1e-5, rtol=1e-4):
            raise MetaifError(f"model.head={head!r} is not the last operation of the network's forward "
                              f"(output {tuple(expected.shape)}); metaif needs logits straight from that layer")
    if converted:
        log.info("model=custom: converted %s to metaif's primitive norms", ", ".join(converted))
    return model


def build_custom(factory: str, kwargs: Mapping[str, Any], head: str, image_shape: tuple[int, int, int],
                 ways: int, seed: int) -> CustomMetaModel:
    """Build the user's network from its factory and make it a metaif model (see module docstring)."""
    return wrap_user_net(build_user_net(factory, kwargs, seed), head, image_shape, ways)
