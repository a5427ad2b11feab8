"""Shared test fixtures: paths, float64 defaults, tiny models and tiny random tasks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from metaif_cli.models.config import ModelConfig
from metaif_cli.meta.tasks import TaskBatch
from metaif_cli.models.networks import MetaModel, build_model

# ``finished`` and ``run_copy``: a finished tiny digits run, for the modules that read or damage run directories
pytest_plugins = ["run_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# pytest runs on two workers (setup.cfg: -n 2): one thread each, for them and the commands
# they start, is several times faster on a 2-core machine than oversubscribed threads.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Each module starts with one intra-op thread, whatever an earlier in-process run set."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (holds ``conf/``, ``.venv/`` and ``metaif_cli/``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real offline datasets in ``../shared/data`` (skips the test when absent)."""
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real datasets not found at {path}")
    return path


@pytest.fixture
def float64() -> Iterator[None]:
    """Run the test with float64 as torch's default dtype (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def tiny_model_factory() -> Callable[..., MetaModel]:
    """``make(name="mlp", norm="none", pool="max", hidden=4, layers=2, groups=2, ways=3,
    image_shape=(1, 8, 8), seed=0, dtype=torch.float64, activation="relu")`` -> a small :class:`MetaModel`."""

    def make(name: str = "mlp", norm: str = "none", pool: str = "max", hidden: int = 4, layers: int = 2,
             groups: int = 2, ways: int = 3, image_shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0,
             dtype: torch.dtype = torch.float64, activation: str = "relu") -> MetaModel:
        cfg = ModelConfig(name=name, hidden=hidden, layers=layers, norm=norm, groups=groups, pool=pool,
                          activation=activation)
        return build_model(cfg, image_shape, ways, seed).to(dtype)

    return make


@pytest.fixture
def tiny_tasks() -> Callable[..., TaskBatch]:
    """``make(n=4, ways=3, shots=2, queries=3, image_shape=(1, 8, 8), seed=0, unit_weights=True)``
    -> a :class:`TaskBatch` of random float64 images; ``unit_weights=False`` draws weights in [0.5, 1.5]."""

    def make(n: int = 4, ways: int = 3, shots: int = 2, queries: int = 3,
             image_shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0, unit_weights: bool = True,
             dtype: torch.dtype = torch.float64) -> TaskBatch:
        g = torch.Generator().manual_seed(seed)
        s, q = ways * shots, ways * queries
        x_spt = torch.randn(n, s, *image_shape, generator=g, dtype=dtype)  # [T, S, C, H, W]
        x_qry = torch.randn(n, q, *image_shape, generator=g, dtype=dtype)  # [T, Q, C, H, W]
        y_spt = torch.arange(ways).repeat_interleave(shots).repeat(n, 1)  # [T, S]
        y_qry = torch.arange(ways).repeat_interleave(queries).repeat(n, 1)  # [T, Q]

        def weights(*shape: int) -> torch.Tensor:
            if unit_weights:
                return torch.ones(*shape, dtype=dtype)
            return 0.5 + torch.rand(*shape, generator=g, dtype=dtype)

        return TaskBatch(x_spt, y_spt, weights(n, s), x_qry, y_qry, weights(n, q), weights(n))

    return make
