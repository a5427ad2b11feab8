"""Map a dataset name from the config to its loader (method §1).

The one place the command layer calls to get an :class:`ImageDataset`; names are short
registry keys, never import paths, so saved runs do not depend on module layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.nn.functional as F

from metaif_cli.data.base import ImageDataset
from metaif_cli.errors import MetaifError
from metaif_cli.fingerprint import tensors_digest

log = logging.getLogger(__name__)

DATASETS = ("digits", "omniglot", "mnist", "miniimagenet", "folder")


def _resize(dataset: ImageDataset, image_size: int | None) -> ImageDataset:
    """Resize a fixed-size dataset (digits, MNIST) when another size is asked for."""
    if image_size is None or dataset.images.shape[-1] == image_size == dataset.images.shape[-2]:
        return dataset
    log.info("resizing %s to %dx%d", dataset.name, image_size, image_size)
    dataset.images = F.interpolate(
        dataset.images, size=(image_size, image_size), mode="bilinear", antialias=True
    ).clamp_(0.0, 1.0)  # [N, C, S, S]
    return dataset


def load_dataset(
    name: str,
    root: Path,
    *,
    image_size: int | None,
    rotations: bool,
    download: bool,
    cache_dir: Path | None = None,
    path: str | None = None,
    channels: int | None = None,
    min_per_class: int = 1,
) -> ImageDataset:
    """Load the dataset called ``name``.

    Args:
        name: one of :data:`DATASETS`.
        root: data folder (ignored for ``digits``, which ships with scikit-learn).
        image_size: side of the square images; ``None`` keeps the dataset's own
            (8 digits, 28 Omniglot and MNIST, 84 Mini-ImageNet).
        rotations: add rotated classes (Omniglot only).
        download: let torchvision fetch Omniglot or MNIST when absent.
        cache_dir: where processed Omniglot tensors are cached.
        path, channels, min_per_class: ``folder`` only (:func:`metaif_cli.data.folder.load_folder`).

    Returns:
        The loaded dataset.

    Raises:
        MetaifError: unknown name, rotations asked for a dataset other than Omniglot, or
            the loader's own errors (missing or corrupt files).
    """
    if name not in DATASETS:
        raise MetaifError(f"unknown dataset {name!r}; set dataset.name to one of {', '.join(DATASETS)}")
    if rotations and name != "omniglot":
        raise MetaifError(
            f"dataset.rotations=true is only supported for omniglot, not {name}; set it to false"
        )
    if image_size is not None and image_size < 1:
        raise MetaifError(f"dataset.image_size must be positive, got {image_size}")
    dataset = _load(name, Path(root).expanduser(), image_size=image_size, rotations=rotations, download=download,
                    cache_dir=cache_dir, path=path, channels=channels, min_per_class=min_per_class)
    if not dataset.fingerprint:  # Omniglot records it in its cache; the others are hashed here
        dataset.fingerprint = tensors_digest(dataset.images, dataset.labels, "\n".join(dataset.class_names))
    return dataset


def _load(name: str, root: Path, *, image_size: int | None, rotations: bool, download: bool,
          cache_dir: Path | None, path: str | None, channels: int | None, min_per_class: int) -> ImageDataset:
    if name == "folder":
        from metaif_cli.data.folder import load_folder

        if not path:
            raise MetaifError("dataset=folder needs dataset.path=<folder of class subfolders of images>")
        return load_folder(Path(path), image_size=image_size, channels=channels, min_per_class=min_per_class)
    if name == "digits":
        from metaif_cli.data.digits import load_digits

        return _resize(load_digits(), image_size)
    if name == "mnist":
        from metaif_cli.data.mnist import load_mnist

        return _resize(load_mnist(root, download=download), image_size)
    if name == "omniglot":
        from metaif_cli.data.omniglot import load_omniglot

        return load_omniglot(root, image_size=image_size or 28, rotations=rotations, download=download,
                             cache_dir=cache_dir)
    from metaif_cli.data.miniimagenet import load_miniimagenet

    if download:
        log.info("Mini-ImageNet cannot be downloaded automatically; reading it from %s", root)
    return load_miniimagenet(root, image_size=image_size or 84)
