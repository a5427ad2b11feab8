"""Issue 13, item 11: a non-editable install ships its Hydra configs.

The wheel built from the checkout (``pip wheel .``) holds every file of ``conf/`` as the
package ``metaif_cli.conf``; unpacked outside the checkout (a pure-Python wheel installs
by unpacking), it runs ``metaif train debug=fast`` from another folder. ``.ci/run`` does
the same with a real ``pip install`` into a fresh virtual environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # build from a copy of the sources: an in-tree build/ would keep stale modules of earlier builds
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("conf", "metaif_cli"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(out), str(src)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path_factory.mktemp("cwd"))
    assert res.returncode == 0, res.stderr
    (whl,) = out.glob("metaif-*.whl")
    return whl


def test_packaging_wheel_ships_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    shipped = {n.removeprefix("metaif_cli/conf/") for n in names if n.startswith("metaif_cli/conf/")}
    assert source and shipped == source
    assert (REPO / "conf" / "train.yaml").is_file()  # conf/ stays at the top of the repository


def test_packaging_installed_wheel_runs_train_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, "-c", "import metaif_cli.hydra_app as c; print(c.__file__); print(c.CONF_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    module, conf = probe.stdout.split()
    assert Path(module).is_relative_to(site) and Path(conf) == site / "metaif_cli" / "conf", probe.stdout
    res = subprocess.run([sys.executable, "-m", "metaif_cli.cli", "train", "debug=fast", "hydra.run.dir=run"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert (elsewhere / "run" / "model.pt").is_file() and (elsewhere / "run" / "results.json").is_file()


def test_packaging_checkout_uses_top_level_conf():
    from metaif_cli.hydra_app import CONF_DIR

    assert Path(CONF_DIR) == REPO / "conf"
