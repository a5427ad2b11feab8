"""Helpers of the issue-12 tests: user-style networks (factories) and a real image folder.

The factories are what a user writes: plain PyTorch with ``nn.BatchNorm2d``; the CLI tests
reach them as ``model.factory=<this file>:make_bn_net``.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"


def make_bn_net(ways: int = 3, channels: int = 1, hidden: int = 4, size: int = 8) -> nn.Sequential:
    """conv-BN-ReLU-pool twice, then a linear head named ``fc``: ``[B, C, S, S] -> [B, ways]``."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    ).append(nn.Linear(hidden * (size // 4) ** 2, ways))  # the head is layer "9"


class NamedNet(nn.Module):
    """A user network with named layers and a forward of its own (head ``fc``)."""

    def __init__(self, ways: int = 3, channels: int = 1, size: int = 8, hidden: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten())
        self.fc = nn.Linear(hidden * (size // 2) ** 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def make_named_net(**kwargs) -> NamedNet:
    return NamedNet(**kwargs)


def make_layernorm_net(ways: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, ways))


def make_broken_net(ways: int = 3) -> nn.Module:
    raise ValueError("this factory is broken on purpose")


def mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The real MNIST test digits of ``../shared/data`` as ``[N, 28, 28]`` uint8 and ``[N]`` labels."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    tmp = Path(tempfile.mkdtemp())
    try:
        out = []
        for name, reader in (("t10k-images-idx3-ubyte", read_image_file), ("t10k-labels-idx1-ubyte", read_label_file)):
            with gzip.open(SHARED_MNIST / f"{name}.gz") as f:
                (tmp / name).write_bytes(f.read())
            out.append(reader(str(tmp / name)))
        return out[0], out[1]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_digit_folder(root: Path, classes: int = 6, per_class: int = 8, jpeg_every: int = 3) -> Path:
    """``root/digit<c>/<id>.png|jpg``: real MNIST digits, some saved as JPEG; returns ``root``."""
    from PIL import Image

    images, labels = mnist_digits()
    for c in range(classes):
        folder = root / f"digit{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(torch.nonzero(labels == c).flatten()[:per_class].tolist()):
            img = Image.fromarray(images[i].numpy())  # 28x28 grey
            if jpeg_every and j % jpeg_every == 0:
                img.convert("RGB").save(folder / f"{i:05d}.jpg", quality=95)  # an RGB JPEG
            else:
                img.save(folder / f"{i:05d}.png")
    return root
