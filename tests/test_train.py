"""``metaif train`` end to end on CPU: configs, determinism, resume, user errors, the CLI.

Composes the real ``conf/`` files with Hydra's compose API (lightning-hydra-template's
``test_configs.py``), trains tiny runs on the bundled ``digits`` dataset, and drives the
installed ``metaif`` console script for what only the real command line shows (one-line
errors, ``--help``, ``--cfg job``, multirun).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metaif_cli import constants as C
from metaif_cli.cli import register_configs, register_resolvers
from metaif_cli.train.command import run_train
from metaif_cli.data.config import CorruptionConfig, DatasetConfig
from metaif_cli.data.digits import load_digits
from metaif_cli.data.pool import build_pools
from metaif_cli.meta.learner import MetaLearner
from metaif_cli.prune.config import PruneConfig
from metaif_cli.score.config import ScoreConfig
from metaif_cli.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
ROOT_SCHEMAS = {"train": TrainConfig, "score": ScoreConfig, "prune_and_retrain": PruneConfig}
COMMAND_OF_ROOT = {"train": "train", "score": "score", "prune_and_retrain": "prune-and-retrain"}


def compose_config(root: str, overrides: list[str]):
    """Compose ``conf/<root>.yaml`` with ``overrides`` exactly as the command layer does."""
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=root, overrides=overrides)


def typed_config(root: str, overrides: list[str]):
    """Compose and build the dataclass tree (runs every ``__post_init__`` check)."""
    cfg = compose_config(root, overrides)
    if "run" in cfg.keys() and OmegaConf.is_missing(cfg, "run"):
        cfg.run = "outputs/train/some-run"  # mandatory for score/prune; checked when the command runs
    return OmegaConf.to_object(cfg)


# ------------------------------------------------------------------ every config file composes


def _groups_of(root: str) -> list[str]:
    """Config groups named in the defaults list of ``conf/<root>.yaml`` (Hydra's own groups skipped)."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / f"{root}.yaml")).get("defaults", [])
    groups = []
    for entry in defaults:
        if isinstance(entry, dict):
            for key in entry:
                words = key.split()
                if words[0] == "override" or words[-1].startswith("hydra"):
                    continue
                groups.append(words[-1])
    return groups


def _commands_in_header(path: Path, group: str) -> set[str]:
    """Commands a preset documents in its header comment (``# metaif score experiment=x``).

    Lines that select this very file (``<group>=<name>``) decide; otherwise any command
    the header mentions; an empty set means the header names none.
    """
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    pattern = r"metaif (train|score|prune-and-retrain)\b"
    selecting = [line for line in header if re.search(rf"\b{re.escape(group)}={re.escape(path.stem)}\b", line)]
    return set(re.findall(pattern, "\n".join(selecting))) or set(re.findall(pattern, "\n".join(header)))


def _option_cases() -> list:
    """``(root, group, option)`` for every option file of every group of every root config.

    A preset whose header names the commands it is for (``# metaif score experiment=x``)
    is composed with those roots only: presets of ``conf/experiment`` are ``@package
    _global_`` and set keys that exist in one root config only.
    """
    cases = []
    for root in ROOT_SCHEMAS:
        if not (CONF / f"{root}.yaml").exists():
            continue
        for group in _groups_of(root):
            for path in sorted((CONF / group).glob("*.yaml")):
                commands = _commands_in_header(path, group)
                if commands and COMMAND_OF_ROOT[root] not in commands:
                    continue
                cases.append(pytest.param(root, group, path.stem, id=f"{root}-{group}={path.stem}"))
    return cases


@pytest.mark.parametrize(("root", "group", "option"), _option_cases())
def test_every_config_option_composes(root, group, option):
    cfg = typed_config(root, [f"{group}={option}"])
    assert isinstance(cfg, ROOT_SCHEMAS[root])


def test_every_option_file_is_tested():
    """No option file is silently left out (e.g. a preset whose header names no known root)."""
    tested = {(group, option) for root, group, option in (c.values for c in _option_cases())}
    on_disk = {(p.parent.name, p.stem) for p in CONF.glob("*/*.yaml") if p.parent.name != "hydra"}
    assert on_disk <= tested, f"option files composed with no root config: {sorted(on_disk - tested)}"


def _header_references() -> list:
    """``(file, group, option)`` for every ``group=option`` a config header's example commands use."""
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    refs = set()
    for path in sorted(CONF.glob("*.yaml")) + sorted(CONF.glob("*/*.yaml")):
        for line in path.read_text().splitlines():
            if line.startswith("#") and "metaif " in line:
                for group, option in re.findall(r"(?<![\w.+])(\w+)=([\w-]+)", line):
                    if group in groups and "," not in option:
                        refs.add((str(path.relative_to(CONF)), group, option))
    return [pytest.param(*ref, id="{}:{}={}".format(*ref)) for ref in sorted(refs)]


@pytest.mark.parametrize(("source", "group", "option"), _header_references())
def test_presets_named_in_config_headers_exist(source, group, option):
    assert (CONF / group / f"{option}.yaml").exists(), f"conf/{source} names {group}={option}, which is missing"


@pytest.mark.parametrize("root", list(ROOT_SCHEMAS))
def test_root_config_composes(root):
    if not (CONF / f"{root}.yaml").exists():
        pytest.skip(f"conf/{root}.yaml is not written yet")
    assert isinstance(typed_config(root, []), ROOT_SCHEMAS[root])


def test_debug_fast_composes_with_every_meta_and_model():
    for meta in ("maml", "anil", "imaml"):
        for model in ("mlp", "cnn4"):
            cfg = typed_config("train", ["debug=fast", f"meta={meta}", f"model={model}"])
            assert (cfg.meta.name, cfg.model.name, cfg.optim.steps) == (meta, model, 6)


# ------------------------------------------------------------------ seeds


def _pool_fields(pools) -> dict[str, torch.Tensor]:
    return {f"{split}.{f.name}": getattr(pool, f.name) for split, pool in pools.items()
            for f in dataclasses.fields(pool) if isinstance(getattr(pool, f.name), torch.Tensor)}


def test_same_seed_same_pool_different_seed_different_pool():
    dataset = load_digits()
    dcfg = DatasetConfig(name="digits", ways=5, shots=2, queries=3, num_train_tasks=30, num_val_tasks=5,
                         num_test_tasks=10, split_by="instance", split_fractions=[0.6, 0.1, 0.3])
    ccfg = CorruptionConfig(task_fraction=0.2, instance_fraction=0.1)
    a = _pool_fields(build_pools(dataset, dcfg, ccfg, seed=3))
    b = _pool_fields(build_pools(dataset, dcfg, ccfg, seed=3))
    c = _pool_fields(build_pools(dataset, dcfg, ccfg, seed=4))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["train.spt_idx"], c["train.spt_idx"])
    assert not torch.equal(a["train.task_corrupted"], c["train.task_corrupted"]) or \
        not torch.equal(a["train.y_spt"], c["train.y_spt"])


@pytest.mark.parametrize("mode", ["replace", "permute", "shift"])
def test_task_corruption_modes(mode):
    """``replace``: every label wrong; ``permute``: the task's labels reordered; ``shift``: support
    intact, every query label ``c`` called ``c + 1`` (a consistent wrong rule)."""
    dataset = load_digits()
    dcfg = DatasetConfig(name="digits", ways=5, shots=2, queries=3, num_train_tasks=20, num_val_tasks=5,
                         num_test_tasks=10, split_by="instance", split_fractions=[0.6, 0.1, 0.3])
    train = build_pools(dataset, dcfg, CorruptionConfig(task_fraction=0.25, task_mode=mode), seed=0)["train"]
    bad = train.task_corrupted
    assert int(bad.sum()) == 5
    clean_spt, clean_qry = train.true_y_spt, train.true_y_qry
    assert torch.equal(train.y_spt[~bad], clean_spt[~bad]) and torch.equal(train.y_qry[~bad], clean_qry[~bad])
    if mode == "replace":
        assert (train.y_spt[bad] != clean_spt[bad]).all() and (train.y_qry[bad] != clean_qry[bad]).all()
    elif mode == "permute":
        for k in torch.nonzero(bad).flatten():
            assert torch.equal(train.y_qry[k].sort().values, clean_qry[k].sort().values)
    else:
        assert torch.equal(train.y_spt[bad], clean_spt[bad])
        assert torch.equal(train.y_qry[bad], (clean_qry[bad] + 1) % 5)


TINY = ["debug=fast", "device=cpu", "progress=false", "model.hidden=8", "meta.inner_steps=1",
        "dataset.queries=4"]


def _train_cfg(*extra: str) -> TrainConfig:
    return typed_config("train", [*TINY, *extra])


def _lam(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / C.MODEL_PT, weights_only=True)["lam"]


def _tmp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def _assert_same_lam(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_same_parameters(tmp_path):
    cfg = _train_cfg("seed=5")
    run_train(cfg, tmp_path / "a")
    run_train(cfg, tmp_path / "b")
    _assert_same_lam(_lam(tmp_path / "a"), _lam(tmp_path / "b"))
    run_train(_train_cfg("seed=6"), tmp_path / "c")
    assert not torch.equal(_lam(tmp_path / "a")["head.weight"], _lam(tmp_path / "c")["head.weight"])


# ------------------------------------------------------------------ resume

RESUME = ["optim.steps=8", "optim.checkpoint_every=3", "optim.eval_every=4", "optim.num_checkpoints=2"]


class _Interrupt:
    """Raise ``KeyboardInterrupt`` at outer step ``step`` (before its update) or while writing
    ``checkpoint_last.pt`` at that step (after part of the file is on disk)."""

    def __init__(self, where: str, step: int) -> None:
        self.where, self.step, self.calls = where, step, 0

    def install(self, monkeypatch) -> None:
        if self.where == "mid_step":
            real = MetaLearner.meta_gradient

            def meta_gradient(learner, *args, **kwargs):
                self.calls += 1
                if self.calls == self.step:
                    raise KeyboardInterrupt
                return real(learner, *args, **kwargs)

            monkeypatch.setattr(MetaLearner, "meta_gradient", meta_gradient)
        else:
            real_save = torch.save

            def save(obj, f, *args, **kwargs):
                if isinstance(obj, dict) and "optimizer" in obj and obj.get("step") == self.step:
                    f.write(b"half a checkpoint")
                    raise KeyboardInterrupt
                return real_save(obj, f, *args, **kwargs)

            monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize(("where", "step"), [("mid_step", 5), ("mid_write", 6)])
def test_resume_equals_uninterrupted(where, step, tmp_path, monkeypatch):
    cfg = _train_cfg(*RESUME)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(cfg, straight)

    with monkeypatch.context() as patch:
        _Interrupt(where, step).install(patch)
        with pytest.raises(KeyboardInterrupt):
            run_train(cfg, resumed)
    saved = torch.load(resumed / C.CHECKPOINT_LAST, weights_only=True)
    assert saved["step"] == 3  # the last complete checkpoint before the interruption
    assert not (resumed / C.MODEL_PT).exists() and not (resumed / C.RESULTS_JSON).exists()
    assert _tmp_files(resumed) == []

    run_train(cfg, resumed)
    _assert_same_lam(_lam(straight), _lam(resumed))
    a, b = pd.read_csv(straight / C.METRICS_CSV), pd.read_csv(resumed / C.METRICS_CSV)
    pd.testing.assert_frame_equal(a, b)
    for ckpt in sorted((straight / C.CHECKPOINT_DIR).glob("step_*.pt")):
        _assert_same_lam(torch.load(ckpt, weights_only=True)["lam"],
                         torch.load(resumed / C.CHECKPOINT_DIR / ckpt.name, weights_only=True)["lam"])
    assert _tmp_files(resumed) == [] and _tmp_files(straight) == []


def test_finished_run_is_not_retrained(tmp_path, monkeypatch):
    cfg = _train_cfg("optim.steps=2")
    first = run_train(cfg, tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(MetaLearner, "meta_gradient", fail)
    assert run_train(cfg, tmp_path)["test_acc"] == first["test_acc"]


# ------------------------------------------------------------------ the real command line


def _metaif() -> str:
    exe = REPO / ".venv" / "bin" / "metaif"
    if exe.exists():
        return str(exe)
    found = shutil.which("metaif") or str(Path(sys.executable).parent / "metaif")
    return found


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"  # the cases run side by side
    return env


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([_metaif(), *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return _finish(_start(args, cwd))


# name: (overrides, a fragment the one-line error must contain)
BAD_INPUTS = {
    "ways_above_classes": (["dataset=digits", "dataset.ways=11"], "dataset.ways=11"),
    "shots_queries_above_images": (["dataset.shots=100", "dataset.queries=100"], "shots+queries=200"),
    "unknown_dataset_name": (["dataset.name=foo"], "dataset.name='foo'"),
    "zero_outer_lr": (["optim.lr=0"], "optim.lr"),
    "negative_inner_lr": (["meta.inner_lr=-1"], "meta.inner_lr"),
    "nan_loss": (["meta.inner_lr=1e30"], "diverged"),
}
HYDRA_BAD_INPUTS = {"unknown_dataset_group": ["dataset=foo"], "model_maml": ["model=maml"]}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every bad-input command, started side by side (each pays the start-up of torch)."""
    base = tmp_path_factory.mktemp("bad_inputs")
    cases = {**{k: v[0] for k, v in BAD_INPUTS.items()}, **HYDRA_BAD_INPUTS}
    procs = {}
    for name, overrides in cases.items():
        run_dir = base / name
        procs[name] = (_start(["train", *overrides, "debug=fast", f"hydra.run.dir={run_dir}"], base), run_dir)
    return {name: (_finish(proc), run_dir) for name, (proc, run_dir) in procs.items()}


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _assert_nothing_written(run_dir: Path) -> None:
    if run_dir.exists():
        names = {p.name for p in run_dir.rglob("*")}
        assert C.MODEL_PT not in names and C.RESULTS_JSON not in names, names
        assert _tmp_files(run_dir) == []


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error(name, bad_runs):
    proc, run_dir = bad_runs[name]
    fragment = BAD_INPUTS[name][1]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = _last_line(proc.stderr)
    assert last.startswith("metaif train: error:"), proc.stderr
    assert fragment in last
    _assert_nothing_written(run_dir)


def test_unknown_config_group_option_fails_cleanly(bad_runs):
    proc, run_dir = bad_runs["unknown_dataset_group"]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "dataset/foo" in proc.stderr
    _assert_nothing_written(run_dir)


@pytest.mark.parametrize("name", list(HYDRA_BAD_INPUTS))
def test_composition_error_is_one_line_with_hint(name, bad_runs):
    proc, run_dir = bad_runs[name]
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2
    last = _last_line(proc.stderr)
    assert last.startswith("metaif train: error:"), proc.stderr
    if name == "model_maml":
        assert "meta=maml" in last
    _assert_nothing_written(run_dir)


def test_help_lists_the_commands(tmp_path):
    proc = _run(["--help"], tmp_path)
    assert proc.returncode == 0
    for command in ("train", "score", "prune-and-retrain"):
        assert re.search(rf"^\s+{re.escape(command)}\s", proc.stdout, re.M), proc.stdout


def test_train_help_and_cfg_job(tmp_path):
    helped, shown = _start(["train", "--help"], tmp_path), _start(["train", "--cfg", "job", "debug=fast"], tmp_path)
    helped, shown = _finish(helped), _finish(shown)
    assert helped.returncode == 0, helped.stderr
    for group in ("dataset", "model", "meta", "debug"):
        assert re.search(rf"^{group}: ", helped.stdout, re.M), helped.stdout
    assert shown.returncode == 0, shown.stderr
    printed = OmegaConf.create(shown.stdout)
    assert printed.dataset.name == "digits" and printed.optim.steps == 6 and printed.meta.name == "maml"
    assert list(tmp_path.iterdir()) == []  # neither writes a run directory


def test_multirun_writes_one_run_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(["train", "-m", "meta=maml,anil", "debug=fast", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = sorted(sweep.glob(f"*/{C.RESULTS_JSON}"))
    assert [p.parent.name for p in results] == ["0-digits-maml-mlp-seed0", "1-digits-anil-mlp-seed0"]
    for path in results:
        assert (path.parent / C.MODEL_PT).exists()
    assert _tmp_files(sweep) == []
