"""Typed configuration of ``metaif import`` (``conf/train/import.yaml``; method §1: the settings of a run)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from metaif_cli.train.config import TrainConfig


@dataclass
class ImportConfig(TrainConfig):
    """A :class:`TrainConfig` (the settings the weights were meta-trained with) plus where from and to.

    ``weights``: a ``state_dict`` file (plain PyTorch, or learn2learn's ``MAML`` wrapper with its
    ``module.`` prefix); ``run_dir``: the new run directory.
    """

    run_dir: str = "???"
    weights: str = "???"

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` part, as ``metaif train`` would have saved it."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})
