"""``chunk=auto``: how many tasks one vmapped call over tasks holds, from a memory budget and the
model's size (method §2-3: the Hessian products and the unit pass are sums and maps over tasks).

One task of a chunk holds, through the ``K`` inner steps of its adaptation and the
forward-over-reverse derivatives of the unit pass (the costliest pass), about

    bytes = element size * (K + 1) * (PARAM_COPIES * P + ACTIVATION_COPIES * (S + Q) * A)

where ``P`` is the number of parameters, ``S + Q`` the images of a task and ``A`` the
activations (floats) of one image through the network, counted by one forward pass. The
constants were measured (peak RSS, float64, unit pass of ``unit=all``): an MLP of width 512
on 28x28 images (``K = 5``) held about 4.6 parameter copies per step and task, a cnn4 of 32
filters (``K = 1``) about 3.5 activation copies (the growth of peak RSS from a chunk of 1 to a
chunk of 8 tasks, measured once by hand; the resulting choices and peaks per model width are in
``scripts/results/bench_scale.csv``). The chunk is the budget over that, between 1 and
``MAX_CHUNK`` (32: fastest measured on CPU for small models). Deterministic: the same model,
task shape, inner steps, dtype and budget give the same chunk.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PARAM_COPIES = 5
ACTIVATION_COPIES = 4
MAX_CHUNK = 32


def activation_floats(model: nn.Module, image_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    """Floats of every leaf module's output for one image (a forward pass of a copy of ``model`` on zeros)."""
    net = copy.deepcopy(model).to(dtype=dtype)  # a copy: batch-norm running statistics stay untouched
    total = 0

    def count(_m, _i, out) -> None:
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel()

    hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            device = next(iter(net.parameters()), torch.empty(0)).device
            net.eval()(torch.zeros((1, *image_shape), dtype=dtype, device=device))
    finally:
        for h in hooks:
            h.remove()
    return max(total, 1)


def task_bytes(num_params: int, activations: int, images_per_task: int, inner_steps: int, element_size: int) -> int:
    """Estimated bytes one task holds inside a vmapped chunk (module docstring)."""
    per_step = PARAM_COPIES * num_params + ACTIVATION_COPIES * images_per_task * activations
    return element_size * (inner_steps + 1) * per_step


def auto_chunk(num_params: int, activations: int, images_per_task: int, inner_steps: int, element_size: int,
               budget_mb: float) -> int:
    """Tasks per vmapped call: ``budget_mb`` over :func:`task_bytes`, in ``[1, MAX_CHUNK]``."""
    per_task = task_bytes(num_params, activations, images_per_task, inner_steps, element_size)
    return int(max(1, min(MAX_CHUNK, (budget_mb * 2**20) // per_task)))


def resolve_chunk(chunk: int | str, model: nn.Module, image_shape: tuple[int, ...], images_per_task: int,
                  inner_steps: int, dtype: torch.dtype, budget_mb: float) -> int:
    """``chunk`` itself when a number, else :func:`auto_chunk` for ``model`` (logged)."""
    if chunk != "auto":
        return int(chunk)
    num_params = sum(p.numel() for p in model.parameters())
    acts = activation_floats(model, image_shape)
    size = torch.empty((), dtype=dtype).element_size()
    out = auto_chunk(num_params, acts, images_per_task, inner_steps, size, budget_mb)
    log.info("chunk=auto: %d tasks per call (%d parameters, %d activations per image, %d images per task, "
             "%d inner steps, %d-byte floats, budget %g MB)", out, num_params, acts, images_per_task, inner_steps,
             size, budget_mb)
    return out
