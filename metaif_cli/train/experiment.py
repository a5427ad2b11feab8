"""Build everything a run needs from a :class:`TrainConfig`: data, pools, model, learner (method
§1).

``metaif train``, ``score`` and ``prune-and-retrain`` all rebuild a run through
:func:`build_experiment`, so a checkpoint plus its saved config is enough to
reconstruct the model and the exact task pools (STYLE, nanoGPT's self-describing
checkpoints).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from metaif_cli.data.base import ImageDataset
from metaif_cli.data.compact import compact_images
from metaif_cli.data.config import CorruptionConfig, DataConfig, DatasetConfig
from metaif_cli.data.gather import PoolTasks
from metaif_cli.data.pool import TaskPool, build_pools
from metaif_cli.data.registry import load_dataset
from metaif_cli.errors import MetaifError
from metaif_cli.influence.chunking import activation_floats, auto_chunk
from metaif_cli.meta.config import MetaConfig
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.models.config import ModelConfig
from metaif_cli.models.networks import MetaModel, build_model, params_of
from metaif_cli.train.config import OptimConfig, TrainConfig
from metaif_cli.train.loggers import LoggerConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
EVAL_BUDGET_MB = 1024  # memory one chunk of evaluated tasks may hold (as score's chunk_budget_mb)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MetaifError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


@dataclass
class Experiment:
    """A dataset, its pools and a meta-learner, on one device and dtype."""

    cfg: TrainConfig
    dataset: ImageDataset  # its images compact, as ``images`` (data.compact)
    images: torch.Tensor  # [N, C, H, W] on device, compact (uint8 where lossless; data.compact)
    pools: dict[str, TaskPool]
    model: MetaModel
    learner: MetaLearner
    device: torch.device
    dtype: torch.dtype

    def initial_params(self) -> dict[str, torch.Tensor]:
        """``lam`` at initialisation (drawn from the run's seed)."""
        return params_of(self.model, self.dtype, self.device)

    @cached_property
    def eval_chunk(self) -> int:
        """Tasks per vmapped call when evaluating a split: ``EVAL_BUDGET_MB`` over one task's estimated
        memory (:func:`metaif_cli.influence.chunking.auto_chunk`, at most 32)."""
        d, m = self.cfg.dataset, self.cfg.meta
        steps = m.inner_steps if m.eval_inner_steps is None else m.eval_inner_steps
        return auto_chunk(sum(p.numel() for p in self.model.parameters()),
                          activation_floats(self.model, self.dataset.image_shape), d.ways * (d.shots + d.queries),
                          steps, torch.empty((), dtype=self.dtype).element_size(), EVAL_BUDGET_MB)

    def tasks(self, split: str, index: torch.Tensor | None = None, weights: dict | None = None) -> PoolTasks:
        """Tasks of ``split`` (all, or ``index``), gathered per chunk in ``dtype`` (``weights`` over the pool)."""
        return PoolTasks.of(self.pools[split], self.images, self.dtype, index, weights)


def build_experiment(cfg: TrainConfig, device: str | None = None, dtype: str | None = None) -> Experiment:
    """Load the dataset, draw the pools from ``cfg.seed`` and build the model and learner."""
    dev = resolve_device(device or cfg.device)
    dt = DTYPES[dtype or cfg.dtype]
    dataset = load_dataset(
        cfg.dataset.name,
        Path(cfg.data.root).expanduser(),
        image_size=cfg.dataset.image_size,
        rotations=cfg.dataset.rotations,
        download=cfg.dataset.download,
        cache_dir=Path(cfg.data.cache).expanduser(),
        path=cfg.dataset.path,
        channels=cfg.dataset.channels,
        min_per_class=cfg.dataset.shots + cfg.dataset.queries,
    )
    pools = build_pools(dataset, cfg.dataset, cfg.corruption, cfg.seed)
    model = build_model(cfg.model, dataset.image_shape, cfg.dataset.ways, cfg.init_seed).to(device=dev, dtype=dt)
    log.info("dataset %s: %d images, %d classes; model %s with %d parameters", dataset.name,
             len(dataset.labels), dataset.num_classes, cfg.model.name, sum(p.numel() for p in model.parameters()))
    # compact (uint8 where lossless), converted per chunk of tasks (data.gather); the loader's float copy
    # is dropped: the experiment's dataset holds the compact tensor (checked as floats when it was loaded)
    dataset.images = compact_images(dataset.images)
    images = dataset.images.to(device=dev)
    return Experiment(cfg, dataset, images, pools, model, MetaLearner(model, cfg.meta), dev, dt)


def config_dict(cfg: TrainConfig) -> dict:
    """The config as plain data, for checkpoints and JSON.

    ``optim.batch_seed`` and ``model.init_seed`` are left out while null (their default,
    "use ``seed``"), so a run's saved config, checkpoints and retrainings are byte-identical
    to those written before the two settings existed, and compare equal to them.
    """
    out = asdict(cfg)
    for part, key in (("optim", "batch_seed"), ("model", "init_seed")):
        if out[part][key] is None:
            del out[part][key]
    return out


def config_from_dict(data: dict) -> TrainConfig:
    """Rebuild a :class:`TrainConfig` saved by :func:`config_dict` (validated again)."""
    parts = {"data": DataConfig, "dataset": DatasetConfig, "corruption": CorruptionConfig, "model": ModelConfig,
             "meta": MetaConfig, "optim": OptimConfig, "logger": LoggerConfig}
    try:
        kwargs = {k: (parts[k](**v) if k in parts else v) for k, v in data.items()}
        return TrainConfig(**kwargs)
    except (TypeError, AttributeError) as exc:  # a damaged or crafted saved config: unknown or missing keys
        raise MetaifError(f"the saved settings of this run are not metaif's ({' '.join(str(exc).split())[:160]}); "
                          "rerun the metaif train command that wrote it") from None
