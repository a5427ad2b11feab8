"""Issue 12 through the command line: your own images, your own network, weights trained elsewhere.

- a folder of real MNIST digits (PNG and JPEG) with a user network holding ``nn.BatchNorm2d``
  trains, scores and prunes through ``metaif train``/``score``/``prune-and-retrain``;
- a learn2learn-style ``module.``-prefixed state dict imports (``metaif import``) and scores
  identically to the same weights trained by ``metaif train``;
- each bad input (unreadable image, class with too few images, empty folder, missing or broken
  factory, refused layer, mismatching state dict) stops with one line, exit status 2, and leaves
  no run directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import own_helpers as H  # noqa: E402

from metaif_cli import constants as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METAIF = [sys.executable, "-m", "metaif_cli.cli"]
HELPERS = str(Path(H.__file__).resolve())
TINY = ["dataset.num_train_tasks=8", "dataset.num_val_tasks=3", "dataset.num_test_tasks=4", "optim.steps=6",
        "optim.eval_every=3", "optim.checkpoint_every=3", "optim.num_checkpoints=1", "optim.meta_batch_size=4",
        "meta.inner_steps=2", "progress=false"]
FOLDER = ["dataset=folder", "dataset.image_size=8", "dataset.channels=1", "dataset.ways=3", "dataset.shots=1",
          "dataset.queries=2", "dataset.split_fractions=[0.34,0.33,0.33]"]
CUSTOM = ["model=custom", f"model.factory={HELPERS}:make_bn_net", "model.kwargs={ways: 3, hidden: 4, size: 8}",
          "model.head=9"]
FAST_SCORE = ["progress=false", "hessian.num_tasks=8", "evaluation.num_tasks=4", "plots=false"]


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*METAIF, *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def metaif(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*METAIF, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def digits(tmp_path_factory, shared_data) -> Path:
    """Nine classes of six real MNIST test digits, every third saved as an RGB JPEG."""
    return H.write_digit_folder(tmp_path_factory.mktemp("own") / "digits", classes=9, per_class=6)


def test_folder_and_custom_network_train_score_prune(digits, tmp_path):
    run, scores, pruned = tmp_path / "run", tmp_path / "scores", tmp_path / "pruned"
    metaif("train", *TINY, *FOLDER, f"dataset.path={digits}", *CUSTOM, f"hydra.run.dir={run}")
    tasks = pd.read_csv(run / C.TASKS_CSV)
    assert set(tasks["class"]) <= {f"digit{c}" for c in range(9)} and len(set(tasks["class"])) == 9
    saved = torch.load(run / C.MODEL_PT, weights_only=False)
    assert saved["config"]["model"]["factory"] == f"{HELPERS}:make_bn_net"
    assert saved["config"]["model"]["kwargs"] == {"ways": 3, "hidden": 4, "size": 8}
    assert saved["config"]["dataset"]["path"] == str(digits)
    assert "body.1.weight" in saved["lam"] and "head.weight" in saved["lam"]  # the converted batch norm
    factory = f"{HELPERS}:make_bn_net"  # a run names its factory for checking only: the user gives it
    metaif("score", f"run={run}", *FAST_SCORE, f"factory={factory}", f"hydra.run.dir={scores}")
    task_scores = pd.read_csv(scores / C.TASK_SCORES_CSV)
    assert sorted(task_scores.task_id) == list(range(8)) and task_scores[C.SCORE_COLUMN].notna().all()
    proc = metaif("prune-and-retrain", f"run={run}", f"scores={scores}", "methods=[if,random]", "fractions=[0.5]",
                  "progress=false", f"score.factory={factory}", f"hydra.run.dir={pruned}")
    results = pd.read_csv(pruned / C.PRUNE_RESULTS_CSV)
    assert results.method.tolist() == ["none", "if", "random"] and results.test_acc.between(0, 1).all()
    assert "outputs in" in proc.stdout


def test_module_prefixed_state_dict_imports_and_scores_identically(tmp_path):
    run, imported = tmp_path / "trained", tmp_path / "imported"
    settings = [*TINY, "model.hidden=8", "dataset.num_train_tasks=10", "seed=3"]
    metaif("train", *settings, f"hydra.run.dir={run}")
    lam = torch.load(run / C.MODEL_PT, weights_only=False)["lam"]
    torch.save({f"module.{k}": v for k, v in lam.items()}, tmp_path / "maml.pt")  # learn2learn MAML(model)
    metaif("import", *settings, f"run_dir={imported}", f"weights={tmp_path / 'maml.pt'}")
    for name in (C.TASKS_CSV, C.TRAIN_CONFIG_JSON, C.SPLIT_JSON):
        assert (run / name).read_text() == (imported / name).read_text(), name
    procs = [_start("score", f"run={r}", *FAST_SCORE, f"hydra.run.dir={tmp_path / ('s_' + r.name)}")
             for r in (run, imported)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    for name in (C.TASK_SCORES_CSV, C.INSTANCE_SCORES_CSV):
        a = (tmp_path / "s_trained" / name).read_text()
        assert a == (tmp_path / "s_imported" / name).read_text(), name
    s_a = torch.load(tmp_path / "s_trained" / C.IHVP_PT, weights_only=False)["s"]
    assert torch.equal(s_a, torch.load(tmp_path / "s_imported" / C.IHVP_PT, weights_only=False)["s"])
    # prune-and-retrain retrains with the imported settings, the unpruned baseline included
    metaif("prune-and-retrain", f"run={imported}", f"scores={tmp_path / 's_imported'}", "methods=[if]",
           "fractions=[0.5]", "progress=false", f"hydra.run.dir={tmp_path / 'pruned'}")
    results = pd.read_csv(tmp_path / "pruned" / C.PRUNE_RESULTS_CSV)
    assert results.method.tolist() == ["none", "if"] and (results.retrain_seconds > 0).all()
    retrained = json.loads((tmp_path / "pruned" / C.RETRAIN_DIR / "none-0" / C.RESULTS_JSON).read_text())
    assert retrained["test_acc"] == json.loads((run / C.RESULTS_JSON).read_text())["test_acc"]  # same loop, same run


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing left


def _bad_folders(root: Path, digits: Path) -> dict[str, Path]:
    unreadable = root / "unreadable"
    shutil.copytree(digits, unreadable)
    (unreadable / "digit4" / "00999.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    few = root / "few"
    shutil.copytree(digits, few)
    for f in sorted((few / "digit7").iterdir())[1:]:
        f.unlink()
    empty = root / "empty"
    empty.mkdir()
    return {"unreadable": unreadable, "few": few, "empty": empty}


BAD = {  # name: (command and overrides without paths, fragment of the one-line error)
    "unreadable_image": (["train", *FOLDER, "dataset.path={unreadable}"],
                         "corrupt or unreadable: {unreadable}/digit4/00999.png"),
    "class_with_too_few_images": (["train", *FOLDER, "dataset.path={few}"],
                                  "class 'digit7' ({few}/digit7) has 1 images"),
    "empty_folder": (["train", *FOLDER, "dataset.path={empty}"], "{empty} holds no class subfolders"),
    "missing_factory": (["train", "model=custom", "model.factory=no_such_pkg_xyz.nets:make_net"],
                        "importing no_such_pkg_xyz.nets failed"),
    "broken_factory": (["train", "model=custom", f"model.factory={HELPERS}:make_broken_net"],
                       "raised ValueError: this factory is broken on purpose"),
    "refused_layer": (["train", "model=custom", f"model.factory={HELPERS}:make_layernorm_net", "model.head=4",
                       "dataset.ways=3"], "layer '2' (LayerNorm)"),
    "mismatching_state_dict": (["import", "weights={weights}"],
                               "missing keys: body.1.bias, head.bias; unexpected keys: extra.weight"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, digits) -> dict[str, tuple[subprocess.CompletedProcess, Path, str]]:
    """Every bad-input command, started side by side."""
    base = tmp_path_factory.mktemp("own_bad")
    paths = {k: str(v) for k, v in _bad_folders(base, digits).items()}
    from metaif_cli.models.config import ModelConfig
    from metaif_cli.models.networks import build_model

    sd = build_model(ModelConfig(name="mlp", hidden=64, layers=2), (1, 8, 8), 5, 0).state_dict()
    sd = {k: v for k, v in sd.items() if k not in ("body.1.bias", "head.bias")} | {"extra.weight": torch.ones(2)}
    torch.save(sd, base / "bad.pt")
    paths["weights"] = str(base / "bad.pt")
    procs = {}
    for name, (args, fragment) in BAD.items():
        run_dir = base / "runs" / name
        where = f"run_dir={run_dir}" if args[0] == "import" else f"hydra.run.dir={run_dir}"
        argv = [a.format(**paths) for a in args] + ["debug=fast", where]
        procs[name] = (_start(*argv), run_dir, fragment.format(**paths))
    out = {}
    for name, (proc, run_dir, fragment) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), run_dir, fragment)
    return out


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(name, bad_runs):
    proc, run_dir, fragment = bad_runs[name]
    command = proc.args[3]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"metaif {command}: error:"), proc.stderr
    assert fragment in lines[-1], lines[-1]
    assert not run_dir.exists(), sorted(p.name for p in run_dir.rglob("*"))
