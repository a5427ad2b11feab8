"""Load MNIST from its official IDX files as an :class:`ImageDataset` (method §6:
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
from pathlib import Path

import numpy as np
import torch

from metaif_cli.data.base import ImageDataset
from metaif_cli.data.decode import check_labels, corrupt, to_uint8
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


# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
FIX = "delete it and fetch MNIST again (dataset.download=true)"


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (plain or gzip) and check its header.

    The IDX header is two zero bytes, a type code and the number of dimensions, then
    one big-endian ``uint32`` per dimension. MNIST's files hold unsigned bytes; the other
    IDX types are read too, and their values checked by the caller (never cast blindly).

    Args:
        path: the file.
        magic: expected magic number of the unsigned-byte file (2051 for images, 2049 for
            labels); its last byte is the number of dimensions required.

    Returns:
        The array (native byte order) shaped as the header says.

    Raises:
        MetaifError: unreadable, bad header, or wrong length.
    """
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except Exception as exc:  # BadGzipFile, EOFError, zlib.error, OSError
        raise corrupt(path, exc, FIX) from exc
    ndim = magic % 256
    if len(data) < 4 + 4 * ndim:
        raise corrupt(path, ValueError(f"truncated: {len(data)} bytes"), FIX)
    zero, code, found_ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in IDX_DTYPES or found_ndim != ndim:
        raise corrupt(path, ValueError(f"magic number {struct.unpack('>I', data[:4])[0]}, expected {magic} "
                                       f"(an IDX file of {ndim} dimensions)"), FIX)
    dtype = IDX_DTYPES[code]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise corrupt(path, ValueError(f"holds {len(body)} data bytes, its header says "
                                       f"{int(np.prod(shape)) * dtype.itemsize}"), FIX)
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


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
        y = check_labels(y, 10, label_file, FIX)
        images.append(torch.from_numpy(to_uint8(x, image_file, fix=FIX).copy()))  # checked, never cast blindly
        labels.append(torch.from_numpy(y))
        log.info("read %d MNIST images from %s", len(x), image_file)

    images_t = torch.cat(images).unsqueeze(1).to(torch.float32).div_(255.0)  # [N, 1, 28, 28]
    return ImageDataset(
        name="mnist",
        images=images_t,
        labels=torch.cat(labels),
        class_names=[str(c) for c in range(10)],
    )
