"""Issue 13, kinds 1, 4, 5, 6, 7, 10, 12, 13, 14: bad inputs refused before any work or write.

Each test is named after the kind of fault it guards against and asserts the right
behaviour: one line saying what is wrong and how to fix it (exit status 2 on the command
line), nothing written that looks like a result, settings compared as the run uses them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.hydra_app import sweep_hash
from metaif_cli.importer.config import ImportConfig
from metaif_cli.influence import compute
from metaif_cli.influence.config import HessianConfig
from metaif_cli.prune.config import PruneConfig
from metaif_cli.prune.pipeline import prune_and_retrain
from metaif_cli.score.config import EnsembleConfig, ScoreConfig, settings_of
from metaif_cli.score.pipeline import score
from metaif_cli.train.command import run_train, validation_accuracy
from metaif_cli.train.config import TrainConfig
from metaif_cli.train.preflight import comparable
from test_train import _last_line, _run, _train_cfg, compose_config, typed_config
from refusal_helpers import refused, snapshot

ROOTS = {"train": TrainConfig, "score": ScoreConfig, "prune_and_retrain": PruneConfig}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("inputs") / "run"
    run_train(_train_cfg("optim.steps=2"), run)
    return run


def _score_cfg(run: Path | str, **kw) -> ScoreConfig:
    kw.setdefault("hessian", HessianConfig(lanczos_iters=5))
    return ScoreConfig(run=str(run), progress=False, plots=False, **kw)


# ------------------------------------------------------------------ kind 1: a refused command writes before it checks


def test_refused_command_writes_before_it_checks_train(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    called = []
    refused(run_train, _train_cfg("optim.steps=2", "seed=1"), run, lambda: called.append(1), fragment="seed")
    assert snapshot(run) == before and called == []  # tasks.csv, train_config.json, class_split.json untouched


def test_refused_command_writes_before_it_checks_train_cli(trained, tmp_path):
    """The command line: the refused command leaves the finished run's files and its .hydra/ as they were."""
    run = tmp_path / "run"
    first = _run(["train", "debug=fast", "optim.steps=2", "progress=false", f"hydra.run.dir={run}"], tmp_path)
    assert first.returncode == 0, first.stderr
    before = snapshot(run)
    proc = _run(["train", "debug=fast", "optim.steps=2", "seed=1", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert _last_line(proc.stderr).startswith("metaif train: error:") and "seed" in _last_line(proc.stderr)
    after = snapshot(run)
    log = "train.log"
    assert {k: v for k, v in after.items() if k != log} == {k: v for k, v in before.items() if k != log}


def test_refused_command_writes_before_it_checks_train_resolved_paths(tmp_path, monkeypatch):
    """``data.root`` relative, absolute or with a trailing slash is one setting."""
    monkeypatch.chdir(tmp_path)
    a = dataclasses.asdict(_train_cfg("data.root=data"))
    b = dataclasses.asdict(_train_cfg(f"data.root={tmp_path / 'data'}/"))
    assert comparable(a) == comparable(b)


def test_refused_command_writes_before_it_checks_score(trained, tmp_path):
    out = tmp_path / "scores"
    refused(score, _score_cfg(tmp_path / "missing", method="random"), out, fragment="does not exist")
    assert not out.exists()  # no score_settings.json left behind to refuse the corrected command
    score(_score_cfg(trained, method="random"), out)
    before = snapshot(out)
    refused(score, _score_cfg(trained, method="random", seed=3), out, fragment="other settings (seed differ")
    assert snapshot(out) == before


def test_score_refusal_names_every_differing_setting():
    """Nested settings are named with dots; keys on one side only count; equal dicts name nothing."""
    from metaif_cli.checks import differing_keys

    have = {"method": "if", "seed": 0, "hessian": {"form": "gauss_newton", "lanczos_iters": 20}, "old": 1}
    want = {"method": "if", "seed": 1, "hessian": {"form": "gauss_newton", "lanczos_iters": None}}
    assert differing_keys(have, want) == ["hessian.lanczos_iters", "old", "seed"]
    assert differing_keys(want, want) == []


def test_refused_command_writes_before_it_checks_score_resolved_run(trained, tmp_path, monkeypatch):
    """The same run as a relative path or with a trailing slash is not 'other settings'."""
    monkeypatch.chdir(trained.parent)
    out = tmp_path / "scores"
    score(_score_cfg(trained.name, method="random"), out)
    score(_score_cfg(f"{trained}/", method="random"), out)
    assert settings_of(_score_cfg("./" + trained.name)) == settings_of(_score_cfg(str(trained) + "/"))
    assert json.loads((out / C.SCORE_SETTINGS_JSON).read_text())["run"] == str(trained.resolve())


def test_refused_command_writes_before_it_checks_prune(trained, tmp_path):
    out = tmp_path / "prune"
    cfg = PruneConfig(run=str(trained), methods=["random"], fractions=[0.99], score=_score_cfg(trained),
                      progress=False)
    refused(prune_and_retrain, cfg, out, fragment="fractions")
    assert not out.exists()
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    out.mkdir()
    (out / C.PRUNE_CONFIG_JSON).write_text(json.dumps(dataclasses.asdict(dataclasses.replace(cfg, run=str(other)))))
    before = snapshot(out)
    refused(prune_and_retrain, dataclasses.replace(cfg, fractions=[0.2]), out, fragment="run=")
    assert snapshot(out) == before


def test_refused_command_writes_before_it_checks_import(trained, tmp_path):
    from metaif_cli.importer.run import import_run

    cfg = ImportConfig(run_dir=str(trained), weights=str(tmp_path / "w.pt"))
    torch.save({}, tmp_path / "w.pt")
    before = snapshot(trained)
    refused(import_run, cfg, trained, lambda: pytest.fail("wrote before checking"), fragment="already holds")
    assert snapshot(trained) == before


# ------------------------------------------------------------------ kind 4: NaN and infinity pass numeric checks


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """``(dotted key, type)`` of every leaf setting of a config dataclass tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += _leaves(t, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", t))
    return out


def _is(t: type, kind: type) -> bool:
    """``t`` is ``kind`` or ``Optional[kind]`` (not a list of it)."""
    return t is kind or (typing.get_origin(t) is typing.Union and kind in typing.get_args(t))


def _names_setting(exc: pytest.ExceptionInfo, override: str) -> None:
    """One line naming the setting (prune's score.* settings are named as in metaif score)."""
    key, text = override.split("=")[0], str(exc.value)
    assert "\n" not in text and (key in text or key.removeprefix("score.") in text), text


def _float_cases() -> list:
    cases = []
    for root, cls in ROOTS.items():
        for key, t in _leaves(cls):
            if key.startswith("score.run") or key == "run":
                continue
            if _is(t, float):
                for bad in ("nan", "inf", "-inf"):
                    cases.append(pytest.param(root, f"{key}={bad}", id=f"{root}-{key}={bad}"))
            elif typing.get_origin(t) is list and typing.get_args(t) == (float,):
                cases.append(pytest.param(root, f"{key}=[nan]", id=f"{root}-{key}=[nan]"))
    return cases


@pytest.mark.parametrize(("root", "override"), _float_cases())
def test_nan_passes_numeric_checks(root, override):
    """Every float setting of every command refuses NaN and +-infinity in one line."""
    extra = ["corruption.instance_fraction=0.1"] if "instance_fraction" not in override else []
    with pytest.raises(MetaifError) as exc:
        typed_config(root, [override, *(extra if root == "train" else [])])
    _names_setting(exc, override)


def test_nan_passes_numeric_checks_cli(tmp_path):
    proc = _run(["train", "debug=fast", "optim.lr=nan", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "optim.lr=nan" in _last_line(proc.stderr) and "finite" in _last_line(proc.stderr)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ kind 5: integer and list settings unchecked


def _int_cases() -> list:
    cases = []
    for root, cls in ROOTS.items():
        for key, t in _leaves(cls):
            if _is(t, int) and not _is(t, bool) and key not in ("score.seed",):
                cases.append(pytest.param(root, f"{key}=-1", id=f"{root}-{key}=-1"))
    return cases


@pytest.mark.parametrize(("root", "override"), _int_cases())
def test_integer_and_list_settings_unchecked_negative(root, override):
    """No integer setting of any command accepts -1."""
    with pytest.raises(MetaifError) as exc:
        typed_config(root, [override])
    _names_setting(exc, override)


BAD_SETTINGS = {
    "groups_zero": ("train", ["model.norm=group", "model.groups=0"], "model.groups"),
    "groups_not_dividing": ("train", ["model.norm=group", "model.groups=3"], "divide"),
    "threads_zero": ("train", ["threads=0"], "threads"),
    "meta_batch_above_pool": ("train", ["debug=fast", "optim.meta_batch_size=21"], "optim.meta_batch_size=21"),
    "eval_inner_steps_negative": ("train", ["meta.eval_inner_steps=-1"], "meta.eval_inner_steps"),
    "split_fractions_two": ("train", ["dataset.split_fractions=[0.5,0.5]"], "split_fractions"),
    "instance_roles_empty": ("train", ["corruption.instance_fraction=0.1", "corruption.instance_roles=[]"],
                             "instance_roles"),
    "lanczos_zero": ("score", ["hessian.lanczos_iters=0"], "hessian.lanczos_iters"),
    "solver_tol_above_one": ("score", ["solver.tol=1.5"], "solver.tol"),
    "chunk_zero": ("score", ["chunk=0"], "chunk"),
    "methods_empty": ("prune_and_retrain", ["methods=[]"], "methods"),
    "fractions_empty": ("prune_and_retrain", ["fractions=[]"], "fractions"),
    "loo_modes_empty": ("prune_and_retrain", ["loo_modes=[]"], "loo_modes"),
    "methods_twice": ("prune_and_retrain", ["methods=[if,if]"], "twice"),
    "n_jobs_zero": ("prune_and_retrain", ["n_jobs=0"], "n_jobs"),
    "retrain_batch_zero": ("prune_and_retrain", ["retrain.batch=0"], "retrain.batch"),
    "grad_ascent_steps_zero": ("prune_and_retrain", ["grad_ascent_steps=0"], "grad_ascent_steps"),
}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_integer_and_list_settings_unchecked(name):
    root, overrides, fragment = BAD_SETTINGS[name]
    with pytest.raises(MetaifError) as exc:
        typed_config(root, overrides)
    assert "\n" not in str(exc.value) and fragment in str(exc.value), str(exc.value)


def test_integer_and_list_settings_unchecked_eval_inner_steps_zero_means_none():
    """``meta.eval_inner_steps=0`` evaluates without adaptation (it used to fall back to inner_steps)."""
    cfg = _train_cfg("meta.eval_inner_steps=0")
    assert cfg.meta.eval_inner_steps == 0


def test_integer_and_list_settings_unchecked_against_the_pool(trained, tmp_path):
    cfg = PruneConfig(run=str(trained), protocol="loo", num_units=21, score=_score_cfg(trained), progress=False)
    refused(prune_and_retrain, cfg, tmp_path / "p", fragment="num_units=21")
    cfg = PruneConfig(run=str(trained), methods=["retrain"], retrain_subset=30, score=_score_cfg(trained),
                      progress=False)
    refused(prune_and_retrain, cfg, tmp_path / "p", fragment="retrain_subset=30")
    too_many = dataclasses.replace(_score_cfg(trained, method="random"),
                                   evaluation=dataclasses.replace(ScoreConfig().evaluation, num_tasks=11))
    refused(score, too_many, tmp_path / "s", fragment="evaluation.num_tasks=11")
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


# ------------------------------------------------------------------ kind 6: empty slices


def test_empty_slices_more_shards_than_tasks(trained, tmp_path):
    refused(score, _score_cfg(trained, method="random", unit="task", shard="0/21"), tmp_path / "s",
             fragment="21 shards for 20 training tasks")
    assert not (tmp_path / "s").exists()


def test_empty_slices_every_shard_nonempty(trained, tmp_path):
    out = tmp_path / "s"
    for i in range(20):
        score(_score_cfg(trained, method="random", unit="task", shard=f"{i}/20"), out)
    assert len((out / C.TASK_SCORES_CSV).read_text().splitlines()) == 21


def test_empty_slices_prune_fraction_removing_everything(trained, tmp_path):
    cfg = PruneConfig(run=str(trained), methods=["random"], fractions=[0.98], score=_score_cfg(trained),
                      progress=False)
    refused(prune_and_retrain, cfg, tmp_path / "p", fragment="would remove all 20")


# ------------------------------------------------------------------ kind 7: references checked late


@pytest.mark.parametrize(("ref", "fragment"), [("task:20", "tasks 0..19"), ("task:-1", "tasks 0..19"),
                                               ("query:0:20", "query position 20"), ("support:0:99", "support position 99")])
def test_references_checked_late(trained, tmp_path, monkeypatch, ref, fragment):
    def fail(*a, **k):
        raise AssertionError("scoring started before the references were checked")

    monkeypatch.setattr("metaif_cli.score.pipeline.run_method", fail)
    refused(score, _score_cfg(trained, unit="task", pred_delta_lam=[ref]), tmp_path / "s", fragment=fragment)
    assert not (tmp_path / "s").exists()


def test_references_checked_late_tracin_without_checkpoints(trained, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / C.CHECKPOINT_DIR)
    monkeypatch.setattr("metaif_cli.score.pipeline.run_method", lambda *a, **k: pytest.fail("scored"))
    refused(score, _score_cfg(run, method="tracin"), tmp_path / "s", fragment="optim.num_checkpoints")
    cfg = PruneConfig(run=str(run), methods=["random", "tracin"], score=_score_cfg(run), progress=False)
    refused(prune_and_retrain, cfg, tmp_path / "p", fragment="optim.num_checkpoints")


def test_references_checked_late_scores_dir(trained, tmp_path, monkeypatch):
    monkeypatch.setattr("metaif_cli.prune.pipeline.gather_rankings", lambda *a, **k: pytest.fail("ranked"))
    cfg = PruneConfig(run=str(trained), scores=str(tmp_path / "nothing"), methods=["if"], score=_score_cfg(trained),
                      progress=False)
    refused(prune_and_retrain, cfg, tmp_path / "p", fragment="score.json")
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------------ kind 10: sweeps do not resume


def test_sweeps_do_not_resume_sweep_dir_is_stable():
    a = sweep_hash(["debug=fast", "seed=0,1", "progress=false"])
    assert a == sweep_hash(["seed=0,1", "debug=fast"]) == sweep_hash(["seed=0,1", "debug=fast", "hydra.verbose=true"])
    assert a != sweep_hash(["seed=0,1,2", "debug=fast"])
    for root in ROOTS:
        text = (Path(__file__).resolve().parents[1] / "conf" / root / f"{root}.yaml").read_text()
        assert "${now:" not in text and "multirun-${metaif_sweep:}" in text


def test_sweeps_do_not_resume(tmp_path):
    args = ["train", "-m", "debug=fast", "optim.steps=1", "seed=0,1", "progress=false"]
    first = _run(args, tmp_path)
    assert first.returncode == 0, first.stderr
    second = _run(args, tmp_path)
    assert second.returncode == 0, second.stderr
    sweeps = list((tmp_path / "outputs" / "train").iterdir())
    assert len(sweeps) == 1, sweeps
    assert len([p for p in sweeps[0].iterdir() if p.is_dir()]) == 2
    assert second.stderr.count("nothing to do") + second.stdout.count("nothing to do") == 2


# ------------------------------------------------------------------ kind 12: each command's own config groups


def test_score_help_lists_train_groups(tmp_path):
    for command, wanted, unwanted in (("score", {"experiment", "debug"}, {"dataset", "model", "meta", "logger"}),
                                      ("prune-and-retrain", {"experiment", "debug"}, {"dataset", "model", "logger"}),
                                      ("train", {"dataset", "model", "meta", "logger", "experiment"}, {"score"})):
        proc = _run([command, "--help"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        groups_text = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
        groups = {line.split(":")[0].strip() for line in groups_text.splitlines() if ":" in line}
        assert wanted <= groups and not (unwanted & groups), (command, groups)


@pytest.mark.parametrize(("root", "preset"), [("score", "cpu_paper"), ("prune_and_retrain", "e1_tasks"),
                                              ("prune_and_retrain", "e4_loo"), ("score", "debug=fast")])
def test_experiment_presets_usable_with_score_and_prune(root, preset):
    override = preset if "=" in preset else f"experiment={preset}"
    cfg = typed_config(root, [override])
    assert isinstance(cfg, ROOTS[root])
    assert "dataset" not in compose_config(root, [override])


# ------------------------------------------------------------------ kind 13: train returns the test accuracy


def test_train_returns_the_validation_metric(trained):
    results = json.loads((trained / C.RESULTS_JSON).read_text())
    import pandas as pd

    metrics = pd.read_csv(trained / C.METRICS_CSV)
    assert validation_accuracy(results, trained) == pytest.approx(metrics["val_acc"].dropna().iloc[-1])
    legacy = {k: v for k, v in results.items() if not k.startswith("val_")}
    assert validation_accuracy(legacy, trained) == validation_accuracy(results, trained)
    assert "test_acc" in results  # still reported, never returned


# ------------------------------------------------------------------ kind 14: each shard recomputes s


def test_each_shard_recomputes_s(trained, tmp_path, monkeypatch):
    calls = []
    real = compute.solve_ihvp

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(compute, "solve_ihvp", counted)
    out = tmp_path / "s"
    cfg = _score_cfg(trained, unit="task", ensemble=EnsembleConfig(checkpoints=1))  # one s, shared through ihvp.pt
    score(dataclasses.replace(cfg, shard="0/2"), out)
    assert len(calls) == 1 and (out / C.IHVP_PT).exists()
    summary = score(dataclasses.replace(cfg, shard="1/2"), out)
    assert len(calls) == 1 and summary["solver"]["reused_from_ihvp_pt"] is True
    single = score(cfg, tmp_path / "single")
    import pandas as pd

    merged = pd.read_csv(out / C.TASK_SCORES_CSV)
    whole = pd.read_csv(tmp_path / "single" / C.TASK_SCORES_CSV)
    assert (merged[C.SCORE_COLUMN] - whole[C.SCORE_COLUMN]).abs().max() < 1e-5
    assert single["solver"]["reused_from_ihvp_pt"] is False
    score(cfg, tmp_path / "single")  # a rerun with the same settings reads ihvp.pt
    assert len(calls) == 2
    other = dataclasses.replace(cfg, hessian=dataclasses.replace(cfg.hessian, damping=0.5))
    score(dataclasses.replace(other, overwrite=True), tmp_path / "single")  # other settings: solved again
    assert len(calls) == 3


def test_refused_command_writes_before_it_checks_score_failed_computation(trained, tmp_path, monkeypatch):
    """A scoring that fails part-way leaves no score_settings.json to refuse the corrected command."""
    out = tmp_path / "scores"

    def fail(*a, **k):
        raise MetaifError("the solver did not converge; raise solver.max_iter")

    monkeypatch.setattr("metaif_cli.score.pipeline.run_method", fail)
    refused(score, _score_cfg(trained, method="random"), out, fragment="solver.max_iter")
    assert not (out / C.SCORE_SETTINGS_JSON).exists()
    monkeypatch.undo()
    score(_score_cfg(trained, method="random", seed=3), out)  # corrected settings: accepted
    assert json.loads((out / C.SCORE_SETTINGS_JSON).read_text())["seed"] == 3


@pytest.mark.parametrize(("change", "fragment"), [
    ({"method": "trak", "trak": {"num_checkpoints": 10}}, "trak.num_checkpoints=10"),
    ({"method": "ekfac_if", "pred_delta_lam": ["task:0"]}, "pred_delta_lam"),
    ({"method": "trak", "evaluation": {"kind": "per_task"}}, "evaluation.kind=mean_loss"),
    ({"method": "trajectory", "pred_delta_lam": ["task:0"]}, "pred_delta_lam"),
    ({"method": "trajectory", "evaluation": {"kind": "per_task"}}, "evaluation.kind=mean_loss"),
])
def test_references_checked_late_library_baselines(trained, tmp_path, monkeypatch, change, fragment):
    monkeypatch.setattr("metaif_cli.score.pipeline.run_method", lambda *a, **k: pytest.fail("scored"))
    cfg = _score_cfg(trained)
    for key, value in change.items():
        if isinstance(value, dict):
            value = dataclasses.replace(getattr(cfg, key), **value)
        cfg = dataclasses.replace(cfg, **{key: value})
    refused(score, cfg, tmp_path / "s", fragment=fragment)
    assert not (tmp_path / "s").exists()
