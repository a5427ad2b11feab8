"""Issue 13, kinds 2 and 3: loaders never cast blindly, and no decoder error escapes them.

Kind 2 (silent data corruption by a cast): every loader checks the dtype and value range
of what it reads, accepting and scaling what is unambiguous (floats in [0, 1] or [0, 255],
integers in 0..255, 16-bit PNGs) and refusing the rest in one line.

Kind 3 (a decoder error escaping the loader): every exception a decoder raises on corrupt
input (zip, zlib, PIL, pickle, gzip, IDX) ends in the one-line
``corrupt or unreadable: <file>`` :class:`MetaifError`. Fixtures are written in the real
on-disk formats and then damaged byte by byte.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaif_cli.data import digits as digits_module
from metaif_cli.data.base import ImageDataset
from metaif_cli.data.miniimagenet import load_miniimagenet
from metaif_cli.data.mnist import load_mnist
from metaif_cli.data.omniglot import load_omniglot
from metaif_cli.errors import MetaifError

REPO = Path(__file__).resolve().parents[1]


def _assert_one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


def _assert_corrupt(exc: pytest.ExceptionInfo, where: str | Path) -> None:
    _assert_one_line(exc, f"corrupt or unreadable: {where}")


# ====================================================================== kind 2: casts


def _mini_pickles(folder: Path, make, n_classes: int = 2, n_images: int = 2) -> dict[str, np.ndarray]:
    """Write the three learn2learn cache pickles with ``image_data = make(shape, rng)``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for s, split in enumerate(("train", "validation", "test")):
        data = make((n_classes * n_images, 84, 84, 3), rng)
        class_dict = {f"n{s}{c:07d}": list(range(c * n_images, (c + 1) * n_images)) for c in range(n_classes)}
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)
        out[split] = data
    return out


def test_silent_cast_miniimagenet_float01_pickles_are_not_black(tmp_path):
    """The reported case: image_data float32 in [0, 1] loaded as all-black images."""
    data = _mini_pickles(tmp_path, lambda shape, rng: rng.random(shape, dtype=np.float32))
    ds = load_miniimagenet(tmp_path)
    assert ds.images.max() > 0.9 and ds.images.mean() > 0.4
    expected = torch.from_numpy(data["train"][0]).permute(2, 0, 1)
    assert torch.allclose(ds.images[0], expected, atol=0.5 / 255 + 1e-6)


def test_silent_cast_miniimagenet_reported_command_learns(tmp_path):
    """``metaif train dataset=miniimagenet ... debug=fast`` no longer ends at test loss ln 2."""
    _mini_pickles(tmp_path / "data", lambda shape, rng: rng.random(shape, dtype=np.float32))
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "metaif_cli.cli", "train", "dataset=miniimagenet",
                          f"data.root={tmp_path / 'data'}", "dataset.ways=2", "dataset.shots=1", "dataset.queries=1",
                          "dataset.image_size=8", "debug=fast", f"hydra.run.dir={run}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    import json

    results = json.loads((run / "results.json").read_text())
    assert not math.isclose(results["test_loss"], math.log(2), rel_tol=0, abs_tol=1e-6)


@pytest.mark.parametrize("kind", ["float255", "float64_01", "int64", "uint8"])
def test_silent_cast_miniimagenet_accepted_dtypes_are_scaled(tmp_path, kind):
    base = _mini_pickles(tmp_path / "ref", lambda shape, rng: rng.integers(0, 256, shape, dtype=np.uint8))
    convert = {"float255": lambda a: a.astype(np.float32), "float64_01": lambda a: a / 255.0,
               "int64": lambda a: a.astype(np.int64), "uint8": lambda a: a}[kind]
    it = iter(base.values())
    _mini_pickles(tmp_path / "x", lambda shape, rng: convert(next(it)))
    ref, got = load_miniimagenet(tmp_path / "ref"), load_miniimagenet(tmp_path / "x")
    assert torch.allclose(ref.images, got.images, atol=1e-6)


@pytest.mark.parametrize(("kind", "needle"), [
    ("nan", "NaN"), ("negative", "range"), ("above255", "range"), ("bool", "dtype bool"),
    ("complex", "dtype complex"), ("strings", "dtype <U"),
])
def test_silent_cast_miniimagenet_bad_values_refused(tmp_path, kind, needle):
    def make(shape, rng):
        a = rng.random(shape, dtype=np.float32)
        if kind == "nan":
            a[0, 0, 0, 0] = np.nan
        elif kind == "negative":
            a[1, 2, 3, 0] = -0.5
        elif kind == "above255":
            a = a * 300
        elif kind == "bool":
            a = a > 0.5
        elif kind == "complex":
            a = a.astype(np.complex64)
        else:
            a = np.full(shape, "x")
        return a

    _mini_pickles(tmp_path, make)
    with pytest.raises(MetaifError) as exc:
        load_miniimagenet(tmp_path)
    _assert_one_line(exc, "mini-imagenet-cache-", needle)


def test_silent_cast_miniimagenet_class_dict_rows_not_truncated(tmp_path):
    _mini_pickles(tmp_path, lambda shape, rng: rng.integers(0, 256, shape, dtype=np.uint8))
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    blob = pickle.loads(path.read_bytes())
    blob["class_dict"]["n00000000"] = [0.0, 1.5]
    path.write_bytes(pickle.dumps(blob))
    with pytest.raises(MetaifError) as exc:
        load_miniimagenet(tmp_path)
    _assert_one_line(exc, str(path), "row numbers")


def _idx(array: np.ndarray, code: int) -> bytes:
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    return struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(dtype).tobytes()


def _mnist(folder: Path, images: np.ndarray, labels: np.ndarray, image_code: int = 0x08,
           label_code: int = 0x08) -> Path:
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(_idx(images, image_code))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx(labels, label_code))
    return raw


def test_silent_cast_mnist_float_idx_scaled(tmp_path):
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (6, 28, 28)).astype(np.uint8)
    labels = np.arange(6) % 10
    _mnist(tmp_path / "a", u8, labels)
    _mnist(tmp_path / "b", u8 / 255.0, labels, image_code=0x0D)  # IDX float32 in [0, 1]
    _mnist(tmp_path / "c", u8.astype(np.float64), labels, image_code=0x0E, label_code=0x0C)  # doubles in 0..255
    a, b, c = (load_mnist(tmp_path / k) for k in "abc")
    assert torch.allclose(a.images, b.images, atol=1e-6) and torch.allclose(a.images, c.images, atol=1e-6)
    assert torch.equal(a.labels, c.labels)


@pytest.mark.parametrize(("images", "labels", "codes", "needle"), [
    (np.full((2, 28, 28), 300), np.zeros(2), (0x0B, 0x08), "range"),
    (np.full((2, 28, 28), -1), np.zeros(2), (0x09, 0x08), "range"),
    (np.full((2, 28, 28), np.nan), np.zeros(2), (0x0D, 0x08), "NaN"),
    (np.zeros((2, 28, 28)), np.array([0, 10]), (0x08, 0x08), "label 10"),
    (np.zeros((2, 28, 28)), np.array([0.0, 2.5]), (0x08, 0x0D), "non-integer"),
])
def test_silent_cast_mnist_bad_values_refused(tmp_path, images, labels, codes, needle):
    raw = _mnist(tmp_path, images, labels, *codes)
    with pytest.raises(MetaifError) as exc:
        load_mnist(tmp_path)
    _assert_one_line(exc, str(raw), needle)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")  # uint16 arrays give 16-bit (I;16) PNGs
    return buf.getvalue()


def _omniglot_dir(root: Path, pngs: list[bytes]) -> None:
    folder = root / "images_background" / "Alpha" / "character01"
    folder.mkdir(parents=True)
    for i, data in enumerate(pngs):
        (folder / f"0101_{i + 1:02d}.png").write_bytes(data)


def test_silent_cast_omniglot_16bit_png_scaled_not_clipped(tmp_path):
    stroke = np.full((105, 105), 255, dtype=np.uint8)
    stroke[40:60, 20:80] = 0  # black stroke on white paper
    _omniglot_dir(tmp_path / "u8", [_png(stroke)])
    _omniglot_dir(tmp_path / "u16", [_png((stroke.astype(np.uint16) * 257), "I;16")])
    a = load_omniglot(tmp_path / "u8", cache_dir=tmp_path / "c8")
    b = load_omniglot(tmp_path / "u16", cache_dir=tmp_path / "c16")
    assert a.images.max() > 0.9 and torch.allclose(a.images, b.images, atol=1 / 255)


def test_silent_cast_omniglot_bad_cache_rebuilt(tmp_path):
    stroke = np.full((105, 105), 255, dtype=np.uint8)
    stroke[10:20] = 0
    _omniglot_dir(tmp_path, [_png(stroke)])
    ref = load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.pt")
    blob = torch.load(cache, weights_only=True)
    blob["images"] = blob["images"].float()  # a cache holding floats would be cast again
    torch.save(blob, cache)
    assert torch.equal(load_omniglot(tmp_path, cache_dir=tmp_path / "cache").images, ref.images)


def test_silent_cast_miniimagenet_csv_16bit_png(tmp_path):
    (tmp_path / "images").mkdir()
    grey = np.full((84, 84), 40000, dtype=np.uint16)
    (tmp_path / "images" / "a.png").write_bytes(_png(grey, "I;16"))
    (tmp_path / "train.csv").write_text("filename,label\na.png,n01\n")
    ds = load_miniimagenet(tmp_path)
    assert torch.allclose(ds.images, torch.full_like(ds.images, 40000 / 65535), atol=1 / 255)


def test_silent_cast_digits_values_checked(monkeypatch):
    import sklearn.datasets

    real = sklearn.datasets.load_digits

    def scaled(*args, **kwargs):
        bunch = real(*args, **kwargs)
        bunch.images = bunch.images * 16  # 0..255: would give values up to 16 after /16
        return bunch

    monkeypatch.setattr(sklearn.datasets, "load_digits", scaled)
    with pytest.raises(MetaifError, match="0..16"):
        digits_module.load_digits()


def test_silent_cast_image_dataset_contract():
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="floats"):
        ImageDataset("x", torch.zeros(2, 1, 2, 2, dtype=torch.uint8), labels, ["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageDataset("x", torch.full((2, 1, 2, 2), 255.0), labels, ["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageDataset("x", torch.full((2, 1, 2, 2), float("nan")), labels, ["a"])
    with pytest.raises(ValueError, match="class_names"):
        ImageDataset("x", torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), ["a"])


# ====================================================================== kind 3: decoders


def _stroke_png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return _png(np.where(rng.random((105, 105)) < 0.1, 0, 255).astype(np.uint8))


def _zip_with(path: Path, members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> None:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _member_data_offset(path: Path, name: str) -> int:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    raw = path.read_bytes()
    n, m = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + n + m


MEMBER = "images_background/Alpha/character01/0101_01.png"


def test_decoder_error_zip_member_invalid_deflate_block(tmp_path):
    """The reported case: a PNG member whose deflate stream has an invalid block type (zlib.error)."""
    path = tmp_path / "images_background.zip"
    _zip_with(path, {MEMBER: _stroke_png()})
    raw = bytearray(path.read_bytes())
    raw[_member_data_offset(path, MEMBER)] = 0b111  # BFINAL=1, BTYPE=11: reserved, invalid
    path.write_bytes(bytes(raw))
    with zipfile.ZipFile(path) as zf, pytest.raises(zlib.error):
        zf.read(MEMBER)  # the raw decoder error the loader must not let out
    with pytest.raises(MetaifError) as exc:
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    _assert_corrupt(exc, f"{path}:{MEMBER}")


def test_decoder_error_cli_one_line(tmp_path):
    path = tmp_path / "images_background.zip"
    _zip_with(path, {MEMBER: _stroke_png()})
    raw = bytearray(path.read_bytes())
    raw[_member_data_offset(path, MEMBER)] = 0b111
    path.write_bytes(bytes(raw))
    res = subprocess.run([sys.executable, "-m", "metaif_cli.cli", "train", "dataset=omniglot",
                          f"data.root={tmp_path}", "debug=fast", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "METAIF_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    last = [line for line in res.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("metaif train: error: corrupt or unreadable:") and MEMBER in last


@pytest.mark.parametrize("damage", ["crc", "method", "encrypted", "truncated", "local_header", "not_a_zip"])
def test_decoder_error_zip_damage(tmp_path, damage):
    path = tmp_path / "images_background.zip"
    _zip_with(path, {MEMBER: _stroke_png()}, method=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    start = _member_data_offset(path, MEMBER)
    with zipfile.ZipFile(path) as zf:
        cd = zf.getinfo(MEMBER)
    cd_offset = raw.rfind(b"PK\x01\x02")
    if damage == "crc":
        raw[start + 200] ^= 0xFF  # BadZipFile: Bad CRC-32
    elif damage == "method":  # compression method 99 (AES): NotImplementedError
        raw[cd.header_offset + 8: cd.header_offset + 10] = struct.pack("<H", 99)
        raw[cd_offset + 10: cd_offset + 12] = struct.pack("<H", 99)
    elif damage == "encrypted":  # flag bit 0: RuntimeError (password required)
        raw[cd_offset + 8] |= 1
        raw[cd.header_offset + 6] |= 1
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "local_header":
        raw[cd.header_offset: cd.header_offset + 4] = b"XXXX"  # BadZipFile: bad magic number for file header
    else:
        raw = bytearray(b"PK\x05\x06" + b"\x00" * 10)
    path.write_bytes(bytes(raw))
    with pytest.raises(MetaifError) as exc:
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    _assert_one_line(exc, "corrupt or unreadable:", str(path))


@pytest.mark.parametrize("damage", ["truncated", "idat_crc", "idat_zlib", "header_only", "not_png", "bomb"])
def test_decoder_error_png_damage(tmp_path, damage, monkeypatch):
    data = bytearray(_stroke_png())
    idat = data.find(b"IDAT")
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "idat_crc":
        data[idat + 10] ^= 0xFF  # PIL: SyntaxError/OSError "broken data stream"/"CRC"
    elif damage == "idat_zlib":
        data[idat + 4: idat + 6] = b"\xff\xff"  # zlib header of the image data
        from PIL import ImageFile

        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    elif damage == "header_only":
        data = data[:33]
    elif damage == "not_png":
        data = bytearray(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    else:
        from PIL import Image as PILImage

        monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # DecompressionBombError
    _omniglot_dir(tmp_path, [bytes(data)])
    png = tmp_path / "images_background" / "Alpha" / "character01" / "0101_01.png"
    with pytest.raises(MetaifError) as exc:
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    _assert_corrupt(exc, png)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "unknown_class", "empty", "bad_opcode"])
def test_decoder_error_pickle_damage(tmp_path, damage):
    _mini_pickles(tmp_path, lambda shape, rng: rng.integers(0, 256, shape, dtype=np.uint8))
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    raw = path.read_bytes()
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = b"\x80\x04" + bytes(range(256)) * 4
    elif damage == "unknown_class":
        raw = b"\x80\x04\x95\x15\x00\x00\x00\x00\x00\x00\x00\x8c\x07nomodul\x94\x8c\x03Cls\x94\x93\x94."
    elif damage == "empty":
        raw = b""
    else:
        raw = b"\x80\x02\xff."
    path.write_bytes(raw)
    with pytest.raises(MetaifError) as exc:
        load_miniimagenet(tmp_path)
    _assert_corrupt(exc, path)


@pytest.mark.parametrize("damage", ["truncated", "jpeg_garbage", "empty"])
def test_decoder_error_miniimagenet_jpeg_damage(tmp_path, damage):
    (tmp_path / "images").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (84, 84), (10, 200, 30)).save(buf, format="JPEG")
    data = buf.getvalue()
    data = {"truncated": data[:100], "jpeg_garbage": b"\xff\xd8\xff" + b"\x13" * 500, "empty": b""}[damage]
    (tmp_path / "images" / "a.jpg").write_bytes(data)
    (tmp_path / "train.csv").write_text("filename,label\na.jpg,n01\n")
    with pytest.raises(MetaifError) as exc:
        load_miniimagenet(tmp_path)
    _assert_corrupt(exc, tmp_path / "images" / "a.jpg")


def test_decoder_error_miniimagenet_csv_not_text(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"\xff\xfe\x00\x81" * 20)
    with pytest.raises(MetaifError) as exc:
        load_miniimagenet(tmp_path)
    _assert_one_line(exc, str(tmp_path / "train.csv"))


@pytest.mark.parametrize("damage", ["gzip_truncated", "gzip_bad_magic", "gzip_bad_deflate", "gzip_crc",
                                    "idx_truncated", "idx_magic", "idx_type", "idx_ndim", "idx_empty"])
def test_decoder_error_gzip_and_idx_damage(tmp_path, damage):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    raw_dir = _mnist(tmp_path, images, np.arange(3))
    path = raw_dir / "t10k-images-idx3-ubyte"
    data = path.read_bytes()
    if damage.startswith("gzip"):
        path.unlink()
        path = path.with_suffix(".gz")
        gz = bytearray(gzip.compress(data))
        if damage == "gzip_truncated":
            gz = gz[: len(gz) // 2]
        elif damage == "gzip_bad_magic":
            gz[0] = 0x00
        elif damage == "gzip_bad_deflate":
            gz[10] = 0b111  # first deflate block: reserved type
        else:
            gz[-8] ^= 0xFF  # CRC32 of the trailer
        path.write_bytes(bytes(gz))
    else:
        data = bytearray(data)
        if damage == "idx_truncated":
            data = data[:-100]
        elif damage == "idx_magic":
            data[0] = 7
        elif damage == "idx_type":
            data[2] = 0x42
        elif damage == "idx_ndim":
            data[3] = 2
        else:
            data = b""
        path.write_bytes(bytes(data))
    with pytest.raises(MetaifError) as exc:
        load_mnist(tmp_path)
    _assert_corrupt(exc, path)


def test_decoder_error_truncated_omniglot_cache_is_rebuilt(tmp_path):
    _omniglot_dir(tmp_path, [_stroke_png(1), _stroke_png(2)])
    ref = load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    assert torch.equal(load_omniglot(tmp_path, cache_dir=tmp_path / "cache").images, ref.images)


# ====================================================================== the folder dataset (issue 12)


def _folder(root: Path, pngs: dict[str, list[bytes]]) -> Path:
    for cls, datas in pngs.items():
        (root / cls).mkdir(parents=True)
        for i, data in enumerate(datas):
            (root / cls / f"{i:03d}.png").write_bytes(data)
    return root


def test_silent_cast_folder_16bit_png_scaled_not_clipped(tmp_path):
    from metaif_cli.data.folder import load_folder

    grey = np.full((16, 16), 20000, dtype=np.uint16)
    ds = load_folder(_folder(tmp_path, {"a": [_png(grey)], "b": [_png(grey // 2)]}), image_size=16, channels=1)
    assert torch.allclose(ds.images[0], torch.full((1, 16, 16), 20000 / 65535), atol=1 / 255)


@pytest.mark.parametrize("damage", ["idat_crc", "truncated", "not_png"])
def test_decoder_error_folder_png_damage(tmp_path, damage):
    from metaif_cli.data.folder import load_folder

    data = bytearray(_stroke_png())
    idat = data.find(b"IDAT")
    if damage == "idat_crc":
        data[idat + 10] ^= 0xFF
    elif damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data = bytearray(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    root = _folder(tmp_path, {"a": [_stroke_png(1)], "b": [bytes(data)]})
    with pytest.raises(MetaifError) as exc:
        load_folder(root, image_size=8, channels=1)
    _assert_corrupt(exc, root / "b" / "000.png")
