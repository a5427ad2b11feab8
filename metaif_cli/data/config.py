"""Typed configuration of the data: where datasets live, the few-shot tasks, label corruption
(method §1 and §6).

Dataclasses only; Hydra composes ``conf/train/dataset/*.yaml`` on top of them in the command
layer, the core receives them as plain objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from metaif_cli.checks import choice, fraction, integer, non_empty, positive
from metaif_cli.errors import MetaifError

DATASETS = ("digits", "omniglot", "mnist", "miniimagenet", "folder")


@dataclass
class DataConfig:
    """Where datasets live: ``root`` is ``$METAIF_DATA`` or ``./data``; processed copies go to
    ``cache`` (``$METAIF_CACHE`` or ``./.cache/metaif``)."""

    root: str = "${oc.env:METAIF_DATA,./data}"
    cache: str = "${oc.env:METAIF_CACHE,.cache/metaif}"


@dataclass
class DatasetConfig:
    """The dataset and the few-shot tasks drawn from it (method §1)."""

    name: str = "digits"
    ways: int = 5
    shots: int = 1
    queries: int = 5
    num_train_tasks: int = 200
    num_val_tasks: int = 50
    num_test_tasks: int = 200
    split_by: str = "class"
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    image_size: Optional[int] = None
    rotations: bool = False
    download: bool = False
    path: Optional[str] = None  # folder: the image folder (recorded absolute)
    channels: Optional[int] = None  # folder: 1 grey, 3 RGB, null = the first image's

    def __post_init__(self) -> None:
        choice("dataset.name", self.name, DATASETS)
        choice("dataset.split_by", self.split_by, ("class", "instance"))
        for key in ("ways", "shots", "queries", "num_train_tasks", "num_val_tasks", "num_test_tasks"):
            integer(f"dataset.{key}", getattr(self, key), minimum=1)
        if self.ways < 2:
            raise MetaifError(f"dataset.ways={self.ways} is not valid; a task needs at least 2 classes")
        if len(self.split_fractions) != 3:
            raise MetaifError("dataset.split_fractions must be three positive numbers (train, val, test), "
                              "e.g. dataset.split_fractions=[0.6,0.2,0.2]")
        for f in self.split_fractions:
            positive("dataset.split_fractions", f)
        if self.image_size is not None:
            integer("dataset.image_size", self.image_size, minimum=1)
        if self.channels is not None and self.channels not in (1, 3):
            raise MetaifError(f"dataset.channels={self.channels} is not valid; use 1 (grey), 3 (RGB) or null")
        if self.path is not None:  # saved runs must find the folder from any working directory
            self.path = str(Path(self.path).expanduser().resolve())


@dataclass
class CorruptionConfig:
    """Label corruption for the harmful-data experiments (method §6).

    ``task_mode``: ``permute`` shuffles the labels among a task's instances (support and
    query independently), ``replace`` gives every instance a random wrong label, ``shift``
    keeps the support and labels every query instance of class ``c`` as ``c + 1`` (a
    consistent wrong rule, which meta-training learns: the most harmful of the three). Instance
    corruption flips single labels to a random wrong one in the roles listed.
    """

    task_fraction: float = 0.0
    task_mode: str = "replace"
    instance_fraction: float = 0.0
    instance_roles: list[str] = field(default_factory=lambda: ["support", "query"])

    def __post_init__(self) -> None:
        fraction("corruption.task_fraction", self.task_fraction)
        fraction("corruption.instance_fraction", self.instance_fraction)
        choice("corruption.task_mode", self.task_mode, ("permute", "replace", "shift"))
        for role in self.instance_roles:
            choice("corruption.instance_roles", role, ("support", "query"))
        if self.instance_fraction > 0:
            non_empty("corruption.instance_roles", self.instance_roles, "[support,query]")
