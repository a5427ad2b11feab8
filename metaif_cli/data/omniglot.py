"""Load Omniglot (Lake et al.) as an :class:`ImageDataset`, one class per character
(method §6: the dataset of E1, E2 and E4).

Reads any of the layouts Omniglot ships in, under ``root`` or ``root/omniglot``:
torchvision's ``omniglot-py/images_background/<alphabet>/<character>/*.png``, the
official zips extracted (``images_background/...``), or the official zips themselves
(``images_background.zip``, ``images_evaluation.zip``, ``images_background_small1.zip``,
``images_background_small2.zip``), read in place with :mod:`zipfile`. Classes are keyed
``alphabet/character``; a character seen in several sets (Greek and Latin are in both
small zips) is merged, file names deduplicated. Images are resized, inverted so strokes
are 1 and paper 0, and cached as uint8 in ``cache_dir`` keyed by the source files (names,
sizes, and a zip member's CRC-32 or a file's modification time, so images rewritten in place
are read again) and the image size; the cache records the images' content fingerprint,
hashed once when it is built. ``rotations=True`` adds the 90/180/270 degree copies as new classes
(the MAML augmentation).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metaif_cli.data.base import ImageDataset
from metaif_cli.data.decode import corrupt, pil_to_uint8
from metaif_cli.errors import MetaifError
from metaif_cli.fingerprint import tensors_digest
from metaif_cli.progress import bar as progress_bar
from metaif_cli.io import save_torch

log = logging.getLogger(__name__)

SET_NAMES = (
    "images_background",
    "images_evaluation",
    "images_background_small1",
    "images_background_small2",
)
ROTATIONS = (0, 90, 180, 270)
_CACHE_VERSION = 2  # 2: keyed by content stamps too, and records the images' fingerprint


@dataclass(frozen=True)
class _Entry:
    """One PNG: its class key, file name, where it lives, its byte size and what tells its content
    changed (a zip member's CRC-32; a file's modification time in nanoseconds)."""

    class_key: str
    file_name: str
    source: Path
    member: str  # zip member name, or "" when ``source`` is the PNG itself
    size: int
    stamp: int = 0


def default_cache_dir() -> Path:
    """``$METAIF_CACHE`` if set, else ``~/.cache/metaif``."""
    env = os.environ.get("METAIF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metaif"


def _find_sources(root: Path) -> list[Path]:
    """Every Omniglot folder or zip under ``root``, folders before zips of the same set.

    Listing a source is cheap; :func:`_collect` keeps the first copy of each image, so an
    extracted folder beside its zip costs nothing extra.
    """
    sources = []
    for set_name in SET_NAMES:
        for base in (root, root / "omniglot"):
            candidates = [
                base / "omniglot-py" / set_name,
                base / set_name,
                base / f"{set_name}.zip",
                base / "omniglot-py" / f"{set_name}.zip",
            ]
            sources += [p for p in candidates if (p.is_file() if p.suffix == ".zip" else p.is_dir())]
    return sources


def _list_zip(path: Path) -> list[_Entry]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except Exception as exc:  # BadZipFile, OSError, struct.error, UnicodeDecodeError, ValueError
        raise corrupt(path, exc) from exc
    entries = []
    for info in infos:
        parts = info.filename.split("/")
        if info.is_dir() or len(parts) < 3 or "__MACOSX" in parts:
            continue
        if parts[-1].lower().endswith(".png"):
            key = f"{parts[-3]}/{parts[-2]}"
            entries.append(_Entry(key, parts[-1], path, info.filename, info.file_size, info.CRC))
    return entries


def _list_dir(path: Path) -> list[_Entry]:
    out = []
    for png in path.glob("*/*/*.png"):
        st = png.stat()
        out.append(_Entry(f"{png.parent.parent.name}/{png.parent.name}", png.name, png, "", st.st_size, st.st_mtime_ns))
    return out


def _collect(sources: list[Path]) -> list[_Entry]:
    """All distinct PNGs, sorted by class key then file name (first source wins)."""
    seen: dict[tuple[str, str], _Entry] = {}
    for source in sources:
        listed = _list_zip(source) if source.suffix == ".zip" else _list_dir(source)
        for entry in listed:
            seen.setdefault((entry.class_key, entry.file_name), entry)
    return [seen[k] for k in sorted(seen)]


def _cache_key(entries: list[_Entry], image_size: int) -> str:
    digest = hashlib.sha256(f"omniglot v{_CACHE_VERSION} size={image_size}\n".encode())
    for e in entries:
        digest.update(f"{e.class_key}/{e.file_name}:{e.size}:{e.stamp}\n".encode())
    return digest.hexdigest()


def _decode(data: bytes, image_size: int, where: str = "<bytes>") -> np.ndarray:
    """PNG bytes -> ``[S, S]`` uint8 with strokes 255 and background 0.

    16-bit and float PNGs are scaled to 8 bits by their range (``convert("L")`` alone
    would clip them to white).
    """
    with Image.open(io.BytesIO(data)) as im:
        grey = Image.fromarray(pil_to_uint8(im, "L", where))
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(grey, dtype=np.uint8)


def _read_images(entries: list[_Entry], image_size: int) -> torch.Tensor:
    """Decode every entry into ``[N, 1, S, S]`` uint8, opening each zip once."""
    out = np.empty((len(entries), 1, image_size, image_size), dtype=np.uint8)
    zips: dict[Path, zipfile.ZipFile] = {}
    try:
        for i, e in enumerate(progress_bar(entries, desc="omniglot", unit="img")):
            where = f"{e.source}:{e.member}" if e.member else str(e.source)
            try:
                if e.member:
                    if e.source not in zips:
                        zips[e.source] = zipfile.ZipFile(e.source)
                    data = zips[e.source].read(e.member)
                else:
                    data = e.source.read_bytes()
                out[i, 0] = _decode(data, image_size, where)
            except MetaifError:
                raise
            except Exception as exc:  # zlib.error, BadZipFile (CRC), PIL's SyntaxError/OSError, bombs...
                raise corrupt(where, exc, "delete the file and fetch the dataset again") from exc
    finally:
        for zf in zips.values():
            zf.close()
    return torch.from_numpy(out)


def _load_cache(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") != key:
            raise ValueError("cache key mismatch")
        images, labels = blob["images"], blob["labels"]
        if images.dtype != torch.uint8 or images.ndim != 4 or labels.dtype != torch.int64 \
                or labels.shape != images.shape[:1] or (len(labels) and len(blob["class_names"]) <= int(labels.max())):
            raise ValueError("cache holds tensors of the wrong dtype or shape")
        if not isinstance(blob.get("fingerprint"), str):
            raise ValueError("cache records no fingerprint")
        return blob
    except Exception as exc:  # a bad cache is rebuilt, never fatal
        log.warning("ignoring unreadable Omniglot cache %s (%s); rebuilding it", path, exc)
        return None


def _download(root: Path) -> None:
    import torchvision.datasets

    for background in (True, False):
        try:
            torchvision.datasets.Omniglot(str(root), background=background, download=True)
        except Exception as exc:
            raise MetaifError(
                f"could not download Omniglot into {root} ({exc}); fetch images_background.zip "
                f"and images_evaluation.zip by hand into {root} and set data.root={root}"
            ) from exc


def _with_rotations(
    u8: torch.Tensor, labels: torch.Tensor, names: list[str]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Append the 90/180/270 degree copies; class ``k*C + c`` is class ``c`` rotated by ``k*90``."""
    n_cls = len(names)
    images = torch.cat([torch.rot90(u8, k, dims=(2, 3)) for k in range(4)])  # [4N, 1, S, S]
    labels = torch.cat([labels + k * n_cls for k in range(4)])
    names = [f"{name}/rot{deg}" for deg in ROTATIONS for name in names]
    return images, labels, names


def load_omniglot(
    root: Path,
    image_size: int = 28,
    rotations: bool = False,
    download: bool = False,
    cache_dir: Path | None = None,
) -> ImageDataset:
    """Load every Omniglot image found under ``root``.

    Args:
        root: folder holding Omniglot in one of the layouts in the module docstring.
        image_size: side of the square images returned.
        rotations: add rotated copies as new classes. Rows ``0..N-1`` and classes
            ``0..C-1`` are the unrotated ones; rotation ``k`` (``k*90`` degrees) follows as
            rows ``k*N..`` with classes ``k*C..``, named ``alphabet/character/rot{deg}``.
        download: fetch the full Omniglot with torchvision when nothing is found.
        cache_dir: where processed tensors are cached; default :func:`default_cache_dir`.

    Returns:
        ``[N, 1, S, S]`` float32 images in ``[0, 1]`` (strokes 1), no predefined split.

    Raises:
        MetaifError: no images found (and no download asked), download failed, or a
            zip or PNG is corrupt.
    """
    root = Path(root).expanduser()
    if image_size < 1:
        raise MetaifError(f"Omniglot image_size must be positive, got {image_size}")
    entries = _collect(_find_sources(root))
    if not entries and download:
        log.info("no Omniglot under %s; downloading it with torchvision", root)
        _download(root)
        entries = _collect(_find_sources(root))
    if not entries:
        raise MetaifError(
            f"no Omniglot images found in {root} or {root / 'omniglot'} (looked for "
            f"omniglot-py/<set>/, <set>/ and <set>.zip with <set> in {', '.join(SET_NAMES)}); "
            "set data.root=<folder holding them> or dataset.download=true"
        )

    key = _cache_key(entries, image_size)
    cache_root = Path(cache_dir or default_cache_dir()).expanduser()
    cache_file = cache_root / f"omniglot-{image_size}px-{key[:16]}.pt"
    blob = _load_cache(cache_file, key)
    if blob is None:
        names = sorted({e.class_key for e in entries})
        index = {name: i for i, name in enumerate(names)}
        labels = torch.tensor([index[e.class_key] for e in entries], dtype=torch.int64)
        images_u8 = _read_images(entries, image_size)  # [N, 1, S, S]
        blob = {"key": key, "images": images_u8, "labels": labels, "class_names": names,
                "fingerprint": tensors_digest(images_u8, labels, "\n".join(names))}  # hashed once, here
        try:
            save_torch(blob, cache_file)
        except OSError as exc:
            log.warning("could not write Omniglot cache %s (%s); continuing without it", cache_file, exc)
    else:
        log.info("Omniglot read from cache %s", cache_file)

    u8, labels, names = blob["images"], blob["labels"], list(blob["class_names"])
    if rotations:
        u8, labels, names = _with_rotations(u8, labels, names)
    images = u8.to(torch.float32).div_(255.0)  # [N, 1, S, S]
    log.info("loaded Omniglot: %d images, %d classes, %dx%d", len(labels), len(names), image_size, image_size)
    return ImageDataset(name="omniglot", images=images, labels=labels, class_names=names,
                        fingerprint=blob["fingerprint"])
