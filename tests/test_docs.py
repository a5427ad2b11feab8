"""The documentation: a README a newcomer reads in ten minutes, and docs/ whose links hold.

Checks that README.md stays short, that every relative link (and its ``#anchor``) in README.md
and docs/*.md points at a file and heading that exist, that every ``scripts/results/...`` file
docs/results.md names exists and every table there has a **Source** line under it, and (slow)
that the README's main job runs at ``debug=fast`` size.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
RESULTS = DOCS / "results.md"
MAX_README_LINES = 260

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")
RESULTS_PATH = re.compile(r"scripts/results/[\w.\-/]*[\w]")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            seen.setdefault(base if n == 0 else f"{base}-{n}", 1)
    return set(seen)


def relative_links(path: Path) -> list[tuple[int, str]]:
    links = []
    for i, line in prose_lines(path):
        # a link's text may be code (`[`x`](y)`): drop code spans only outside link targets
        for target in LINK.findall(line) + LINK.findall(CODE_SPAN.sub("", line)):
            if not re.match(r"[a-z]+:", target):
                links.append((i, target))
    return sorted(set(links))


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move reference material to docs/")


def test_readme_keeps_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "pip install -e . && metaif train && metaif score run=$(ls -td outputs/train/*/ | head -1)" in text
    assert "pip install -e '.[test,baselines]' && python -m pytest -q" in text  # what .ci/run runs


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_relative_links_resolve(path: Path):
    broken = []
    for line, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{path.name}:{line}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{path.name}:{line}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "\n".join(broken)


def test_results_name_existing_files():
    text = RESULTS.read_text(encoding="utf-8")
    named = sorted(set(RESULTS_PATH.findall(text)))
    assert named, "docs/results.md names no file of scripts/results/"
    missing = [p for p in named if not (REPO / p).exists()]
    assert not missing, f"docs/results.md names files that do not exist: {missing}"


def test_every_results_table_has_its_source():
    """Under each table of docs/results.md: a **Source:** line naming its file (or saying there is none)."""
    lines = prose_lines(RESULTS)
    missing = []
    for k, (number, line) in enumerate(lines):
        starts_table = line.startswith("|") and (k == 0 or not lines[k - 1][1].startswith("|"))
        if not starts_table:
            continue
        rest = [text for _, text in lines[k:] if text.strip()]
        after = next((text for text in rest if not text.startswith("|")), "")
        if not after.startswith("**Source:**"):
            missing.append(f"results.md:{number}")
    assert not missing, f"tables without a **Source:** line under them: {missing}"


def test_results_figures_live_in_scripts_results():
    for _, line in prose_lines(RESULTS):
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", line):
            assert target.startswith("../scripts/results/"), target


def _main_job(fast: str = "debug=fast") -> str:
    """The README's main job without its install step, each command at ``debug=fast`` size."""
    text = README.read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("pip install -e . && metaif train"))
    parts = [p.strip() for p in line.split("&&")[1:]]
    return " && ".join(f"{p} {fast}" if p.startswith("metaif ") else p for p in parts)


def test_main_job_parses():
    assert _main_job() == ("metaif train debug=fast && "
                           "metaif score run=$(ls -td outputs/train/*/ | head -1) debug=fast")


@pytest.mark.slow
def test_readme_main_job_runs(tmp_path: Path):
    exe = REPO / ".venv" / "bin" / "metaif"
    bindir = exe.parent if exe.exists() else Path(shutil.which("metaif") or sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}")
    res = subprocess.run(["bash", "-c", "set -o pipefail; " + _main_job()], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert list((tmp_path / "outputs" / "score").glob("*/task_scores.csv")), res.stderr[-3000:]
