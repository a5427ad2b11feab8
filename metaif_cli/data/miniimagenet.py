"""Load Mini-ImageNet (Vinyals et al.; Ravi & Larochelle split) as an :class:`ImageDataset`
(method §6: the dataset of E1-E2).

Two on-disk formats are read, from ``root``, ``root/miniimagenet`` or
``root/mini-imagenet``:

- learn2learn's cache pickles ``mini-imagenet-cache-{train,validation,test}.pkl``
  (``-val.pkl`` also accepted), each ``{'image_data': uint8 [N, 84, 84, 3],
  'class_dict': {class_name: [row, ...]}}``, including Python-2 pickles with byte keys;
  ``image_data`` may also be floats in ``[0, 1]`` or ``[0, 255]`` (scaled), anything else
  is refused;
- the Ravi-Larochelle layout ``{train,val,test}.csv`` (``filename,label``) beside
  ``images/<filename>``.

Classes are numbered split by split (train, val, test), sorted by name within a split,
and the split's class indices are returned in ``splits``. Mini-ImageNet cannot be
downloaded automatically. Pickles can run code when loaded: only read files you trust.
"""

from __future__ import annotations

import csv
import logging
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from metaif_cli.data.base import ImageDataset
from metaif_cli.data.decode import corrupt, pil_to_uint8, to_uint8
from metaif_cli.errors import MetaifError
from metaif_cli.progress import bar as progress_bar

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PICKLE_NAMES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-validation.pkl", "mini-imagenet-cache-val.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
_CHUNK = 1024  # images converted to float per step, to bound peak memory


def _search_dirs(root: Path) -> list[Path]:
    return [root, root / "miniimagenet", root / "mini-imagenet"]


def _find_pickles(directory: Path) -> dict[str, Path]:
    found = {}
    for split, names in PICKLE_NAMES.items():
        hits = [directory / n for n in names if (directory / n).is_file()]
        if hits:
            found[split] = hits[0]
    return found


def _find_csvs(directory: Path) -> dict[str, Path]:
    return {s: directory / f"{s}.csv" for s in SPLITS if (directory / f"{s}.csv").is_file()}


def _text(key: str | bytes) -> str:
    return key.decode("utf-8") if isinstance(key, bytes) else str(key)


def _row(r) -> int:
    """A row number: an integer (a float such as 3.5 or True is refused, not truncated)."""
    if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)):
        raise ValueError(f"row {r!r} is not an integer")
    return int(r)


def _read_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Return ``(image_data [N, H, W, 3] uint8, {class_name: rows})`` from one cache pickle."""
    fix = "delete it and rebuild it (learn2learn's MiniImagenet writes these files)"
    try:
        with path.open("rb") as f:
            try:
                blob = pickle.load(f)
            except UnicodeDecodeError:  # Python-2 pickle holding str
                f.seek(0)
                blob = pickle.load(f, encoding="latin1")
    except Exception as exc:  # UnpicklingError, EOFError, ImportError, ValueError, MemoryError...
        raise corrupt(path, exc, fix) from exc
    if not isinstance(blob, dict):
        raise MetaifError(f"Mini-ImageNet pickle {path} holds a {type(blob).__name__}, not a dict; {fix}")
    blob = {_text(k): v for k, v in blob.items()}
    if "image_data" not in blob or "class_dict" not in blob:
        raise MetaifError(
            f"Mini-ImageNet pickle {path} lacks 'image_data'/'class_dict' (has {sorted(blob)}); {fix}"
        )
    try:
        images = np.asarray(blob["image_data"])
    except Exception as exc:  # ragged lists and the like
        raise corrupt(path, exc, fix) from exc
    if images.ndim != 4 or images.shape[-1] != 3:
        raise MetaifError(
            f"Mini-ImageNet pickle {path}: image_data is {images.shape}, expected [N, H, W, 3]; {fix}"
        )
    images = to_uint8(images, path, "image_data values", fix)  # never a blind cast
    try:
        class_rows = {_text(name): [_row(r) for r in rows] for name, rows in dict(blob["class_dict"]).items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise MetaifError(f"Mini-ImageNet pickle {path}: class_dict must map class names to row numbers "
                          f"({exc}); {fix}") from exc
    bad = [r for rows in class_rows.values() for r in rows if not 0 <= r < len(images)]
    if bad:
        raise MetaifError(f"Mini-ImageNet pickle {path}: class_dict row {bad[0]} outside image_data; {fix}")
    return images, class_rows


def _read_csv_split(path: Path, image_size: int) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Read one ``filename,label`` CSV and its JPEGs from ``path.parent / 'images'``."""
    try:
        with path.open(newline="") as f:
            rows = [(r["filename"], r["label"]) for r in csv.DictReader(f)]
    except (KeyError, TypeError) as exc:
        raise MetaifError(f"Mini-ImageNet CSV {path} lacks a filename,label header ({exc}); fix its first line") from exc
    except Exception as exc:
        raise corrupt(path, exc, "restore it (filename,label per line)") from exc
    images = np.empty((len(rows), image_size, image_size, 3), dtype=np.uint8)
    class_rows: dict[str, list[int]] = {}
    progress = progress_bar(rows, desc=f"mini-imagenet {path.stem}", unit="img")
    for i, (filename, label) in enumerate(progress):
        file = path.parent / "images" / filename
        if not file.is_file():
            raise MetaifError(f"Mini-ImageNet image {file} listed in {path} is missing; restore it or "
                              "remove its line")
        try:
            with Image.open(file) as im:
                rgb = Image.fromarray(pil_to_uint8(im, "RGB", file))  # [H, W, 3] uint8: RGB
            if rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            images[i] = np.asarray(rgb, dtype=np.uint8)
        except MetaifError:
            raise
        except Exception as exc:  # UnidentifiedImageError, SyntaxError, zlib/struct errors, bombs...
            raise corrupt(file, exc, f"replace it (listed in {path})") from exc
        class_rows.setdefault(label, []).append(i)
    return images, class_rows


def _to_float(parts: list[np.ndarray], image_size: int) -> torch.Tensor:
    """``[N_i, H, W, 3]`` uint8 arrays -> one ``[sum N_i, 3, S, S]`` float32 in ``[0, 1]``.

    Fills a preallocated tensor chunk by chunk, so the peak is the float result plus
    the uint8 input (the full data is ~5 GB as float32).
    """
    out = torch.empty((sum(len(p) for p in parts), 3, image_size, image_size), dtype=torch.float32)
    row = 0
    for part in parts:
        for start in range(0, len(part), _CHUNK):
            x = torch.from_numpy(np.ascontiguousarray(part[start : start + _CHUNK]))
            x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)  # [B, 3, H, W]
            if x.shape[-2:] != (image_size, image_size):
                x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
                x = x.clamp_(0.0, 1.0)
            out[row : row + len(x)] = x
            row += len(x)
    return out


def _missing_error(root: Path) -> MetaifError:
    names = ", ".join(n for names in PICKLE_NAMES.values() for n in names)
    dirs = ", ".join(str(d) for d in _search_dirs(root))
    return MetaifError(
        f"no Mini-ImageNet found in {dirs} (looked for {names}, or train.csv/val.csv/test.csv with "
        "images/); it cannot be downloaded automatically: get learn2learn's cache pickles "
        "(mini-imagenet-cache-{train,validation,test}.pkl) and set data.root=<their folder>"
    )


def load_miniimagenet(root: Path, image_size: int = 84) -> ImageDataset:
    """Load Mini-ImageNet with its standard class split.

    Args:
        root: folder holding the pickles or the CSV+JPEG layout (see module docstring).
        image_size: side of the square images returned (files hold 84x84).

    Returns:
        ``[N, 3, S, S]`` float32 RGB in ``[0, 1]``; ``splits`` maps ``train``/``val``/``test``
        to class indices (64/16/20 for the full data; a split whose file is absent is empty).

    Raises:
        MetaifError: nothing found, a file is corrupt, or a class is in two splits.
    """
    root = Path(root).expanduser()
    if image_size < 1:
        raise MetaifError(f"Mini-ImageNet image_size must be positive, got {image_size}")
    files: dict[str, Path] = {}
    for directory in _search_dirs(root):
        files = _find_pickles(directory) or _find_csvs(directory)
        if files:
            break
    if not files:
        raise _missing_error(root)
    for split in SPLITS:
        if split not in files:
            beside = next(iter(files.values()))
            log.warning("Mini-ImageNet %s split not found beside %s; it will be empty", split, beside)

    parts, labels, class_names = [], [], []
    splits: dict[str, list[int]] = {s: [] for s in SPLITS}
    owner: dict[str, str] = {}
    for split in SPLITS:
        if split not in files:
            continue
        path = files[split]
        data, class_rows = _read_pickle(path) if path.suffix == ".pkl" else _read_csv_split(path, image_size)
        for name in sorted(class_rows):
            if name in owner:
                raise MetaifError(
                    f"Mini-ImageNet class {name} is in both {owner[name]} and {split}; fix the split files"
                )
            owner[name] = split
            rows = sorted(class_rows[name])
            splits[split].append(len(class_names))
            labels.append(torch.full((len(rows),), len(class_names), dtype=torch.int64))
            class_names.append(name)
            parts.append(data[rows])  # uint8 copy; the split's full array is freed below
        log.info("read Mini-ImageNet %s: %d classes from %s", split, len(splits[split]), path)
        del data
    if not parts:
        listed = ", ".join(sorted(map(str, files.values())))
        raise MetaifError(f"Mini-ImageNet files {listed} hold no classes; rebuild them")
    return ImageDataset(
        name="miniimagenet",
        images=_to_float(parts, image_size),
        labels=torch.cat(labels),
        class_names=class_names,
        splits=splits,
    )
