"""The Python API of metaif: your own data, your own weights, scores as DataFrames (method §1-3).

Beside the ``metaif`` command line and on the same implementation: :func:`score` runs the
pipeline of ``metaif score`` (:func:`metaif_cli.score.pipeline.score`) and
:func:`write_run`/:func:`import_weights` the one of ``metaif import``
(:mod:`metaif_cli.importer.run`), so the API and the CLI write the same files and return
the same numbers. Typical use::

    from metaif_cli import api

    cfg = api.TrainConfig(dataset=api.DatasetConfig(name="folder", path="imgs", ways=5, shots=1),
                          model=api.ModelConfig(name="custom", factory="my_nets:make_net", head="fc"),
                          meta=api.MetaConfig(name="maml", inner_steps=5, inner_lr=0.4))
    pools = api.build_task_pools(cfg.dataset, seed=cfg.seed)        # tasks with stable ids
    ...train your own network on pools.batch("train") ...
    api.write_run("runs/mine", my_net.state_dict(), cfg)           # now `metaif score run=runs/mine` works
    scores = api.score("runs/mine", unit="all", hessian={"num_tasks": 64}, factory="my_nets:make_net")
    scores.task_scores.nsmallest(10, "pred_delta_test_loss")       # the most harmful tasks

Errors are :class:`~metaif_cli.errors.MetaifError` with the fix in the message, as on the CLI.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from torch import Tensor

from metaif_cli import constants as C
from metaif_cli.data.base import ImageDataset
from metaif_cli.data.config import CorruptionConfig, DataConfig, DatasetConfig
from metaif_cli.data.pool import TaskPool, build_pools, pools_table
from metaif_cli.data.registry import load_dataset
from metaif_cli.errors import MetaifError
from metaif_cli.importer.run import lam_from_state_dict, write_run_dir
from metaif_cli.importer.weights import read_state_dict, strip_prefixes
from metaif_cli.io import load_json, load_torch, read_csv
from metaif_cli.meta.config import MetaConfig
from metaif_cli.meta.tasks import TaskBatch
from metaif_cli.models.config import ModelConfig
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.outputs import check_recorded
from metaif_cli.score.pipeline import score as score_pipeline
from metaif_cli.train.config import OptimConfig, TrainConfig
from metaif_cli.train.experiment import build_experiment

__all__ = ["CorruptionConfig", "DataConfig", "DatasetConfig", "MetaConfig", "MetaifError", "ModelConfig",
           "OptimConfig", "Scores", "ScoreConfig", "TaskPools", "TrainConfig", "build_task_pools",
           "import_weights", "load_scores", "save_image_folder", "score", "write_run"]


@dataclass
class TaskPools:
    """The seeded train/val/test task pools of a dataset, exactly as ``metaif train`` draws them.

    Attributes:
        dataset: the images ``[N, C, H, W]`` (float32 in ``[0, 1]``), labels ``[N]``, class names.
        pools: ``train``/``val``/``test`` :class:`~metaif_cli.data.pool.TaskPool` (index tensors into
            ``dataset.images``: ``spt_idx [n, ways*shots]``, ``qry_idx [n, ways*queries]``, labels).
        table: the content of ``tasks.csv``: one row per (task, instance) with ``task_id``, ``split``,
            ``role``, ``position``, ``instance_id`` (row of ``dataset.images``: stable), ``class``, ``label``.
    """

    dataset: ImageDataset
    pools: dict[str, TaskPool]
    table: pd.DataFrame

    def batch(self, split: str, index: Tensor | None = None) -> TaskBatch:
        """Tasks of ``split`` (all, or ``index``) as tensors: ``x_spt [T, S, C, H, W]``, ``y_spt [T, S]``,
        ``x_qry [T, Q, C, H, W]``, ``y_qry [T, Q]`` and unit weights."""
        return self.pools[split].batch(self.dataset.images, index)


@dataclass
class Scores:
    """What ``metaif score`` writes, as Python objects.

    Attributes:
        task_scores: ``task_scores.csv`` (``task_id, pred_delta_test_loss, rank, method, corrupted``;
            negative = harmful, rank 1 the most harmful), or ``None`` when not scored.
        instance_scores: ``instance_scores.csv`` (``instance_id, task_id, role, position, class, label,
            pred_delta_test_loss, rank, method, corrupted``), or ``None``.
        ihvp: ``s = (H + delta I)^{-1} D f``, flat ``[P]`` in the order of the run's parameters, or ``None``
            for methods without one.
        summary: ``score.json`` (settings, seconds per stage, solver residual, damping, detection quality).
        out_dir: where the files are, or ``None`` when :func:`score` wrote to a temporary directory.
    """

    task_scores: pd.DataFrame | None
    instance_scores: pd.DataFrame | None
    ihvp: Tensor | None
    summary: dict
    out_dir: Path | None


def _data_dirs(data: DataConfig | None) -> DataConfig:
    """``data`` with the CLI's defaults resolved (``$METAIF_DATA`` or ``./data``; ``$METAIF_CACHE`` or ...)."""
    data = data or DataConfig()
    root = os.environ.get("METAIF_DATA", "./data") if data.root.startswith("${") else data.root
    cache = os.environ.get("METAIF_CACHE", ".cache/metaif") if data.cache.startswith("${") else data.cache
    return DataConfig(root=root, cache=cache)


def _resolved(config: TrainConfig) -> TrainConfig:
    return dataclasses.replace(config, data=_data_dirs(config.data))


def _dataset(cfg: DatasetConfig, data: DataConfig | None) -> ImageDataset:
    data = _data_dirs(data)
    return load_dataset(cfg.name, Path(data.root).expanduser(), image_size=cfg.image_size, rotations=cfg.rotations,
                        download=cfg.download, cache_dir=Path(data.cache).expanduser(), path=cfg.path,
                        channels=cfg.channels, min_per_class=cfg.shots + cfg.queries)


def build_task_pools(source: DatasetConfig | Tensor, labels: Tensor | None = None, *,
                     settings: DatasetConfig | None = None, class_names: list[str] | None = None, seed: int = 0,
                     corruption: CorruptionConfig | None = None, data: DataConfig | None = None) -> TaskPools:
    """Draw the task pools from a dataset config (``name="folder"``, ``path=...``) or from tensors.

    Args:
        source: a :class:`DatasetConfig` (any dataset the CLI reads), or images ``[N, C, H, W]`` float in
            ``[0, 1]``.
        labels: with tensors: ``[N]`` int class per image.
        settings: with tensors: ways, shots, queries, pool sizes and split (``name``/``path`` unused).
        class_names: with tensors: a name per class (default ``"0"``, ``"1"``, ...).
        seed: the run's seed (the same seed gives the same pools, as in ``metaif train``).
        corruption: label corruption of the training pool (default none).
        data: where built-in datasets live (default ``./data``).

    Returns:
        The pools; ``instance_id`` is the row of the image (of the tensors, or of the folder's sorted files).

    Raises:
        MetaifError: bad images or folder, too few classes or images for the tasks asked.
    """
    corruption = corruption or CorruptionConfig()
    if isinstance(source, DatasetConfig):
        cfg, dataset = source, _dataset(source, data)
    else:
        if labels is None:
            raise MetaifError("build_task_pools(images, labels): labels [N] are required with tensors")
        cfg = settings or DatasetConfig(name="folder")
        images = torch.as_tensor(source, dtype=torch.float32)
        if images.ndim != 4 or images.shape[0] != len(labels):
            raise MetaifError(f"images must be [N, C, H, W] with one label each; got {tuple(images.shape)} and "
                              f"{len(labels)} labels")
        labels = torch.as_tensor(labels, dtype=torch.long)
        names = class_names or [str(c) for c in range(int(labels.max()) + 1)]
        dataset = ImageDataset("tensors", images, labels, names)
    pools = build_pools(dataset, cfg, corruption, seed)
    return TaskPools(dataset, pools, pools_table(pools, dataset))


def save_image_folder(images: Tensor, labels: Tensor, root: str | Path, class_names: list[str] | None = None) -> Path:
    """Write images ``[N, C, H, W]`` in ``[0, 1]`` as ``root/<class>/<row>.png`` (8 bits), for ``dataset=folder``.

    Row ``i`` becomes ``<class>/{i:06d}.png``, so the folder's sorted order groups by class; a
    run directory needs its data on disk, which tensors alone are not.
    """
    from PIL import Image

    root = Path(root)
    pixels = (torch.as_tensor(images).clamp(0, 1) * 255).round().to(torch.uint8)  # [N, C, H, W]
    for i, (img, c) in enumerate(zip(pixels, torch.as_tensor(labels).tolist())):
        folder = root / (class_names[c] if class_names else f"class{c:04d}")
        folder.mkdir(parents=True, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"{i:06d}.png")
    return root


def write_run(run_dir: str | Path, state_dict: Mapping[str, Tensor], config: TrainConfig) -> dict:
    """Write a run directory from weights in memory; ``metaif score run=<run_dir>`` then works.

    Args:
        run_dir: the new directory (refused if it holds files).
        state_dict: the network's ``state_dict()`` (plain, or with learn2learn's ``module.`` prefix).
        config: the settings the weights were meta-trained with (dataset, model, meta, optim, seed):
            ``prune-and-retrain`` retrains with them.

    Returns:
        ``results.json``: meta-test accuracy and loss of the weights with 95% intervals.

    Raises:
        MetaifError: the state dict does not fit (missing and unexpected keys listed), the directory
            holds a run, the data cannot be loaded.
    """
    state = {k: v.detach().cpu() for k, v in strip_prefixes(state_dict).items()}
    exp = build_experiment(_resolved(config))
    lam = lam_from_state_dict(exp, state)
    return write_run_dir(exp, lam, Path(run_dir), {"weights": "state_dict given to metaif_cli.api.write_run"})


def import_weights(run_dir: str | Path, weights: str | Path, config: TrainConfig) -> dict:
    """``metaif import`` in Python: :func:`write_run` from a file read with ``torch.load(weights_only=True)``."""
    return write_run(run_dir, read_state_dict(Path(weights)), config)


def _score_config(run_dir: Path, settings: Mapping[str, Any]) -> ScoreConfig:
    kwargs: dict[str, Any] = {"progress": False, "plots": False}
    nested = {f.name: f for f in dataclasses.fields(ScoreConfig)}
    for key, value in settings.items():
        if key not in nested:
            raise MetaifError(f"score(): unknown setting {key!r}; choose from {', '.join(sorted(nested))}")
        field = nested[key]
        if isinstance(value, Mapping) and field.default_factory is not dataclasses.MISSING:
            value = type(field.default_factory())(**value)  # e.g. hessian={"num_tasks": 64}
        kwargs[key] = value
    return ScoreConfig(run=str(run_dir), **kwargs)


def score(run_dir: str | Path, out_dir: str | Path | None = None, **settings: Any) -> Scores:
    """Score a run directory exactly as ``metaif score`` does (the same pipeline).

    Args:
        run_dir: a run written by ``metaif train``, ``metaif import`` or :func:`write_run`.
        out_dir: where to write the CLI's files; ``None``: a temporary directory, removed afterwards.
        **settings: ``metaif score`` options by name, nested groups as dicts: ``unit="task"``,
            ``method="if"``, ``hessian={"num_tasks": 64}``, ``solver={"tol": 1e-3}``,
            ``evaluation={"num_tasks": 50}``, ``dtype="float64"``. ``plots`` and ``progress`` default off.

    Returns:
        :class:`Scores` with the CLI's tables and the iHVP.

    Raises:
        MetaifError: as ``metaif score`` (unknown setting, unfinished run, unconverged solve, ...).
    """
    cfg = _score_config(Path(run_dir), settings)
    target = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="metaif-score-"))
    try:
        score_pipeline(cfg, target)
        result = load_scores(target)
    finally:
        if out_dir is None:
            shutil.rmtree(target, ignore_errors=True)
    if out_dir is None:
        result.out_dir = None
    return result


def load_scores(score_dir: str | Path) -> Scores:
    """Read a ``metaif score`` directory.

    Raises:
        MetaifError: the directory holds no finished scores (``score.json`` missing).
    """
    score_dir = Path(score_dir)
    if not (score_dir / C.SCORE_JSON).exists():
        raise MetaifError(f"{score_dir} holds no finished scores ({C.SCORE_JSON} missing); run metaif score first")

    fix = f"rerun the metaif score command that wrote {score_dir}"
    summary = load_json(score_dir / C.SCORE_JSON, fix)

    def table(name: str) -> pd.DataFrame | None:
        path = score_dir / name
        if isinstance(summary, dict):
            check_recorded(path, summary, fix)  # not a table of an earlier or another scoring
        return read_csv(path, fix, columns=("task_id", "rank", "corrupted")) if path.exists() else None

    ihvp_path = score_dir / C.IHVP_PT
    ihvp = load_torch(ihvp_path, fix, keys=("s",))["s"] if ihvp_path.exists() else None
    return Scores(table(C.TASK_SCORES_CSV), table(C.INSTANCE_SCORES_CSV), ihvp, summary, score_dir)
