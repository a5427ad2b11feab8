"""Memory bounded by a chunk of tasks (issue 22): compact images gathered per chunk, sums over
tasks accumulated chunk by chunk, ``chunk=auto`` deterministic.

Oracles in float64 on tiny problems: a pool scored in chunks from compact images equals the
same pool materialised and scored at once; the largest tensor built while scoring a pool is
bounded by the chunk, not by the pool.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metaif_cli.data.compact import compact_images, to_float
from metaif_cli.data.config import DatasetConfig
from metaif_cli.data.gather import PoolTasks
from metaif_cli.data.pool import draw_pool
from metaif_cli.errors import MetaifError
from metaif_cli.influence.chunking import MAX_CHUNK, activation_floats, auto_chunk, resolve_chunk
from metaif_cli.influence.problem import UnrolledProblem
from metaif_cli.meta.config import MetaConfig
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.meta.params import FlatSpec
from metaif_cli.models.config import ModelConfig
from metaif_cli.models.networks import build_model, params_of
from metaif_cli.score.config import ScoreConfig

DT = torch.float64


def _pool(n_tasks: int, n_images: int = 120, side: int = 6, seed: int = 0, ways: int = 3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 1, side, side), generator=g, dtype=torch.uint8)  # [N, 1, S, S]
    labels = torch.arange(n_images) % 12
    pool = draw_pool(labels, torch.arange(n_images), DatasetConfig(ways=ways, shots=2, queries=2), n_tasks, "train", g)
    return images, pool


def _problem(train, test, chunk: int, side: int = 6, hidden: int = 5) -> tuple[UnrolledProblem, torch.Tensor]:
    model = build_model(ModelConfig(name="mlp", hidden=hidden, layers=1), (1, side, side), 3, 0).to(DT)
    learner = MetaLearner(model, MetaConfig(inner_steps=2, inner_lr=0.4))
    lam = params_of(model, DT, torch.device("cpu"))
    spec = FlatSpec.of(lam)
    return UnrolledProblem(learner, spec, train, test, n=len(train), delta_reg=1e-3, chunk=chunk), spec.flatten(lam)


def test_compact_images_are_uint8_when_lossless_and_convert_back_exactly():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    floats = u8.to(torch.float32).div_(255.0)  # the loaders' conversion
    packed = compact_images(floats)
    assert packed.dtype == torch.uint8 and torch.equal(packed, u8)
    assert torch.equal(to_float(packed, torch.float32), floats)
    assert torch.equal(to_float(packed, DT), floats.to(DT))
    sixteenths = torch.arange(17, dtype=torch.float32).div(16).reshape(1, 1, 1, 17)  # digits: not k/255
    assert compact_images(sixteenths) is sixteenths


def test_pool_tasks_gather_the_values_of_a_materialised_pool():
    images, pool = _pool(7)
    weights = {"w": torch.rand(7, dtype=DT), "u": torch.rand(7, 6, dtype=DT), "v": torch.rand(7, 6, dtype=DT)}
    tasks = PoolTasks.of(pool, images, DT, weights=weights)
    whole = pool.batch(images, dtype=DT).with_weights(**weights)
    idx = torch.tensor([5, 0, 3])
    for a, b in ((tasks[idx], whole[idx]), (tasks[2:6], whole[2:6]), (tasks[4], whole[4])):
        for name in ("x_spt", "y_spt", "u", "x_qry", "y_qry", "v", "w"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(tasks.y_qry, whole.y_qry) and len(tasks) == 7


def test_a_pool_scored_in_chunks_equals_the_pool_scored_at_once():
    images, pool = _pool(11)
    _, test_pool = _pool(5, seed=1)
    weights = {"w": 0.5 + torch.rand(11, dtype=DT), "u": 0.5 + torch.rand(11, 6, dtype=DT),
               "v": 0.5 + torch.rand(11, 6, dtype=DT)}
    lazy, _ = _problem(PoolTasks.of(pool, images, DT, weights=weights), PoolTasks.of(test_pool, images, DT), chunk=3)
    whole, theta = _problem(pool.batch(images, dtype=DT).with_weights(**weights), test_pool.batch(images, dtype=DT),
                            chunk=64)
    # per-task outputs: bit-equal whatever the chunk
    a, b = lazy.unit_scores(theta, theta * 0.1), whole.unit_scores(theta, theta * 0.1)
    for x, y in ((a.task, b.task), (a.query, b.query), (a.support, b.support)):
        assert torch.equal(x, y)
    # sums over tasks: equal to the order of additions
    vec = torch.linspace(-1, 1, len(theta), dtype=DT)
    for form in ("exact", "no_third_order", "gauss_newton"):
        h_lazy, h_whole = lazy.hvp(theta, vec, torch.arange(11), form), whole.hvp(theta, vec, torch.arange(11), form)
        assert torch.allclose(h_lazy, h_whole, rtol=0, atol=1e-12 * float(h_whole.abs().max())), form
    value, g = lazy.eval_mean_grad(theta)
    values, grads = whole.eval_grad(theta)
    assert abs(float(value - values.mean())) <= 1e-12 and torch.allclose(g, grads.mean(0), rtol=0, atol=1e-12)
    value1, g1 = whole.eval_mean_grad(theta)  # one chunk: bit-equal to the mean of the stored gradients
    assert torch.equal(g1, grads.mean(0)) and torch.equal(value1, values.mean())


class _LargestTensor(TorchDispatchMode):
    """Bytes of the largest tensor any operation returns, and the most bytes alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = self.live = self.peak = 0

    def _freed(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t._base is None:  # views share their base's memory
                size = t.numel() * t.element_size()
                self.largest = max(self.largest, size)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._freed, size)
        return out


def _scoring_memory(n_tasks: int) -> tuple[int, int]:
    images, pool = _pool(n_tasks, n_images=300, side=10)
    _, test_pool = _pool(24, n_images=300, side=10, seed=1)
    problem, theta = _problem(PoolTasks.of(pool, images, DT), PoolTasks.of(test_pool, images, DT), chunk=4,
                              side=10)
    with _LargestTensor() as mode:
        _, b = problem.eval_mean_grad(theta)
        problem.hvp(theta, b, torch.arange(n_tasks), "gauss_newton")
        problem.support = False
        problem.unit_scores(theta, b)
    return mode.largest, mode.peak


def test_the_memory_of_scoring_a_pool_is_bounded_by_a_chunk_not_the_pool():
    largest_small, peak_small = _scoring_memory(16)
    largest, peak = _scoring_memory(400)
    pool_floats = 400 * 12 * 100 * 8  # the pool's images as float64: what materialising it would hold
    assert largest < pool_floats / 20
    assert largest == largest_small  # the largest tensor is one chunk's, whatever the pool
    # alive at once: a chunk's working set plus the per-unit scores (a few floats per task)
    assert peak < peak_small + 400 * 13 * 8 * 4


def test_chunk_auto_is_deterministic_and_shrinks_with_the_model():
    def chunk_for(hidden: int, budget: float = 64.0) -> int:
        model = build_model(ModelConfig(name="mlp", hidden=hidden, layers=2), (1, 28, 28), 5, 0)
        return resolve_chunk("auto", model, (1, 28, 28), 20, 5, DT, budget)

    assert chunk_for(64) == chunk_for(64)
    assert MAX_CHUNK >= chunk_for(32) >= chunk_for(256) >= chunk_for(2048) >= 1
    assert chunk_for(2048) < chunk_for(32)
    model = build_model(ModelConfig(name="mlp", hidden=8, layers=1), (1, 6, 6), 3, 0)
    assert resolve_chunk(7, model, (1, 6, 6), 12, 2, DT, 1.0) == 7  # a number is used as given
    assert auto_chunk(10**9, 1, 1, 1, 8, 1.0) == 1 and auto_chunk(1, 1, 1, 1, 8, 1e6) == MAX_CHUNK


def test_activation_floats_leave_batch_norm_statistics_untouched():
    model = build_model(ModelConfig(name="cnn4", hidden=8, layers=2, norm="batch"), (1, 12, 12), 3, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert activation_floats(model, (1, 12, 12)) > 8 * 12 * 12
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("bad", ["big", 0, -3, 2.5, True])
def test_a_bad_chunk_is_refused_in_one_line(bad):
    with pytest.raises(MetaifError, match="chunk"):
        ScoreConfig(run="r", chunk=bad)
    assert ScoreConfig(run="r", chunk="8").chunk == 8 and ScoreConfig(run="r").chunk == "auto"


@pytest.mark.parametrize("good", ["auto", None, 3])
def test_trajectory_segment_takes_auto_null_or_a_number(good):
    from metaif_cli.influence.trajectory import TrajectoryConfig

    assert TrajectoryConfig(segment=good).segment == good
    with pytest.raises(MetaifError, match="trajectory.segment"):
        TrajectoryConfig(segment="many")


def test_implicit_mode_keeps_a_bounded_number_of_inner_solutions(monkeypatch):
    from metaif_cli.influence import implicit

    images, pool = _pool(6)
    model = build_model(ModelConfig(name="mlp", hidden=4, layers=1), (1, 6, 6), 3, 0).to(DT)
    learner = MetaLearner(model, MetaConfig(name="imaml", inner_steps=2, inner_lr=0.3, eta=2.0))
    lam = params_of(model, DT, torch.device("cpu"))
    spec = FlatSpec.of(lam)
    theta = spec.flatten(lam)

    def scores(cache: int):
        monkeypatch.setattr(implicit, "PHI_CACHE", cache)
        tasks = PoolTasks.of(pool, images, DT)
        problem = implicit.ImplicitProblem(learner, spec, tasks, tasks, n=6, delta_reg=1e-3, inner_max_iter=300)
        out = problem.unit_scores(theta, theta * 0.1)
        return out, len(problem._phi)

    (full, kept_full), (bounded, kept) = scores(1024), scores(2)
    assert kept_full == 6 and kept == 2
    assert torch.equal(full.task, bounded.task) and torch.equal(full.support, bounded.support)


def test_evaluation_in_chunks_equals_evaluation_at_once():
    images, pool = _pool(9)
    model = build_model(ModelConfig(name="mlp", hidden=5, layers=1), (1, 6, 6), 3, 0).to(DT)
    learner = MetaLearner(model, MetaConfig(inner_steps=2, inner_lr=0.4))
    lam = params_of(model, DT, torch.device("cpu"))
    tasks = PoolTasks.of(pool, images, DT)
    chunked, whole = learner.evaluate(lam, tasks, chunk=2), learner.evaluate(lam, pool.batch(images, dtype=DT), chunk=32)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
