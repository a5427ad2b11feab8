"""How much work ``metaif prune-and-retrain`` plans, estimated before any of it starts (method
§5-6: every removal, leave-one-out and LDS retraining).

:func:`count_retrainings` counts the retrainings a command plans; :func:`check_sizes`
refuses, in one line, a plan whose retrainings cannot fit: their directories on the disk
that holds them (every retraining keeps ``model.pt``, two resumable checkpoints with the
optimiser's state and the intermediate checkpoints of the run's config) or their jobs in
memory (each job holds the pool weights, plus the LDS subsets). ``lds.num_subsets=1000000
lds.seeds=1000`` is refused at once instead of growing to the memory limit.
"""

from __future__ import annotations

from pathlib import Path

from metaif_cli.checks import available_memory, fits, free_disk
from metaif_cli.prune.config import PruneConfig

JOB_OVERHEAD = 4096  # bytes per job besides its pool weights: the config dict, paths, results
DIR_OVERHEAD = 16384  # bytes per retraining directory besides its tensors: metrics.csv, results.json, .hydra


def count_retrainings(cfg: PruneConfig, n_units: int, imported: bool = False) -> int:
    """Retrainings the command plans (finished ones found on disk are counted too)."""
    seeds = cfg.retrain_seeds
    if cfg.protocol == "lds":
        return (cfg.lds.num_subsets + 1) * cfg.lds.seeds
    if cfg.protocol == "loo":
        return (cfg.num_units + 1) * len(cfg.loo_modes) * seeds
    total = 0
    if cfg.update == "retrain":
        total += len(cfg.methods) * len(cfg.fractions) * seeds + (seeds - 1) + int(imported)
    if "retrain" in cfg.methods:  # the "Retrain" selection: leave-one-out of each sampled unit
        total += cfg.retrain_subset if cfg.retrain_subset is not None else n_units
    return total


def check_sizes(cfg: PruneConfig, n_units: int, num_params: int, pool_shape: tuple[int, int, int],
                num_checkpoints: int, dtype_bytes: int, retrain_root: Path, imported: bool = False) -> int:
    """Refuse a plan whose retrainings cannot fit on disk or whose jobs cannot fit in memory; return
    the number of retrainings.

    Args:
        n_units: units of the kind removed.
        num_params: parameters of the network.
        pool_shape: ``(n, S, Q)`` of the training pool (the pool weights every job carries).
        num_checkpoints: intermediate checkpoints each retraining keeps (the run's ``optim.num_checkpoints``).
        dtype_bytes: bytes per parameter (4 for float32).
        retrain_root: where the retrainings are written.
    """
    count = count_retrainings(cfg, n_units, imported)
    n, s, q = pool_shape
    weights = n * (1 + s + q) * 4  # w, u, v in float32
    per_dir = num_params * dtype_bytes * (1 + 2 * 3 + num_checkpoints) + 3 * weights + DIR_OVERHEAD
    subsets = cfg.lds.num_subsets * n_units * 8 if cfg.protocol == "lds" else 0
    what = f"{count} retrainings (protocol={cfg.protocol})"
    fix = ("plan fewer: " + {"lds": "lower lds.num_subsets or lds.seeds",
                             "loo": "lower num_units, loo_modes or retrain_seeds"}.get(
        cfg.protocol, "fewer methods, fractions or retrain_seeds, or a retrain_subset"))
    fits(what, count * (weights + JOB_OVERHEAD) + subsets, available_memory(), "memory", fix)
    fits(what, count * per_dir, free_disk(retrain_root), f"disk under {retrain_root}", fix)
    return count
