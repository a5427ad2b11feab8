"""The in-memory image dataset every loader returns (method §1).

A loader turns files on disk into an :class:`ImageDataset`: all images as one float
tensor, an integer class per image, and optionally a fixed class split. The instance id
used everywhere in metaif (``tasks.csv``, scores) is the row index into ``images``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageDataset:
    """Images, their classes and (optionally) a predefined class split.

    Attributes:
        name: dataset name (``digits``, ``omniglot``, ``mnist``, ``miniimagenet``).
        images: ``[N, C, H, W]`` float32 in ``[0, 1]``.
        labels: ``[N]`` int64 class index in ``[0, len(class_names))``.
        class_names: human-readable name of each class.
        splits: class indices per split (``train``/``val``/``test``) when the dataset
            defines a standard split (Mini-ImageNet); ``None`` means metaif draws a
            seeded split.
        fingerprint: SHA-256 of the source images and labels (``""``: not yet computed;
            :func:`metaif_cli.data.registry.load_dataset` fills it in). Runs record it, and
            scoring an old run refuses data that changed since (README "Run directory").
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    splits: dict[str, list[int]] | None = field(default=None)
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be [N] with one class per image")
        # the contract every loader keeps (a last guard against a blind cast upstream)
        if not self.images.is_floating_point():
            raise ValueError(f"images must be floats in [0, 1], got {self.images.dtype}")
        if self.images.numel():
            lo, hi = float(self.images.min()), float(self.images.max())
            if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
                raise ValueError(f"{self.name}: image values range over [{lo:g}, {hi:g}], expected [0, 1]")
        if self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64, got {self.labels.dtype}")
        if self.labels.numel() and not (0 <= int(self.labels.min()) and int(self.labels.max()) < len(self.class_names)):
            raise ValueError("labels must index class_names")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]
