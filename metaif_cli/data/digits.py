"""Load scikit-learn's bundled handwritten digits as an :class:`ImageDataset` (method §1: the
images tasks are drawn from; the built-in default dataset).

1,797 grey 8x8 images with values 0..16, shipped inside scikit-learn, so this dataset
needs no download and serves as the fast, always-available dataset for smoke runs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from metaif_cli.data.base import ImageDataset
from metaif_cli.data.decode import check_labels
from metaif_cli.errors import MetaifError

log = logging.getLogger(__name__)


def load_digits() -> ImageDataset:
    """Load the scikit-learn digits as ``[1797, 1, 8, 8]`` float32 in ``[0, 1]``.

    Returns:
        The dataset, classes named ``"0"`` .. ``"9"``, no predefined split.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    raw = np.asarray(bunch.images)
    where = "scikit-learn's digits"
    fix = "reinstall scikit-learn"
    if raw.dtype.kind not in "uif" or not np.isfinite(raw).all() or raw.min() < 0 or raw.max() > 16:
        raise MetaifError(f"{where}: pixel values must be 0..16, got dtype {raw.dtype}; {fix}")
    images = torch.as_tensor(raw, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    labels = torch.as_tensor(check_labels(np.asarray(bunch.target), 10, where, fix))
    log.info("loaded digits: %d images of 8x8, 10 classes", images.shape[0])
    return ImageDataset(
        name="digits",
        images=images.contiguous(),
        labels=labels,
        class_names=[str(c) for c in range(10)],
    )
