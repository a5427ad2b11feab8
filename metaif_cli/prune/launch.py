"""Run many independent retrainings: in this process, with joblib, or through submitit (method
§5-6: every removal and leave-one-out retraining).

A :class:`RetrainJob` is plain data (the run's saved config, a directory, pool weights,
an optional warm start), so it pickles to a worker process or a cluster node.
:func:`run_job` rebuilds the experiment from the config exactly as the original run was
built (same seed: same pools, same initialisation, same batch order) and calls
:func:`metaif_cli.train.loop.train`, which resumes an interrupted retraining and skips a
finished one. Jobs that are already finished are not launched at all.

Launchers (``launcher=``):

- ``sequential``: one after the other in this process (experiments cached per config);
- ``joblib``: ``joblib.Parallel(n_jobs)`` over local worker processes (loky);
- ``submitit``: ``submitit.AutoExecutor`` job arrays (SLURM when available, else local
  processes); logs and pickles go to ``<run dir>/submitit``.

Training on CPU is deterministic, so the launcher does not change any number (tested:
joblib with ``n_jobs=2`` and submitit's local executor give bit-identical parameters to
sequential).

``batch=K`` > 1 (``retrain.batch``): the pending jobs that differ only in their weights, warm
start, ``optim.batch_seed`` and ``model.init_seed`` are cut into batches of at most K, and
every launcher runs batches instead of single jobs: :func:`run_batch` trains a batch as one
stack of models (:func:`metaif_cli.train.batched.train_members`), whose members equal the
same jobs run alone (float64: to 1e-10 relative; tested). ``batch=1`` is :func:`run_job`
per job, the single-run loop. SLURM settings (partition, time limit, GPUs) go through ``submitit_params``;
the prune config has no field for them yet, so the command uses submitit's defaults.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.train.experiment import Experiment, build_experiment, config_from_dict
from metaif_cli.io import load_json, load_torch
from metaif_cli.progress import bar as progress_bar
from metaif_cli.train.batched import Member, train_members
from metaif_cli.train.loop import PoolWeights, train

log = logging.getLogger(__name__)

IGNORED_KEYS = ("progress", "device", "logger")  # as in training: they do not change the result


@dataclass
class RetrainJob:
    """One retraining: the original run's ``config`` (``config_dict``) with ``weights``.

    ``init_lam``/``steps``: warm start at these parameters for this many outer steps
    (default: the seeded initialisation and ``optim.steps``, i.e. a cold retraining).
    """

    config: dict
    run_dir: str
    weights: dict[str, torch.Tensor]
    init_lam: dict[str, torch.Tensor] | None = None
    steps: int | None = None

    @property
    def total_steps(self) -> int:
        return self.steps or int(self.config["optim"]["steps"])


@functools.lru_cache(maxsize=2)
def _experiment(config_json: str) -> Experiment:
    return build_experiment(config_from_dict(json.loads(config_json)))


def run_job(job: RetrainJob) -> dict:
    """Retrain (or resume, or skip when finished); return the ``results.json`` content."""
    exp = _experiment(json.dumps(job.config, sort_keys=True))
    init = None if job.init_lam is None else {k: v.to(exp.device, exp.dtype) for k, v in job.init_lam.items()}
    return train(exp, Path(job.run_dir), weights=PoolWeights(**job.weights), init_lam=init, steps=job.steps)


def batch_key(job: RetrainJob) -> str:
    """Jobs with equal keys can share a stack: same config but for the seeds, same number of steps."""
    config = copy.deepcopy(job.config)
    config.get("optim", {}).pop("batch_seed", None)
    config.get("model", {}).pop("init_seed", None)
    return json.dumps([{k: v for k, v in config.items() if k != "progress"}, job.total_steps], sort_keys=True,
                      default=str)


def make_batches(jobs: list[RetrainJob], size: int) -> list[list[int]]:
    """Indices of ``jobs`` cut into batches of at most ``size`` compatible jobs, in the order of ``jobs``."""
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(batch_key(job), []).append(i)
    return [idx[s:s + size] for idx in groups.values() for s in range(0, len(idx), size)]


def run_batch(jobs: list[RetrainJob]) -> list[dict]:
    """Train compatible jobs as one stack (:func:`metaif_cli.train.batched.train_members`); one job: :func:`run_job`."""
    if len(jobs) == 1:
        return [run_job(jobs[0])]
    exp = _experiment(json.dumps(jobs[0].config, sort_keys=True))
    members = [Member(config_from_dict(j.config), Path(j.run_dir), PoolWeights(**j.weights),
                      None if j.init_lam is None else {k: v.to(exp.device, exp.dtype) for k, v in j.init_lam.items()},
                      j.steps) for j in jobs]
    return train_members(exp, members)  # type: ignore[return-value]


def finished_results(job: RetrainJob) -> dict | None:
    """``results.json`` of ``job`` when its directory holds the same retraining, finished; else None."""
    run_dir = Path(job.run_dir)
    results_path, last_path = run_dir / C.RESULTS_JSON, run_dir / C.CHECKPOINT_LAST
    if not (results_path.exists() and last_path.exists()):
        return None
    try:  # a damaged retraining is not finished: train() completes it from its last good checkpoint
        saved = load_torch(last_path, "rerun to retrain it", keys=("config", "weights"))
        results = load_json(results_path, "rerun to retrain it", keys=("steps",))
        load_torch(run_dir / C.MODEL_PT, "rerun to retrain it", keys=("lam",))
    except MetaifError as exc:
        log.warning("%s; retraining it", exc)
        return None
    same_config = ({k: v for k, v in saved["config"].items() if k not in IGNORED_KEYS}
                   == {k: v for k, v in job.config.items() if k not in IGNORED_KEYS})
    same_weights = all(torch.equal(saved["weights"][k], t.to(saved["weights"][k])) for k, t in job.weights.items())
    if not (same_config and same_weights) or int(results.get("steps", -1)) != job.total_steps:
        raise MetaifError(f"{run_dir} holds a retraining with different settings; delete that directory "
                          "or choose another hydra.run.dir")
    return results


def launch(jobs: list[RetrainJob], launcher: str = "sequential", n_jobs: int = 2, folder: Path | None = None,
           progress: bool = False, submitit_params: dict[str, Any] | None = None,
           cluster: str | None = None, batch: int = 1) -> list[dict]:
    """Run ``jobs``; return their ``results.json`` contents in the order of ``jobs``.

    Args:
        jobs: the retrainings.
        launcher: ``sequential``, ``joblib`` or ``submitit``.
        n_jobs: worker processes for ``joblib``.
        folder: logs of ``submitit`` (required for it).
        progress: a progress bar over the jobs (sequential).
        submitit_params: passed to ``AutoExecutor.update_parameters`` (e.g. ``timeout_min``,
            ``slurm_partition``, ``gpus_per_node``).
        cluster: ``submitit`` cluster (None: SLURM if available, else ``local``).
        batch: retrainings trained together as one stack (1: one at a time, the single-run loop).
    """
    results: list[dict | None] = [finished_results(j) for j in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    if len(todo) < len(jobs):
        log.info("%d of %d retrainings already finished; skipping them", len(jobs) - len(todo), len(jobs))
    pending = [jobs[i] for i in todo]
    if batch > 1:
        groups = make_batches(pending, batch)
        batches = [[pending[i] for i in g] for g in groups]
        log.info("%d retrainings in %d batches of at most %d", len(pending), len(batches), batch)
        outs = _run(batches, run_batch, launcher, n_jobs, folder, progress, submitit_params, cluster)
        for g, out in zip(groups, outs):
            for i, res in zip(g, out):
                results[todo[i]] = res
    else:
        for i, out in zip(todo, _run(pending, run_job, launcher, n_jobs, folder, progress, submitit_params, cluster)):
            results[i] = out
    return results  # type: ignore[return-value]


def _run(work: list, fn, launcher: str, n_jobs: int, folder: Path | None, progress: bool,
         submitit_params: dict[str, Any] | None, cluster: str | None) -> list:
    """``[fn(x) for x in work]`` through the launcher."""
    if not work:
        return []
    if launcher == "sequential":
        return [fn(x) for x in progress_bar(work, desc="retrain", enabled=progress)]
    if launcher == "joblib":
        from joblib import Parallel, delayed

        return Parallel(n_jobs=n_jobs)(delayed(fn)(x) for x in work)
    if launcher == "submitit":
        return _submitit(work, fn, folder, submitit_params or {}, cluster)
    raise MetaifError(f"launcher={launcher!r} is not valid; choose one of: sequential, joblib, submitit")


def _submitit(jobs: list, fn, folder: Path | None, params: dict[str, Any], cluster: str | None) -> list:
    import submitit

    if folder is None:
        raise MetaifError("launcher=submitit needs a folder for its logs")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(name="metaif-retrain", **params)
    submitted = executor.map_array(fn, jobs)
    log.info("submitted %d jobs to %s (logs in %s)", len(submitted), executor.cluster, folder)
    return [job.result() for job in submitted]
