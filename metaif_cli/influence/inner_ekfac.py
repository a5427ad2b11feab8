"""EK-FAC inner inverse-Hessian products for implicit mode (iMAML; paper section 5.1, method §2).

Implicit mode needs ``H_in^{-1} b`` with ``H_in = grad2_phi L_I(phi_k) + eta I`` for every
task, several times per task and per Hessian product (``J^T g = eta H_in^{-1} g``).
``inner_solver=cg`` solves each to ``cg_tol`` by conjugate gradients; ``inner_solver=ekfac``
replaces ``grad2_phi L_I`` by an eigenvalue-corrected Kronecker-factored Gauss-Newton
matrix (George et al. 2018) fitted **per task on its support set**, and adds the proximal
``eta`` to its eigenvalues, so that one factorisation gives every solve of the task in
closed form.

Construction, for one task with support weights ``u`` and ``L_I = (1/|S|) sum_j u_j l_j``:

- the Gauss-Newton matrix of the cross-entropy is exactly ``G = sum_m g_m g_m^T`` over
  the ``|S| x ways`` pseudo-gradients ``g_{j,c} = sqrt(u_j p_jc / |S|) J_j^T (e_c - p_j)``
  (``J_j`` the Jacobian of instance ``j``'s logits in ``phi``, ``p_j`` its softmax), since
  ``diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T``; one ``jacrev`` of the support
  logits gives them all;
- per layer (a ``weight`` of two or more dimensions, reshaped ``[out, in]``, with its
  ``bias`` as an extra column), each ``g_m`` is a matrix ``M_m``; the Kronecker eigenbases
  are those of ``sum_m M_m^T M_m`` and ``sum_m M_m M_m^T``, and the eigenvalues are
  corrected to the exact second moments in that basis, ``Lambda = sum_m (U_G^T M_m U_A)^2``
  (EK-FAC's correction); ``H_in^{-1} B ~ U_G [(U_G^T B U_A) / (Lambda + eta)] U_A^T``;
- one-dimensional parameters (normalisation scales and shifts) get the exact diagonal
  ``sum_m g_m^2 + eta``.

Differences from the exact solve: the Gauss-Newton matrix drops the residual term of the
Hessian (second derivatives of the logits), layers are independent (block diagonal), and
each block is Kronecker-factored. The error is measured against CG and the dense solve
in ``tests/test_inner_ekfac.py`` and reported in docs/results.md.

Why not kronfluence: its factors come from forward and backward hooks on an ``nn.Module``
driven by a ``DataLoader`` and are stored on disk per analysis; metaif's inner level runs
the network at ``phi_k`` through ``torch.func.functional_call`` (never the module's own
parameters), once per task, thousands of tasks per scoring, so kronfluence's hooks would
see neither ``phi_k`` nor a per-task support set. Written here with ``torch.func`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.func import jacrev

from metaif_cli.meta.params import FlatSpec
from metaif_cli.models.networks import logits


@dataclass
class _Block:
    """One layer's slice of the flat vector and its factors (``kind``: ``kron`` or ``diag``)."""

    kind: str
    slices: list[tuple[int, int, tuple[int, ...]]]  # (start, stop, shape) of weight [, bias]
    u_g: Tensor | None = None
    u_a: Tensor | None = None
    lam: Tensor | None = None  # [out, in'] corrected eigenvalues, or [numel] diagonal


def _layers(spec: FlatSpec) -> list[list[tuple[str, int, int, tuple[int, ...]]]]:
    """Parameters grouped by module prefix, in flat order: ``(name, start, stop, shape)``."""
    groups: dict[str, list] = {}
    start = 0
    for name, shape in zip(spec.names, spec.shapes):
        size = int(torch.Size(shape).numel())
        prefix = name.rsplit(".", 1)[0]
        groups.setdefault(prefix, []).append((name, start, start + size, tuple(shape)))
        start += size
    return list(groups.values())


def _matrix(vecs: Tensor, parts: list[tuple[str, int, int, tuple[int, ...]]]) -> Tensor:
    """``[m, P]`` flat vectors -> ``[m, out, in']`` layer matrices (weight reshaped, bias as a column)."""
    cols = []
    for _, a, b, shape in parts:
        cols.append(vecs[:, a:b].reshape(vecs.shape[0], shape[0], -1))
    return torch.cat(cols, dim=2)


def _unmatrix(mat: Tensor, parts: list[tuple[str, int, int, tuple[int, ...]]]) -> list[Tensor]:
    out, col = [], 0
    for _, a, b, shape in parts:
        width = (b - a) // shape[0]
        out.append(mat[:, col : col + width].reshape(-1))
        col += width
    return out


def pseudo_gradients(model, spec: FlatSpec, phi: Tensor, x_spt: Tensor, y_spt: Tensor, u: Tensor) -> Tensor:
    """``[|S| * ways, P]`` vectors ``g_m`` with ``sum_m g_m g_m^T`` = the Gauss-Newton matrix of ``L_I``."""
    s = x_spt.shape[0]
    out = logits(model, spec.unflatten(phi), x_spt)  # [S, C]
    jac = jacrev(lambda p: logits(model, spec.unflatten(p), x_spt))(phi)  # [S, C, P]
    prob = torch.softmax(out.detach(), -1)  # [S, C]
    eye = torch.eye(prob.shape[1], dtype=prob.dtype, device=prob.device)
    resid = eye[None] - prob[:, None, :]  # [S, c, k]: e_c - p
    scale = (u[:, None] * prob / s).clamp_min(0).sqrt()  # [S, c]
    g = torch.einsum("sck,skp->scp", resid * scale[..., None], jac)  # [S, c, P]
    return g.reshape(-1, phi.shape[0]).detach()


def fit(model, spec: FlatSpec, phi: Tensor, x_spt: Tensor, y_spt: Tensor, u: Tensor) -> list[_Block]:
    """EK-FAC factors of ``grad2_phi L_I`` on one task's support set."""
    g = pseudo_gradients(model, spec, phi, x_spt, y_spt, u)  # [m, P]
    blocks = []
    for parts in _layers(spec):
        kron = [p for p in parts if len(p[3]) >= 2]
        if kron and all(p[3][0] == kron[0][3][0] for p in parts):
            mats = _matrix(g, parts)  # [m, out, in']
            _, u_a = torch.linalg.eigh(torch.einsum("moi,moj->ij", mats, mats))
            _, u_g = torch.linalg.eigh(torch.einsum("mio,mjo->ij", mats, mats))
            lam = (u_g.T @ mats @ u_a).pow(2).sum(0)  # [out, in']
            blocks.append(_Block("kron", [(a, b, s) for _, a, b, s in parts], u_g, u_a, lam))
        else:
            for _, a, b, s in parts:
                blocks.append(_Block("diag", [(a, b, s)], lam=g[:, a:b].pow(2).sum(0)))
    return blocks


def inverse(blocks: list[_Block], eta: float) -> Callable[[Tensor], Tensor]:
    """``b -> (G_ekfac + eta I)^{-1} b`` on flat vectors."""

    def solve(b: Tensor) -> Tensor:
        x = torch.empty_like(b)
        for blk in blocks:
            if blk.kind == "diag":
                a, e, _ = blk.slices[0]
                x[a:e] = b[a:e] / (blk.lam + eta)
                continue
            parts = [("", a, e, s) for a, e, s in blk.slices]
            mat = _matrix(b[None], parts)[0]  # [out, in']
            sol = blk.u_g @ ((blk.u_g.T @ mat @ blk.u_a) / (blk.lam + eta)) @ blk.u_a.T
            for (a, e, _), piece in zip(blk.slices, _unmatrix(sol, parts)):
                x[a:e] = piece
        return x

    return solve


def ekfac_inner_solver(model, spec: FlatSpec, phi: Tensor, x_spt: Tensor, y_spt: Tensor, u: Tensor,
                       eta: float) -> Callable[[Tensor], Tensor]:
    """Fit one task's EK-FAC factors and return its approximate ``H_in^{-1}``."""
    return inverse(fit(model, spec, phi, x_spt, y_spt, u), eta)
