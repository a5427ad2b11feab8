"""``ihvp.pt``: the vector ``s = (H + delta I)^{-1} D f`` of a scoring, stored once and reused
(method §3: one ``s`` serves every training unit).

The first ``metaif score`` process to solve writes ``s`` with the solve's report (iterations,
residual, damping, Lanczos extremes), the settings that determine it and a fingerprint of
the trained parameters, before its pass over the tasks. Every later shard (``shard=i/k``)
and every rerun with the same settings and the same trained ``lam`` reads it instead of
solving again; any difference (settings, a retrained run) solves anew.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.influence.compute import Curvature, Solved
from metaif_cli.influence.operators import SolveResult
from metaif_cli.io import load_torch, save_torch
from metaif_cli.score.config import ScoreConfig, settings_of

log = logging.getLogger(__name__)

SOLVING_METHODS = ("if", "direct_if")


def lam_digest(lam: dict[str, torch.Tensor]) -> str:
    """A fingerprint of the trained parameters (a retrained run gives another one)."""
    h = hashlib.sha1()
    for k in sorted(lam):
        h.update(k.encode())
        h.update(lam[k].detach().cpu().double().contiguous().numpy().tobytes())
    return h.hexdigest()


def _record(solved: Solved, cfg: ScoreConfig, digest: str) -> dict:
    r, c = solved.result, solved.curvature
    return {"s": solved.s.detach().cpu(), "settings": settings_of(cfg), "lam": digest,
            "solve": {"iterations": int(r.iterations), "residual": float(r.residual), "converged": bool(r.converged),
                      "method": r.method, "eigenvalue_max": r.eigenvalue_max},
            "curvature": dict(c.__dict__)}


def save_solved(out_dir: Path, cfg: ScoreConfig, lam: dict[str, torch.Tensor], solved: Solved) -> None:
    """Write ``ihvp.pt`` (atomically) for the other shards and later reruns."""
    save_torch(_record(solved, cfg, lam_digest(lam)), out_dir / C.IHVP_PT)


def load_solved(out_dir: Path, cfg: ScoreConfig, lam: dict[str, torch.Tensor]) -> Solved | None:
    """``s`` from ``ihvp.pt`` when it was solved with these settings for this ``lam``; else None."""
    path = out_dir / C.IHVP_PT
    if cfg.method not in SOLVING_METHODS or not path.exists():
        return None
    try:
        saved = load_torch(path, "it is recomputed", keys=("s", "settings", "lam", "solve", "curvature"))
    except MetaifError as exc:
        log.warning("%s; solving again", exc)
        return None
    if saved["settings"] != settings_of(cfg) or saved["lam"] != lam_digest(lam):
        return None
    return Solved(saved["s"], SolveResult(x=saved["s"], **saved["solve"]), Curvature(**saved["curvature"]))
