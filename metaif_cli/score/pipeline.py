"""The ``metaif score`` pipeline: settings check, shards, torchrun, outputs (method §3).

One process: score every task, write the outputs. ``shard=i/k``: score a contiguous
slice of the tasks into ``shards/shard_i_of_k.pt``; when the last shard of ``k`` lands,
they are merged into the same outputs a single process writes. Under ``torchrun`` (any
``WORLD_SIZE > 1``) each process takes one slice, Hessian products are all-reduced, and
rank 0 gathers the slices and writes.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Callable

import torch

import metaif_cli
from metaif_cli import constants as C
from metaif_cli.checks import differing_keys
from metaif_cli.errors import MetaifError
from metaif_cli.influence import compute
from metaif_cli.influence.problem import UnitScores
from metaif_cli.influence.compute import Solved
from metaif_cli.io import clean_stale_temporaries, load_json, load_torch, resolved_path, save_json, save_torch
from metaif_cli.score.config import ScoreConfig, parse_shard, parse_unit_ref, settings_of
from metaif_cli.ownership import check_foreign, owned_dir
from metaif_cli.score.outputs import (artefact_digests, clear_results, detection, instance_table, task_table,
                                      write_plots, write_summary, write_tables)
from metaif_cli.score.methods import pred_delta_lam, run_method
from metaif_cli.score.ihvp import load_solved, save_solved
from metaif_cli.score.preflight import check_inputs
from metaif_cli.score.run import LoadedRun, load_run, read_tasks_csv

log = logging.getLogger(__name__)


def check_settings(out_dir: Path, cfg: ScoreConfig) -> bool:
    """Refuse to mix scores of different settings in one directory unless ``overwrite=true``.

    Only compares (writes nothing): the settings are saved once every check has passed.
    The run is compared as a resolved path, so a relative path or a trailing slash is the same run.
    Returns True when ``overwrite=true`` replaces the results of other settings (every artefact
    of them is removed then, :func:`~metaif_cli.score.outputs.clear_results`).
    """
    path = out_dir / C.SCORE_SETTINGS_JSON
    if not path.exists():
        return False
    try:
        saved = load_json(path, "delete it, or pass overwrite=true")
    except MetaifError:
        if cfg.overwrite:
            return True
        raise
    if isinstance(saved, dict) and "run" in saved:
        saved = {**saved, "run": resolved_path(saved["run"])}
    wanted = settings_of(cfg)
    if saved == wanted:
        return False
    if cfg.overwrite:
        return True
    differ = differing_keys(saved, wanted) if isinstance(saved, dict) else []
    which = f" ({', '.join(differ)} differ, per {C.SCORE_SETTINGS_JSON})" if differ else ""
    raise MetaifError(f"{out_dir} holds scores computed with other settings{which}; pass overwrite=true to "
                      "replace them or choose another hydra.run.dir")


def shard_slice(n: int, i: int, k: int) -> torch.Tensor:
    """Task indices of shard ``i`` of ``k`` (contiguous, sizes differ by at most one)."""
    return torch.arange(n * i // k, n * (i + 1) // k)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _gather(scores: UnitScores, world: int) -> UnitScores:
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, tuple(t.cpu() for t in (scores.task, scores.query, scores.support)))
    return UnitScores(*(torch.cat([p[i] for p in parts]) for i in range(3)))


def score(cfg: ScoreConfig, out_dir: Path, before_write: Callable[[], None] | None = None) -> dict:
    """Run ``metaif score`` into ``out_dir``; return the ``score.json`` content (empty for a non-final shard).

    Everything is checked before the first write: the run, the shard, every unit reference,
    the checkpoints TracIn needs and the settings of a directory already there.
    ``before_write`` runs then (the command layer saves Hydra's ``.hydra/`` there).
    The folder is held by this command alone (shards of one scoring share it) from the first
    read to the last write (:func:`metaif_cli.ownership.owned_dir`).
    """
    rank, world = _distributed()
    if rank != 0:
        return _score(cfg, out_dir, before_write, rank, world)
    with owned_dir(out_dir, "score", shared=world == 1 and cfg.shard is not None):
        return _score(cfg, out_dir, before_write, rank, world)


def _score(cfg: ScoreConfig, out_dir: Path, before_write: Callable[[], None] | None, rank: int, world: int) -> dict:
    run = load_run(cfg.run, cfg.device, cfg.dtype, data=cfg.data, factory=cfg.factory)
    n = len(run.exp.pools["train"])
    if world > 1:
        i, k = rank, world
    elif cfg.shard is not None:
        i, k = parse_shard(cfg.shard)
    else:
        i, k = 0, 1
    check_inputs(run, cfg, k, "processes (torchrun --nproc_per_node)" if world > 1 else "shards")
    if rank == 0:
        check_foreign(out_dir, "score", run.run_dir)
        replaced = check_settings(out_dir, cfg)
        if before_write is not None:
            before_write()
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(out_dir)  # left by a killed earlier run
        clear_results(out_dir, everything=replaced)  # no table of an earlier result outlives it
    index = shard_slice(n, i, k) if k > 1 else None
    solved = load_solved(out_dir, cfg, run.lam) if world == 1 else None
    on_solved = (lambda new: save_solved(out_dir, cfg, run.lam, new)) if world == 1 else None
    out = run_method(run, cfg, index, rank if world > 1 else 0, world, work_dir=out_dir if k == 1 else None,
                     solved=solved, on_solved=on_solved)
    if rank == 0:  # saved with the first result, so a failed computation leaves no settings to refuse the next
        save_json(settings_of(cfg), out_dir / C.SCORE_SETTINGS_JSON)
    if world > 1:
        out.scores = _gather(out.scores, world)
        if out.spread is not None:  # every process scored the same members: all of them gather it
            out.spread = _gather(out.spread, world)
        if rank != 0:
            return {}
    elif k > 1:
        spread = None if out.spread is None else dict(out.spread.__dict__)
        save_torch({"scores": dict(out.scores.__dict__), "spread": spread, "index": index, "settings": settings_of(cfg),
                    "s": out.s, "seconds": out.seconds, "run_fingerprint": run.fingerprint},
                   out_dir / C.SHARD_DIR / f"shard_{i}_of_{k}.pt")
        merged = _merge_shards(out_dir, k, cfg, run.fingerprint)
        if merged is None:
            log.info("shard %d/%d written; the last shard to finish merges them", i, k)
            return {}
        out.scores, out.spread = merged
    summary = write_outputs(run, cfg, out, out_dir)
    return summary


def _merge_shards(out_dir: Path, k: int, cfg: ScoreConfig, fingerprint: str | None = None
                  ) -> tuple[UnitScores, UnitScores | None] | None:
    paths = [out_dir / C.SHARD_DIR / f"shard_{j}_of_{k}.pt" for j in range(k)]
    if not all(p.exists() for p in paths):
        return None
    fix = f"delete it and rerun that shard (shard=i/{k})"
    parts = [load_torch(p, fix, keys=("scores", "settings")) for p in paths]
    if any(p["settings"] != settings_of(cfg) or (fingerprint is not None and p.get("run_fingerprint") != fingerprint)
           for p in parts):
        raise MetaifError(f"the shards in {out_dir / C.SHARD_DIR} were computed with different settings; "
                          "(or for another version of the run); delete them and rerun every shard")
    fields = ("task", "query", "support")
    scores = UnitScores(*(torch.cat([p["scores"][f] for p in parts]) for f in fields))
    if any(p.get("spread") is None for p in parts):
        return scores, None
    return scores, UnitScores(*(torch.cat([p["spread"][f] for p in parts]) for f in fields))


def write_outputs(run: LoadedRun, cfg: ScoreConfig, out: compute.ScoreOutput, out_dir: Path) -> dict:
    """CSV tables, ``ihvp.pt``, ``pred_delta_lam.pt``, plots and ``score.json``."""
    import pandas as pd

    tasks_csv = read_tasks_csv(run)
    spread = out.spread
    tasks_df = task_table(out.scores, tasks_csv, cfg.method, spread=spread) if cfg.unit in ("task", "all") else None
    inst_df = (instance_table(out.scores, tasks_csv, cfg.method, spread=spread) if cfg.unit in ("instance", "all")
               else None)
    write_tables(out_dir, tasks_df, inst_df)
    if out.s is not None and out.solve is not None:
        save_solved(out_dir, cfg, run.lam, Solved(out.s, out.solve, out.curvature))
    if out.train_by_test is not None:
        mat = pd.DataFrame(out.train_by_test.double().cpu().numpy(),
                           columns=[f"test_task_{t}" for t in range(out.train_by_test.shape[1])])
        mat.insert(0, "task_id", range(len(mat)))
        from metaif_cli.io import save_csv

        save_csv(mat, out_dir / C.TRAIN_BY_TEST_CSV)
    if cfg.pred_delta_lam:
        edits = pred_delta_lam(run, cfg, [parse_unit_ref(u) for u in cfg.pred_delta_lam])
        save_torch(edits, out_dir / C.PRED_DELTA_LAM_PT)
    summary = {
        "settings": settings_of(cfg),
        "run": str(run.run_dir),
        "run_fingerprint": run.fingerprint,  # checked by prune-and-retrain scores=
        "files": artefact_digests(out_dir),
        "method": cfg.method,
        "n_tasks": len(run.exp.pools["train"]),
        "num_parameters": sum(t.numel() for t in run.lam.values()),
        "seconds": out.seconds,
        "total_seconds": sum(out.seconds.values()),
        "inner_relative_residual": out.inner_residual,
        "eval_value": out.eval_value,
        "curvature": None if out.curvature is None else out.curvature.__dict__,
        "device": str(run.exp.device),
        "versions": {"metaif": metaif_cli.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    if out.info:
        summary["method_info"] = out.info
    if out.solve is not None:
        summary["solver"] = {"method": out.solve.method, "iterations": out.solve.iterations,
                             "relative_residual": out.solve.residual, "converged": out.solve.converged,
                             "eigenvalue_max": out.solve.eigenvalue_max, "reused_from_ihvp_pt": out.reused_s}
    if out.members is not None:
        summary["ensemble"] = {"members": out.members, "num_members": len(out.members),
                               "seconds": sum(m["seconds"] for m in out.members)}
    summary["detection"] = {unit: detection(df, cfg.method) for unit, df in (("task", tasks_df), ("instance", inst_df))
                            if df is not None and df["corrupted"].any()}
    if cfg.plots:
        summary["plots"] = write_plots(out_dir, cfg.method, tasks_df, inst_df, run.exp.images, cfg.grid_size)
    lines = write_summary(out_dir, cfg.method, tasks_df, inst_df, len(out.members) if out.members else 1)
    save_json(summary, out_dir / C.SCORE_JSON)
    log.info("scored %d tasks with %s in %.1f s; outputs in %s", summary["n_tasks"], cfg.method,
             summary["total_seconds"], out_dir)
    log.info("conclusion (also in %s):\n%s", C.SUMMARY_MD, "\n".join(lines[2:]))
    return summary
