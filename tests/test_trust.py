"""Issue 21 (trust), kinds 1, 2, 5, 6, 10 and 11.

1. Nothing a command reads from a run directory, a ``scores=`` folder or an imported file
   chooses code to import or call: a crafted ``model.factory`` or a pickle that would run code
   runs nothing, over every reader (score, prune-and-retrain, train's resume, import, the API).
2. A refused command deletes only what it created; the clean-up of temporaries removes only
   metaif's own marked temporaries.
5. Non-finite parameters, losses or metrics end a command with one line (exit 2).
6. Operating-system faults and absurd sizes end in one line (exit 2; Ctrl-C exit 130).
10. ``.pt`` files are byte-identical after a resume (canonical serialisation).
11. ``metaif import ... dtype=float64`` keeps float64 weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaif_cli import api
from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.models.custom import trusted_factory
from metaif_cli.train.command import run_train
from test_train import _train_cfg
from run_fixtures import STEPS

REPO = Path(__file__).resolve().parents[1]
TINY_CLI = ["debug=fast", "device=cpu", "progress=false", "model.hidden=8", "meta.inner_steps=1", "dataset.queries=4"]
FAST_SCORE = ["progress=false", "plots=false", "hessian.num_tasks=4", "evaluation.num_tasks=4"]


def metaif(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "metaif_cli.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit status ``code``, no traceback, the last stderr line names every needle; return that line."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if x.strip()][-1]
    for needle in needles:
        assert needle in line, line
    return line


# ------------------------------------------------------------------ kind 1: a run directory never runs code


class RunsCode:
    """A pickle that would run ``touch <marker>`` when unpickled without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft_factory(run: Path, marker: Path) -> None:
    """Make every saved config of ``run`` name ``os:system`` as its custom factory (issue 21's example)."""
    model = {"name": "custom", "factory": "os:system", "kwargs": {"command": f"touch {marker}"}, "head": "fc",
             "hidden": 8, "layers": 2, "norm": "none", "groups": 4, "pool": "max"}
    for path in [run / C.MODEL_PT, run / C.CHECKPOINT_LAST, run / C.CHECKPOINT_PREV,
                 *sorted((run / C.CHECKPOINT_DIR).glob("*.pt"))]:
        if path.exists():
            saved = torch.load(path, weights_only=True)
            if "config" in saved:
                saved["config"]["model"] = dict(model)
                torch.save(saved, path)
    data = json.loads((run / C.TRAIN_CONFIG_JSON).read_text())
    data["model"] = dict(model)
    (run / C.TRAIN_CONFIG_JSON).write_text(json.dumps(data))


def _score_cli(run: Path, tmp: Path) -> None:
    proc = metaif("score", f"run={run}", *FAST_SCORE, f"hydra.run.dir={tmp / 'scores'}")
    assert_one_line(proc, "metaif score: error:", "os:system", "factory=")


def _prune_cli(run: Path, tmp: Path) -> None:
    proc = metaif("prune-and-retrain", f"run={run}", "methods=[random]", "fractions=[0.5]", "progress=false",
                  f"hydra.run.dir={tmp / 'pruned'}")
    assert_one_line(proc, "metaif prune-and-retrain: error:", "os:system")


def _train_resume_cli(run: Path, tmp: Path) -> None:
    proc = metaif("train", *TINY_CLI, *STEPS, f"hydra.run.dir={run}")
    assert_one_line(proc, "metaif train: error:")


def _api_score(run: Path, tmp: Path) -> None:
    with pytest.raises(MetaifError, match="os:system"):
        api.score(run, unit="task", hessian={"num_tasks": 4}, evaluation={"num_tasks": 4})


def _api_ensemble(run: Path, tmp: Path) -> None:
    with pytest.raises(MetaifError):
        api.score(tmp / "good", unit="task", runs=[str(run)], hessian={"num_tasks": 4}, evaluation={"num_tasks": 4})


READERS = {"score": _score_cli, "prune-and-retrain": _prune_cli, "train-resume": _train_resume_cli,
           "api.score": _api_score, "api.score-runs": _api_ensemble}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_crafted_run_dir_factory_runs_no_code(reader, finished, run_copy, tmp_path):
    marker = tmp_path / "PWNED"
    shutil.copytree(finished, tmp_path / "good")
    craft_factory(run_copy, marker)
    READERS[reader](run_copy, tmp_path)
    assert not marker.exists(), f"{reader} ran the factory named by the run directory"


def test_crafted_pickle_in_any_run_file_runs_no_code(finished, run_copy, tmp_path):
    """Every ``.pt`` a command reads (model, last and previous checkpoint, step checkpoints, ``ihvp.pt``
    of a scores folder, an imported file) replaced by a pickle that runs code: refused, nothing runs."""
    marker = tmp_path / "PWNED"
    scores = tmp_path / "scores"
    api.score(finished, scores, unit="task", hessian={"num_tasks": 4}, evaluation={"num_tasks": 4})
    files = [p for p in sorted(run_copy.rglob("*.pt"))] + [scores / C.IHVP_PT]
    assert {C.MODEL_PT, C.CHECKPOINT_LAST, C.CHECKPOINT_PREV} <= {p.name for p in files}
    assert any(p.parent.name == C.CHECKPOINT_DIR for p in files)
    for path in files:
        torch.save({"config": RunsCode(marker), "lam": RunsCode(marker), "s": RunsCode(marker)}, path)
    with pytest.raises(MetaifError, match="corrupt or unreadable"):
        api.score(run_copy, unit="task", method="tracin")
    with pytest.raises(MetaifError, match="corrupt or unreadable"):
        api.load_scores(scores)
    with pytest.raises(MetaifError):  # train's resume reads the checkpoints and model.pt
        run_train(_train_cfg(*STEPS), run_copy)
    with pytest.raises(MetaifError, match="weights_only"):  # an imported file
        api.import_weights(tmp_path / "imported", run_copy / C.MODEL_PT, _train_cfg(*STEPS))
    proc = metaif("import", *TINY_CLI, f"run_dir={tmp_path / 'imported2'}", f"weights={run_copy / C.MODEL_PT}")
    assert_one_line(proc, "weights_only")
    assert not marker.exists()


def test_saved_factory_is_only_checked_against_the_given_one(monkeypatch):
    with pytest.raises(MetaifError, match="never imports code named only by a run directory"):
        trusted_factory("os:system", None, "runs/x")
    with pytest.raises(MetaifError, match="is not the factory run runs/x was trained with"):
        trusted_factory("os:system", "my_nets:make_net", "runs/x")
    assert trusted_factory("my_nets:make_net", "my_nets:make_net", "runs/x") == "my_nets:make_net"
    monkeypatch.setattr("metaif_cli.models.custom.registered_factories", lambda: {"my_nets:make_net"})
    assert trusted_factory("my_nets:make_net", None, "runs/x") == "my_nets:make_net"  # a registered entry point


# ------------------------------------------------------------------ kind 2: delete only what this command created


def test_refused_command_leaves_existing_folder_untouched(tmp_path):
    folder = tmp_path / "mylogs"
    folder.mkdir()
    (folder / "app.log").write_text("x\n")
    (folder / ".notes.tmp").write_text("mine\n")
    proc = metaif("train", "debug=fast", "optim.lr=-1", f"hydra.run.dir={folder}")
    assert_one_line(proc, "optim.lr=-1")
    assert sorted(p.name for p in folder.iterdir()) == [".notes.tmp", "app.log"]
    assert (folder / "app.log").read_text() == "x\n" and (folder / ".notes.tmp").read_text() == "mine\n"


def test_refused_command_removes_the_folder_it_created(tmp_path):
    folder = tmp_path / "new" / "run"
    proc = metaif("train", "debug=fast", "optim.lr=-1", f"hydra.run.dir={folder}")
    assert_one_line(proc, "optim.lr=-1")
    assert not folder.exists()


def test_refused_sweep_job_keeps_a_job_folder_that_existed(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "keep").mkdir(parents=True)
    (sweep / "keep" / "train.log").write_text("my own log\n")
    proc = metaif("train", "-m", "debug=fast", "optim.lr=-1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=keep")
    assert "optim.lr=-1" in proc.stderr and "Traceback" not in proc.stderr
    assert (sweep / "keep" / "train.log").read_text().startswith("my own log\n")


def test_temporaries_cleanup_removes_only_metaif_marked_temporaries(tmp_path):
    from metaif_cli.io import clean_stale_temporaries

    dead = 2**22 + 777  # above any pid in use
    ours = tmp_path / "sub" / f".task_scores.csv.metaif-{dead}-0a0b0c0d.tmp"
    alive = tmp_path / f".model.pt.metaif-{os.getpid()}-0a0b0c0d.tmp"  # being written: not stale...
    users = [tmp_path / ".notes.tmp", tmp_path / f".data.{dead}.0a0b0c0d.tmp", tmp_path / "x.tmp",
             tmp_path / f".a.metaif-{dead}-XYZ.tmp", tmp_path / "sub" / f".b.metaif-{dead}-0a0b0c0d.tmp.bak"]
    for path in [ours, alive, *users]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert clean_stale_temporaries(tmp_path) == 2  # ...unless no write of this process holds it (a leftover)
    assert not ours.exists() and not alive.exists() and all(p.exists() for p in users)


def test_resumed_training_keeps_users_tmp_files_in_the_run_directory(run_copy):
    mine = [run_copy / ".draft.tmp", run_copy / C.CHECKPOINT_DIR / ".x.123.abcd1234.tmp"]
    for path in mine:
        path.write_text("mine")
    run_train(_train_cfg(*STEPS), run_copy)  # finished: resumes to nothing, cleaning temporaries first
    assert all(p.read_text() == "mine" for p in mine)


# ------------------------------------------------------------------ kind 5: non-finite runs end the command


def test_diverged_training_exits_2_and_leaves_no_finished_run(tmp_path):
    run = tmp_path / "run"
    proc = metaif("train", "debug=fast", "optim.steps=1", "optim.lr=1e30", "optim.eval_every=1",
                  "optim.checkpoint_every=1", "optim.num_checkpoints=1", "progress=false", f"hydra.run.dir={run}")
    assert_one_line(proc, "metaif train: error:", "nan", "lower optim.lr")
    assert not (run / C.MODEL_PT).exists() and not (run / C.RESULTS_JSON).exists()


def test_parameters_that_become_non_finite_end_training(monkeypatch, tmp_path):
    from metaif_cli.meta.learner import MetaLearner

    original = MetaLearner.meta_gradient

    def inf_gradient(self, lam, batch):
        grads, losses = original(self, lam, batch)
        return {k: torch.full_like(g, float("inf")) for k, g in grads.items()}, losses

    monkeypatch.setattr(MetaLearner, "meta_gradient", inf_gradient)
    with pytest.raises(MetaifError, match="diverged: parameter .* is not finite after step 1"):
        run_train(_train_cfg(*STEPS), tmp_path / "run")
    assert not (tmp_path / "run" / C.MODEL_PT).exists()


def _poison_run(run: Path, where: str) -> None:
    if where == "model.pt":
        saved = torch.load(run / C.MODEL_PT, weights_only=True)
        saved["lam"]["head.bias"][0] = float("nan")
        torch.save(saved, run / C.MODEL_PT)
    elif where == "results.json":
        results = json.loads((run / C.RESULTS_JSON).read_text())
        results["test_loss"] = float("nan")
        (run / C.RESULTS_JSON).write_text(json.dumps(results))
    else:  # an intermediate checkpoint
        path = sorted((run / C.CHECKPOINT_DIR).glob("step_*.pt"))[0]
        saved = torch.load(path, weights_only=True)
        saved["lam"]["head.weight"][0, 0] = float("inf")
        torch.save(saved, path)


@pytest.mark.parametrize("where", ["model.pt", "results.json", "checkpoint"])
def test_diverged_run_is_refused_downstream(where, run_copy, tmp_path):
    _poison_run(run_copy, where)
    method = "tracin" if where == "checkpoint" else "loss"
    with pytest.raises(MetaifError, match="diverged"):
        api.score(run_copy, unit="task", method=method)
    if where != "checkpoint":
        proc = metaif("prune-and-retrain", f"run={run_copy}", "methods=[random]", "fractions=[0.5]",
                      "progress=false", f"hydra.run.dir={tmp_path / 'pruned'}")
        assert_one_line(proc, "diverged")
        with pytest.raises(MetaifError, match="diverged"):  # train's resume of the finished run
            run_train(_train_cfg(*STEPS), run_copy)


def test_import_of_nan_weights_is_refused(finished, tmp_path):
    lam = torch.load(finished / C.MODEL_PT, weights_only=True)["lam"]
    lam["body.1.weight"][0, 0] = float("nan")
    torch.save(lam, tmp_path / "nan.pt")
    proc = metaif("import", *TINY_CLI, f"run_dir={tmp_path / 'imported'}", f"weights={tmp_path / 'nan.pt'}")
    assert_one_line(proc, "metaif import: error:", "NaN or infinite", "body.1.weight")
    assert not (tmp_path / "imported").exists()
    with pytest.raises(MetaifError, match="NaN or infinite"):
        api.write_run(tmp_path / "api", lam, _train_cfg())


def test_non_finite_scores_are_not_written(tmp_path):
    import pandas as pd

    from metaif_cli.score.outputs import write_tables

    df = pd.DataFrame({"task_id": [0, 1], C.SCORE_COLUMN: [0.5, float("nan")], "rank": [1, 2], "method": "if",
                       "corrupted": False})
    with pytest.raises(MetaifError, match="NaN or infinite"):
        write_tables(tmp_path, df, None)
    assert list(tmp_path.iterdir()) == []


def test_scores_folder_with_infinite_scores_is_refused(finished, tmp_path):
    scores = tmp_path / "scores"
    api.score(finished, scores, unit="task", method="loss")
    table = scores / C.TASK_SCORES_CSV
    lines = table.read_text().splitlines()
    cells = lines[1].split(",")
    cells[1] = "inf"
    table.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    proc = metaif("prune-and-retrain", f"run={finished}", f"scores={scores}", "methods=[loss]", "fractions=[0.5]",
                  "progress=false", f"hydra.run.dir={tmp_path / 'pruned'}")
    assert_one_line(proc, "non-finite scores", str(table))


# ------------------------------------------------------------------ kind 11: dtype conversions are explicit


def _float64_weights(finished: Path) -> dict[str, torch.Tensor]:
    """The run's weights in float64 with digits float32 cannot hold."""
    lam = torch.load(finished / C.MODEL_PT, weights_only=True)["lam"]
    return {k: v.double() + 1e-9 * torch.arange(v.numel(), dtype=torch.float64).reshape(v.shape) for k, v in lam.items()}


def test_float64_import_keeps_float64_weights(finished, tmp_path):
    weights = _float64_weights(finished)
    torch.save(weights, tmp_path / "w64.pt")
    proc = metaif("import", *TINY_CLI, "dtype=float64", f"run_dir={tmp_path / 'run64'}", f"weights={tmp_path / 'w64.pt'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lam = torch.load(tmp_path / "run64" / C.MODEL_PT, weights_only=True)["lam"]
    for k, v in weights.items():
        assert lam[k].dtype == torch.float64 and torch.equal(lam[k], v), k
    # a float32 run converts them once, explicitly, to float32
    api.import_weights(tmp_path / "run32", tmp_path / "w64.pt", _train_cfg())
    lam32 = torch.load(tmp_path / "run32" / C.MODEL_PT, weights_only=True)["lam"]
    assert all(lam32[k].dtype == torch.float32 and torch.equal(lam32[k], v.float()) for k, v in weights.items())


def test_float64_import_of_a_custom_network_keeps_float64(tmp_path):
    from own_helpers import make_named_net

    from metaif_cli.importer.run import lam_from_state_dict
    from metaif_cli.train.experiment import build_experiment

    helpers = Path(__file__).resolve().parent / "own_helpers.py"
    cfg = _train_cfg("dtype=float64", "model=custom", f"model.factory={helpers}:make_named_net", "model.head=fc",
                     "model.kwargs={ways: 5, size: 8}")
    sd = {k: v.double() + 1e-10 for k, v in make_named_net(ways=5, size=8).state_dict().items()
          if v.is_floating_point()}
    lam = lam_from_state_dict(build_experiment(cfg), sd)
    assert lam["head.weight"].dtype == torch.float64 and torch.equal(lam["head.weight"], sd["fc.weight"])
    assert torch.equal(lam["body.features.0.weight"], sd["features.0.weight"])


# ------------------------------------------------------------------ kind 10: canonical .pt bytes


def test_resumed_training_writes_byte_identical_pt_files(tmp_path, monkeypatch):
    from metaif_cli.meta.learner import MetaLearner

    cfg = _train_cfg("optim.steps=8", "optim.checkpoint_every=3", "optim.eval_every=4", "optim.num_checkpoints=2")
    run_train(cfg, tmp_path / "straight")
    real, calls = MetaLearner.meta_gradient, [0]

    def interrupted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(MetaLearner, "meta_gradient", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_train(cfg, tmp_path / "resumed")
    run_train(cfg, tmp_path / "resumed")
    names = [C.MODEL_PT] + [f"{C.CHECKPOINT_DIR}/{p.name}" for p in (tmp_path / "straight" / C.CHECKPOINT_DIR).iterdir()]
    assert len(names) == 3
    for name in names:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_pt_bytes_depend_on_content_not_on_object_identity():
    import io

    import numpy as np

    from metaif_cli.io import torch_bytes

    base = torch.arange(12.0)
    built = {"step": 3, "lam": {"a": base[:6].view(2, 3), "b": base[6:]}, "s": torch.ones(4),
             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
             "metrics": [{"step": 1, "loss": np.float64(0.5)}, {"step": 2, "loss": 0.25}]}
    reread = torch.load(io.BytesIO(torch_bytes(built)), weights_only=True)
    assert torch_bytes(reread) == torch_bytes(built)
    # a resumed command: parts read back from disk (other string objects, other storages) in a new dict
    parts = {k: torch.load(io.BytesIO(torch_bytes(v)), weights_only=True) for k, v in built.items() if k != "step"}
    resumed = {"step": 3, "lam": {"a": torch.arange(6.0).view(2, 3), "b": parts["lam"]["b"]}, "s": parts["s"],
               "optimizer": parts["optimizer"], "metrics": parts["metrics"]}
    assert torch_bytes(resumed) == torch_bytes(built)


# ------------------------------------------------------------------ kind 6: faults of the system are one line


def _main(capsys, *argv: str) -> tuple[int, str]:
    """``metaif`` in this process (so a fault can be injected); return its status and stderr's last line."""
    from metaif_cli.cli import main

    import logging

    try:
        code = main(list(argv))
    finally:  # Hydra's job log handler points into the run directory, perhaps removed: detach it
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip()]
    return code, lines[-1] if lines else ""


def _no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(("fault", "errno_name", "words"), [
    ("fsync", "ENOSPC", "No space left on device"),
    ("rename", "EROFS", "Read-only file system"),
    ("rename", "EACCES", "Permission denied"),
])
def test_disk_faults_while_writing_are_one_line_and_leave_nothing_half_written(fault, errno_name, words, capsys,
                                                                               monkeypatch, tmp_path):
    import errno

    from metaif_cli import io as mio

    code = getattr(errno, errno_name)

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(mio.os, "fsync", fail) if fault == "fsync" else monkeypatch.setattr(mio, "_replace", fail)
    run = tmp_path / "run"
    status, line = _main(capsys, "train", *TINY_CLI, f"hydra.run.dir={run}")
    assert status == 2 and line.startswith("metaif train: error:") and words in line, line
    assert str(run) in line and "hydra.run.dir" in line
    assert _no_temporaries(tmp_path)
    assert not (run / C.MODEL_PT).exists()


def test_unreadable_data_root_is_one_line(capsys, monkeypatch, tmp_path):
    import errno
    import pathlib

    root = tmp_path / "data"
    root.mkdir()
    real = {name: getattr(pathlib.Path, name) for name in ("exists", "is_file", "is_dir", "iterdir")}

    def guarded(name):
        def method(self, *args, **kwargs):
            if str(self).startswith(f"{root}/"):  # as after chmod 000 on data.root
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real[name](self, *args, **kwargs)
        return method

    for name in real:
        monkeypatch.setattr(pathlib.Path, name, guarded(name))
    status, line = _main(capsys, "train", *TINY_CLI, "dataset=mnist", f"data.root={root}",
                         f"hydra.run.dir={tmp_path / 'run'}")
    assert status == 2 and "Permission denied" in line and str(root) in line and "data.root" in line, line


def test_name_over_the_system_limit_is_one_line(tmp_path):
    run = tmp_path / ("a" * 300)
    proc = metaif("train", *TINY_CLI, f"hydra.run.dir={run}")
    assert_one_line(proc, "metaif train: error:", "File name too long", "shorter")


def test_huge_network_is_refused_before_allocating(tmp_path):
    proc = metaif("train", *TINY_CLI, "model.hidden=1000000", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line(proc, "model.hidden=1000000", "more than this machine's memory", "lower model.hidden")
    assert not (tmp_path / "run").exists()


def test_parameter_count_matches_the_built_networks():
    import itertools

    from metaif_cli.models.config import ModelConfig
    from metaif_cli.models.networks import build_model, parameter_count

    for name, norm, pool, layers, shape in itertools.product(("mlp", "cnn4"), ("none", "group"), ("max", "stride"),
                                                             (1, 3), ((1, 8, 8), (3, 7, 5))):
        cfg = ModelConfig(name=name, norm=norm, pool=pool, layers=layers, hidden=8, groups=4)
        built = sum(p.numel() for p in build_model(cfg, shape, 5, 0).parameters())
        assert built == parameter_count(cfg, shape, 5), (name, norm, pool, layers, shape)


def test_learning_rate_beyond_the_dtype_is_refused(tmp_path):
    proc = metaif("train", *TINY_CLI, "optim.lr=1e39", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line(proc, "optim.lr=1e+39", "float32")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("run_value", [5, None, ["x"]])
def test_score_json_with_a_run_that_is_not_text_is_one_line(run_value, finished, tmp_path):
    from metaif_cli.prune.scores import read_scores_dir
    from metaif_cli.score.run import load_run

    scores = tmp_path / "scores"
    api.score(finished, scores, unit="task", method="loss")
    summary = json.loads((scores / C.SCORE_JSON).read_text())
    summary["run"] = run_value
    (scores / C.SCORE_JSON).write_text(json.dumps(summary))
    with pytest.raises(MetaifError, match="corrupt or unreadable: .*score.json.*'run' and 'method' must be text"):
        read_scores_dir(scores, load_run(finished), "task")


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch, tmp_path):
    from metaif_cli.meta.learner import MetaLearner

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MetaLearner, "meta_gradient", interrupted)
    status, line = _main(capsys, "train", *TINY_CLI, f"hydra.run.dir={tmp_path / 'run'}")
    assert status == 130 and line == "metaif train: interrupted; rerun the same command to resume", line
    assert _no_temporaries(tmp_path)


def test_system_fault_behind_another_error_is_one_line():
    import errno

    from metaif_cli.errors import system_error

    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/ro/run/train.log")
        except OSError as inner:
            raise ValueError("Unable to configure handler 'file'") from inner  # as logging.config reports it
    except ValueError as exc:
        err = system_error(exc)
    assert err is not None and str(err).startswith("Read-only file system: /ro/run/train.log; ")
    assert system_error(ValueError("a bug")) is None
