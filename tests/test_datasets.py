"""Dataset loaders: the real offline data in ``../shared/data`` and fixtures written in
each dataset's real on-disk format (no network is used)."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

from metaif_cli.data import omniglot as omniglot_module
from metaif_cli.data.digits import load_digits
from metaif_cli.data.miniimagenet import load_miniimagenet
from metaif_cli.data.mnist import load_mnist
from metaif_cli.data.omniglot import load_omniglot
from metaif_cli.data.registry import DATASETS, load_dataset
from metaif_cli.errors import MetaifError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


# ---------------------------------------------------------------- digits


def test_digits_shape_and_range():
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8)
    assert ds.images.dtype == torch.float32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert ds.class_names == [str(c) for c in range(10)]
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    assert ds.splits is None


# ---------------------------------------------------------------- omniglot


def _omniglot_png(seed: int) -> bytes:
    """A 105x105 Omniglot-like PNG: black strokes on white, mode '1' like the originals."""
    rng = np.random.default_rng(seed)
    pixels = np.full((105, 105), 255, dtype=np.uint8)
    r, c = rng.integers(10, 60, size=2)
    pixels[r : r + 30, c : c + 12] = 0  # a thick vertical stroke
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buf, format="PNG")
    return buf.getvalue()


FIXTURE_CHARS = {"Alpha": ["character01", "character02"], "Beta": ["character01"]}


def _write_omniglot_tree(set_dir: Path, chars: dict[str, list[str]] = FIXTURE_CHARS, n: int = 3) -> None:
    for a, (alphabet, characters) in enumerate(chars.items()):
        for c, character in enumerate(characters):
            folder = set_dir / alphabet / character
            folder.mkdir(parents=True)
            for d in range(n):
                (folder / f"{a:02d}{c:02d}_{d + 1:02d}.png").write_bytes(_omniglot_png(a * 100 + c * 10 + d))


def _write_omniglot_zip(path: Path, chars: dict[str, list[str]] = FIXTURE_CHARS, n: int = 3) -> None:
    stem = path.stem
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{stem}/", b"")
        for a, (alphabet, characters) in enumerate(chars.items()):
            for c, character in enumerate(characters):
                for d in range(n):
                    name = f"{stem}/{alphabet}/{character}/{a:02d}{c:02d}_{d + 1:02d}.png"
                    zf.writestr(name, _omniglot_png(a * 100 + c * 10 + d))


def _check_fixture(ds, n_classes: int = 3, n_images: int = 9, size: int = 28) -> None:
    assert ds.name == "omniglot"
    assert ds.images.shape == (n_images, 1, size, size)
    assert ds.num_classes == n_classes
    assert ds.class_names[:2] == ["Alpha/character01", "Alpha/character02"]
    assert ds.images[:, :, 0, 0].eq(0).all()  # paper is 0
    assert ds.images.amax(dim=(1, 2, 3)).gt(0.75).all()  # strokes bright
    assert ds.images.mean() < 0.3


def test_omniglot_real_small_zips(shared_data, tmp_path):
    ds = load_omniglot(shared_data / "omniglot", cache_dir=tmp_path)
    assert ds.images.shape == (4840, 1, 28, 28)
    assert ds.images.dtype == torch.float32
    assert ds.num_classes == 242
    assert torch.bincount(ds.labels).eq(20).all()
    assert len({name.split("/")[0] for name in ds.class_names}) == 8
    assert "Greek/character01" in ds.class_names
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert ds.images.mean() < 0.25  # mostly paper (0) ...
    assert ds.images.amax(dim=(1, 2, 3)).gt(0.5).all()  # ... every image has bright strokes
    assert ds.images[:, :, 0, :].mean() < 0.01  # border row is paper

    # A cache hit gives identical tensors without decoding any PNG.
    assert len(list(tmp_path.glob("omniglot-28px-*.pt"))) == 1
    again = load_omniglot(shared_data, cache_dir=tmp_path)  # also found via root/omniglot
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)
    assert again.class_names == ds.class_names

    rot = load_omniglot(shared_data / "omniglot", rotations=True, cache_dir=tmp_path)
    assert rot.num_classes == 968 and rot.images.shape == (4 * 4840, 1, 28, 28)
    assert torch.equal(rot.images[:4840], ds.images)
    assert torch.equal(rot.images[4840 + 7], torch.rot90(ds.images[7], 1, dims=(1, 2)))
    assert rot.labels[4840 + 7] == ds.labels[7] + 242
    assert rot.class_names[242 + 5] == ds.class_names[5] + "/rot90"


def test_omniglot_cache_hit_skips_decoding(tmp_path, monkeypatch):
    _write_omniglot_zip(tmp_path / "images_background.zip")
    first = load_omniglot(tmp_path, cache_dir=tmp_path / "cache", image_size=20)

    def boom(*args, **kwargs):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(omniglot_module, "_read_images", boom)
    second = load_omniglot(tmp_path, cache_dir=tmp_path / "cache", image_size=20)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    monkeypatch.setenv("METAIF_CACHE", str(tmp_path / "cache"))
    assert torch.equal(load_omniglot(tmp_path, image_size=20).images, first.images)
    with pytest.raises(AssertionError, match="cache was not used"):  # another size is another key
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache", image_size=21)


def test_omniglot_torchvision_layout(tmp_path):
    _write_omniglot_tree(tmp_path / "omniglot-py" / "images_background")
    _write_omniglot_tree(tmp_path / "omniglot-py" / "images_evaluation", {"Gamma": ["character01"]}, n=2)
    ds = load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    _check_fixture(ds, n_classes=4, n_images=11)
    assert ds.class_names[-1] == "Gamma/character01"


def test_omniglot_extracted_layout(tmp_path):
    _write_omniglot_tree(tmp_path / "omniglot" / "images_background")
    _check_fixture(load_omniglot(tmp_path, image_size=16, cache_dir=tmp_path / "cache"), size=16)


def test_omniglot_zip_layout_and_dedup(tmp_path):
    _write_omniglot_zip(tmp_path / "images_background_small1.zip")
    other = {"Alpha": ["character01"], "Zeta": ["character01"]}
    _write_omniglot_zip(tmp_path / "images_background_small2.zip", other)
    ds = load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    _check_fixture(ds, n_classes=4, n_images=12)  # Alpha/character01 counted once
    assert torch.bincount(ds.labels).tolist() == [3, 3, 3, 3]


def test_omniglot_corrupt_zip(tmp_path):
    (tmp_path / "images_background.zip").write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(MetaifError, match="images_background.zip"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")


def test_omniglot_corrupt_png(tmp_path):
    _write_omniglot_zip(tmp_path / "images_evaluation.zip")
    with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "a") as zf:
        zf.writestr("images_evaluation/Alpha/character01/9999_99.png", b"\x89PNG garbage")
    with pytest.raises(MetaifError, match="9999_99.png"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")


def test_omniglot_missing(tmp_path):
    with pytest.raises(MetaifError, match="dataset.download=true") as err:
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_omniglot_download(tmp_path, monkeypatch):
    calls = []

    class FakeOmniglot:
        def __init__(self, root, background=True, download=False, **kwargs):
            assert download
            calls.append(background)
            set_name = "images_background" if background else "images_evaluation"
            chars = FIXTURE_CHARS if background else {"Gamma": ["character01"]}
            _write_omniglot_tree(Path(root) / "omniglot-py" / set_name, chars)

    monkeypatch.setattr(torchvision.datasets, "Omniglot", FakeOmniglot)
    ds = load_omniglot(tmp_path / "data", download=True, cache_dir=tmp_path / "cache")
    assert calls == [True, False]
    assert ds.num_classes == 4 and ds.images.shape == (12, 1, 28, 28)


def test_omniglot_download_failure(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, *args, **kwargs):
            raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", Offline)
    with pytest.raises(MetaifError, match="could not download Omniglot"):
        load_omniglot(tmp_path, download=True, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- mnist


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist_pair(folder: Path, split: str, n: int, seed: int, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


def test_mnist_real_test_set(shared_data):
    ds = load_mnist(shared_data)
    assert ds.images.shape == (10000, 1, 28, 28)
    assert ds.images.dtype == torch.float32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert ds.num_classes == 10
    assert torch.bincount(ds.labels).gt(800).all()
    assert ds.labels[:3].tolist() == [7, 2, 1]  # the well-known first test digits


def test_mnist_train_and_test_concatenate(tmp_path):
    x_tr, y_tr = _write_mnist_pair(tmp_path / "MNIST" / "raw", "train", 6, seed=0, gz=False)
    x_te, y_te = _write_mnist_pair(tmp_path / "MNIST" / "raw", "t10k", 4, seed=1, gz=True)
    ds = load_mnist(tmp_path)
    assert ds.images.shape == (10, 1, 28, 28)
    assert ds.labels.tolist() == y_tr.tolist() + y_te.tolist()
    expected = torch.from_numpy(np.concatenate([x_tr, x_te])).float().div(255).unsqueeze(1)
    assert torch.equal(ds.images, expected)


def test_mnist_files_directly_in_root(tmp_path):
    _write_mnist_pair(tmp_path, "t10k", 5, seed=2, gz=True)
    assert load_mnist(tmp_path).images.shape == (5, 1, 28, 28)


@pytest.mark.parametrize("damage", ["magic", "truncated", "gzip"])
def test_mnist_corrupt_file(tmp_path, damage):
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist_pair(raw, "t10k", 5, seed=3, gz=damage == "gzip")
    if damage == "gzip":
        bad = raw / "t10k-images-idx3-ubyte.gz"
        bad.write_bytes(bad.read_bytes()[:-40])
    else:
        bad = raw / "t10k-images-idx3-ubyte"
        data = bad.read_bytes()
        bad.write_bytes(struct.pack(">I", 1234) + data[4:] if damage == "magic" else data[:-100])
    with pytest.raises(MetaifError, match=bad.name):
        load_mnist(tmp_path)


def test_mnist_half_pair_and_missing(tmp_path):
    with pytest.raises(MetaifError, match="dataset.download=true"):
        load_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((1, 28, 28), np.uint8)))
    with pytest.raises(MetaifError, match="labels file missing"):
        load_mnist(tmp_path)


def test_mnist_download(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False, **kwargs):
            assert download
            calls.append(train)
            split = "train" if train else "t10k"
            n = 3 if train else 2
            _write_mnist_pair(Path(root) / "MNIST" / "raw", split, n, seed=int(train), gz=False)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    ds = load_mnist(tmp_path, download=True)
    assert calls == [True, False]
    assert ds.images.shape == (5, 1, 28, 28)


# ---------------------------------------------------------------- mini-imagenet


def _mini_split(prefix: str, seed: int, n_classes: int = 3, n_images: int = 4):
    """Random 84x84 RGB images, rows of each class interleaved like a shuffled cache."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_classes * n_images, 84, 84, 3), dtype=np.uint8)
    n = n_classes * n_images
    class_dict = {f"{prefix}{c:02d}": list(range(c, n, n_classes)) for c in range(n_classes)}
    return images, class_dict


def _py2_pickle(images: np.ndarray, class_dict: dict[str, list[int]]) -> bytes:
    """A pickle as Python 2 writes it: keys and class names are py2 ``str`` (BINSTRING
    opcodes), one name holding a non-ASCII byte, so Python 3 needs ``encoding='latin1'``."""

    def py2_str(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text  # SHORT_BINSTRING

    array = pickle.dumps(images, protocol=2)[2:-1]  # drop PROTO header and STOP
    names = [n.encode() for n in class_dict]
    names[0] = names[0] + b"\xe9"  # latin-1 e-acute
    rows = b"".join(
        py2_str(name) + b"](" + b"".join(b"J" + struct.pack("<i", r) for r in class_dict[key]) + b"e"
        for name, key in zip(names, class_dict)
    )
    return (
        b"\x80\x02}(" + py2_str(b"image_data") + array + py2_str(b"class_dict") + b"}(" + rows + b"u" + b"u."
    )


def _check_mini(ds, size: int = 84) -> None:
    assert ds.name == "miniimagenet"
    assert ds.images.shape == (36, 3, size, size) and ds.images.dtype == torch.float32
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert ds.splits == {"train": [0, 1, 2], "val": [3, 4, 5], "test": [6, 7, 8]}
    assert torch.bincount(ds.labels).tolist() == [4] * 9


def test_miniimagenet_pickles(tmp_path):
    folder = tmp_path / "mini-imagenet"
    folder.mkdir()
    tr_x, tr_c = _mini_split("n01", 0)
    va_x, va_c = _mini_split("n02", 1)
    te_x, te_c = _mini_split("n03", 2)
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": tr_x, "class_dict": tr_c}, f)
    with open(folder / "mini-imagenet-cache-validation.pkl", "wb") as f:  # bytes keys, protocol 2
        blob = {b"image_data": va_x, b"class_dict": {k.encode(): v for k, v in va_c.items()}}
        pickle.dump(blob, f, protocol=2)
    (folder / "mini-imagenet-cache-test.pkl").write_bytes(_py2_pickle(te_x, te_c))

    ds = load_miniimagenet(tmp_path)
    _check_mini(ds)
    assert ds.class_names[:4] == ["n0100", "n0101", "n0102", "n0200"]
    assert ds.class_names[6] == "n0300\u00e9"  # the py2 name, decoded as latin-1
    first = torch.from_numpy(tr_x[tr_c["n0100"][0]]).permute(2, 0, 1).float() / 255
    assert torch.equal(ds.images[0], first)
    last = torch.from_numpy(te_x[te_c["n0302"][-1]]).permute(2, 0, 1).float() / 255
    assert torch.equal(ds.images[-1], last)

    small = load_miniimagenet(tmp_path, image_size=32)
    assert small.images.shape == (36, 3, 32, 32)


def test_miniimagenet_val_pkl_and_partial(tmp_path):
    x, c = _mini_split("n05", 3, n_classes=2, n_images=3)
    with open(tmp_path / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump({"image_data": x, "class_dict": c}, f)
    ds = load_miniimagenet(tmp_path)
    assert ds.splits == {"train": [], "val": [0, 1], "test": []}
    assert ds.images.shape == (6, 3, 84, 84)


def test_miniimagenet_csv_jpeg(tmp_path):
    folder = tmp_path / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    colors = {}
    for s, split in enumerate(("train", "val", "test")):
        lines = ["filename,label"]
        for c in range(3):
            label = f"n{s}{c:07d}"
            colors[label] = (40 * c + 20, 200 - 50 * s, 90)
            for i in range(4):
                filename = f"{label}{i + 1:08d}.jpg"
                Image.new("RGB", (84, 84), colors[label]).save(folder / "images" / filename, quality=95)
                lines.append(f"{filename},{label}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    ds = load_miniimagenet(tmp_path)
    _check_mini(ds)
    for idx, name in enumerate(ds.class_names):
        mean = ds.images[ds.labels == idx].mean(dim=(0, 2, 3)) * 255
        assert torch.allclose(mean, torch.tensor(colors[name], dtype=torch.float32), atol=3)


def test_miniimagenet_missing_and_corrupt(tmp_path):
    with pytest.raises(MetaifError, match="cannot be downloaded") as err:
        load_miniimagenet(tmp_path)
    assert "mini-imagenet-cache-train.pkl" in str(err.value)
    (tmp_path / "mini-imagenet-cache-train.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(MetaifError, match="mini-imagenet-cache-train.pkl"):
        load_miniimagenet(tmp_path)


def test_miniimagenet_missing_jpeg(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "train.csv").write_text("filename,label\nabsent.jpg,n01\n")
    with pytest.raises(MetaifError, match="absent.jpg"):
        load_miniimagenet(tmp_path)


# ---------------------------------------------------------------- registry


def test_registry_unknown_name():
    with pytest.raises(MetaifError, match="digits, omniglot, mnist, miniimagenet"):
        load_dataset("cifar", Path("."), image_size=None, rotations=False, download=False)


def test_registry_dispatch(tmp_path, monkeypatch):
    assert set(DATASETS) == {"digits", "omniglot", "mnist", "miniimagenet", "folder"}
    ds = load_dataset("digits", tmp_path, image_size=None, rotations=False, download=False)
    assert ds.images.shape == (1797, 1, 8, 8)
    ds = load_dataset("digits", tmp_path, image_size=16, rotations=False, download=False)
    assert ds.images.shape == (1797, 1, 16, 16) and ds.images.max() <= 1.0
    with pytest.raises(MetaifError, match="rotations"):
        load_dataset("mnist", tmp_path, image_size=None, rotations=True, download=False)

    monkeypatch.setenv("METAIF_CACHE", str(tmp_path / "cache"))
    _write_omniglot_tree(tmp_path / "images_background")
    ds = load_dataset("omniglot", tmp_path, image_size=None, rotations=True, download=False)
    assert ds.images.shape == (36, 1, 28, 28) and ds.num_classes == 12
    assert list((tmp_path / "cache").glob("omniglot-28px-*.pt"))
    _write_mnist_pair(tmp_path / "MNIST" / "raw", "t10k", 3, seed=4, gz=True)
    assert load_dataset("mnist", tmp_path, image_size=None, rotations=False, download=False).num_classes == 10
    with pytest.raises(MetaifError, match="cannot be downloaded"):
        load_dataset("miniimagenet", tmp_path, image_size=None, rotations=False, download=True)
