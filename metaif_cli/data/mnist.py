"""Load MNIST from its official IDX files as an :class:`ImageDataset` (SPEC section 6:
the dataset of E3).

Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``) in
``root/MNIST/raw`` (torchvision's layout) or ``root``, and uses every complete
images+labels pair it finds, train rows first. The IDX format is parsed here (not with
``torchvision.datasets.MNIST``, which insists on all four files) so that the test pair
alone loads, and so that a bad magic number or a truncated file names the file.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from metaif_cli.data.base import ImageDataset
from metaif_cli.errors import MetaifError

log = logging.getLogger(__name__)

SPLITS = ("train", "t10k")
IMAGES_MAGIC = 2051  # unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # unsigned byte, 1 dimension


def _search_dirs(root: Path) -> list[Path]:
    return [root / "MNIST" / "raw", root]


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _find_pairs(root: Path) -> list[tuple[Path, Path]]:
    """The (images, labels) files of each split present, train first.

    Raises:
        MetaifError: a split has its images file but not its labels file, or vice versa.
    """
    pairs = []
    for split in SPLITS:
        for directory in _search_dirs(root):
            images = _find(directory, f"{split}-images-idx3-ubyte")
            labels = _find(directory, f"{split}-labels-idx1-ubyte")
            if images and labels:
                pairs.append((images, labels))
                break
            if images or labels:
                have, need = (images, "labels") if images else (labels, "images")
                raise MetaifError(
                    f"MNIST {split} {need} file missing beside {have}; add "
                    f"{split}-{need}-idx{'1' if need == 'labels' else '3'}-ubyte(.gz) or remove it"
                )
    return pairs


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one unsigned-byte IDX file (plain or gzip) and check its header.

    Args:
        path: the file.
        magic: expected magic number (2051 for images, 2049 for labels).

    Returns:
        uint8 array shaped as the header says.

    Raises:
        MetaifError: unreadable, bad magic number, or wrong length.
    """
    fix = "delete it and fetch MNIST again (dataset.download=true)"
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise MetaifError(f"MNIST file {path} is corrupt or unreadable ({exc}); {fix}") from exc
    ndim = magic % 256
    if len(data) < 4 + 4 * ndim:
        raise MetaifError(f"MNIST file {path} is truncated ({len(data)} bytes); {fix}")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise MetaifError(f"MNIST file {path} has magic number {found}, expected {magic}; {fix}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise MetaifError(
            f"MNIST file {path} holds {len(body)} data bytes, its header says {int(np.prod(shape))}; {fix}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _download(root: Path) -> None:
    import torchvision.datasets

    for train in (True, False):
        try:
            torchvision.datasets.MNIST(str(root), train=train, download=True)
        except Exception as exc:
            raise MetaifError(
                f"could not download MNIST into {root} ({exc}); put the IDX files in "
                f"{root / 'MNIST' / 'raw'} by hand and set data.root={root}"
            ) from exc


def load_mnist(root: Path, download: bool = False) -> ImageDataset:
    """Load every MNIST split found under ``root``.

    Args:
        root: folder holding ``MNIST/raw/*-idx?-ubyte(.gz)`` or the IDX files directly.
        download: fetch MNIST with torchvision when no IDX pair is found.

    Returns:
        ``[N, 1, 28, 28]`` float32 in ``[0, 1]``, classes ``"0"`` .. ``"9"``, train rows
        before test rows, no predefined split.

    Raises:
        MetaifError: no files (and no download asked), download failed, or a file is
            corrupt.
    """
    root = Path(root).expanduser()
    pairs = _find_pairs(root)
    if not pairs and download:
        log.info("no MNIST under %s; downloading it with torchvision", root)
        _download(root)
        pairs = _find_pairs(root)
    if not pairs:
        raise MetaifError(
            f"no MNIST IDX files (train-/t10k-images-idx3-ubyte[.gz] with their labels-idx1 "
            f"files) in {root / 'MNIST' / 'raw'} or {root}; "
            "set data.root=<folder holding them> or dataset.download=true"
        )

    images, labels = [], []
    for image_file, label_file in pairs:
        x = read_idx(image_file, IMAGES_MAGIC)
        y = read_idx(label_file, LABELS_MAGIC)
        if len(x) != len(y):
            raise MetaifError(
                f"MNIST {image_file} has {len(x)} images but {label_file} has {len(y)} labels; "
                "delete both and fetch MNIST again"
            )
        if y.size and y.max() > 9:
            raise MetaifError(
                f"MNIST {label_file} holds label {int(y.max())} > 9; delete it and fetch it again"
            )
        images.append(torch.from_numpy(x.copy()))
        labels.append(torch.from_numpy(y.astype(np.int64)))
        log.info("read %d MNIST images from %s", len(x), image_file)

    images_t = torch.cat(images).unsqueeze(1).to(torch.float32).div_(255.0)  # [N, 1, 28, 28]
    return ImageDataset(
        name="mnist",
        images=images_t,
        labels=torch.cat(labels),
        class_names=[str(c) for c in range(10)],
    )
