"""Load any ImageFolder-style directory of class subfolders as an :class:`ImageDataset` (method §1).

Layout (torchvision's ``ImageFolder``): ``<path>/<class>/<image>.{png,jpg,jpeg}``; or, to fix
the class split, ``<path>/{train,val,test}/<class>/<image>`` (all three present). Files are
listed with torchvision's own ``find_classes``/``make_dataset`` (sorted, so the instance id,
the row of an image, is stable across runs and machines) and decoded with
PIL through torchvision's own conversion (``torchvision.io``'s decoders are deprecated since
torchvision 0.29) as grey or RGB, then resized to ``image_size`` squared.

Bad input stops with one line naming the file or class (:class:`MetaifError`): an empty
folder, an image that cannot be decoded, a class with too few images for a task.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torchvision.datasets.folder import find_classes, make_dataset
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor, resize

from metaif_cli.data.base import ImageDataset
from metaif_cli.data.decode import corrupt, pil_to_uint8
from metaif_cli.errors import MetaifError

log = logging.getLogger(__name__)

FIX = "replace or delete it"

EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_DIRS = ("train", "val", "test")


def _has_class_dirs(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() for p in path.iterdir())


def _list(root: Path, prefix: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (``prefix`` + folder name) and ``(file, class index)`` pairs under ``root``."""
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        raise MetaifError(f"{root} holds no class subfolders; expected {root}/<class>/<image>.png") from None
    samples = make_dataset(str(root), class_to_idx, extensions=EXTENSIONS, allow_empty=True)
    return [prefix + c for c in classes], samples


def list_folder(path: Path) -> tuple[list[str], list[tuple[str, int]], dict[str, list[int]] | None]:
    """Every image file with its class, and the fixed split when ``train/val/test`` exist.

    Returns:
        ``(class_names, samples, splits)``: ``samples`` are ``(file, class index)`` sorted by
        class then file name; ``splits`` maps ``train``/``val``/``test`` to class indices, or
        is ``None`` (metaif draws a seeded class split).

    Raises:
        MetaifError: the folder does not exist or is empty, only some split folders exist, or a
            class folder has no PNG/JPEG images.
    """
    if not path.is_dir():
        raise MetaifError(f"dataset.path={path} is not a directory; point it at a folder of class subfolders")
    present = [s for s in SPLIT_DIRS if _has_class_dirs(path / s)]
    splits: dict[str, list[int]] | None = None
    if present:
        missing = [s for s in SPLIT_DIRS if s not in present]
        if missing:
            raise MetaifError(f"{path} has {'/'.join(present)} split folders but no {'/'.join(missing)}; "
                              "give all of train/, val/ and test/ (each with class subfolders) or none")
        names, samples, splits = [], [], {}
        for split in SPLIT_DIRS:
            part_names, part = _list(path / split, f"{split}/")
            splits[split] = list(range(len(names), len(names) + len(part_names)))
            samples += [(f, c + len(names)) for f, c in part]
            names += part_names
    else:
        names, samples = _list(path, "")
    if not samples:
        raise MetaifError(f"{path} holds no PNG or JPEG images; expected {path}/<class>/<image>.png")
    counts = torch.bincount(torch.tensor([c for _, c in samples]), minlength=len(names))
    for c in torch.nonzero(counts == 0).flatten().tolist():
        raise MetaifError(f"class {names[c]!r} ({path / names[c]}) holds no PNG or JPEG images; "
                          "add images or remove the folder")
    return names, samples, splits


def _open(file: str, mode: str | None) -> Image.Image:
    """The image, converted to ``mode`` (``L`` grey, ``RGB``) unless ``None``; a bad file is named.

    16-bit and float images are scaled to 8 bits by their range (``convert`` alone clips them
    to white); any decoder error (PIL's OSError or SyntaxError, zlib, a decompression bomb)
    ends in ``corrupt or unreadable: <file>``.
    """
    try:
        with Image.open(file) as img:
            img.load()
            return Image.fromarray(pil_to_uint8(img, mode, file, FIX)) if mode else img.copy()
    except MetaifError:
        raise
    except Exception as exc:
        raise corrupt(file, exc, FIX) from None


def _decode(file: str, mode: str, size: int) -> torch.Tensor:
    return resize(pil_to_tensor(_open(file, mode)), [size, size], antialias=True)  # [C, S, S] uint8


def _infer_channels(file: str) -> int:
    return 1 if _open(file, None).mode in ("1", "L", "LA", "I", "I;16", "F") else 3


def load_folder(path: Path, *, image_size: int | None, channels: int | None, min_per_class: int = 1,
                name: str = "folder") -> ImageDataset:
    """Decode every image of an ImageFolder-style directory.

    Args:
        path: the folder (``<class>/<image>`` or ``{train,val,test}/<class>/<image>``).
        image_size: side of the square images after resizing (default 28).
        channels: 1 (grey) or 3 (RGB); ``None`` takes the first image's (grey+alpha counts as grey).
        min_per_class: images each class needs (``shots + queries``).
        name: the dataset name recorded in the :class:`ImageDataset`.

    Returns:
        ``images [N, C, S, S]`` float32 in ``[0, 1]``, one row per file in sorted order.

    Raises:
        MetaifError: see :func:`list_folder`; an image that cannot be decoded (named); a class with
            fewer than ``min_per_class`` images (named).
    """
    path = Path(path).expanduser()
    names, samples, splits = list_folder(path)
    counts = torch.bincount(torch.tensor([c for _, c in samples]), minlength=len(names))
    short = torch.nonzero(counts < min_per_class).flatten().tolist()
    if short:
        c = short[0]
        raise MetaifError(f"class {names[c]!r} ({path / names[c]}) has {int(counts[c])} images, fewer than "
                          f"shots+queries={min_per_class}; add images, remove the class, or lower "
                          "dataset.shots/dataset.queries")
    if channels not in (None, 1, 3):
        raise MetaifError(f"dataset.channels={channels} is not valid; use 1 (grey) or 3 (RGB)")
    channels = channels or _infer_channels(samples[0][0])
    size = image_size or 28
    mode = "L" if channels == 1 else "RGB"
    log.info("decoding %d images of %d classes from %s", len(samples), len(names), path)
    images = torch.stack([_decode(f, mode, size) for f, _ in samples]).float().div_(255.0)  # [N, C, S, S]
    labels = torch.tensor([c for _, c in samples], dtype=torch.long)
    return ImageDataset(name, images, labels, names, splits)
