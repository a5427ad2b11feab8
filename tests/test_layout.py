"""The package layout (docs/design.md): imports flow down the layers, no cycles, no borrowed
private names, Hydra only in the command layer, a docstring naming the job and the sections of docs/method.md it implements
atop every module, no file over 300 lines.

The checker parses every ``import`` in ``metaif_cli/`` with :mod:`ast`, function-level and
``TYPE_CHECKING`` imports included; it is itself tested on small synthetic graphs below, so a
violation cannot pass unnoticed.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "metaif_cli"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 300

# Top-level name under metaif_cli/ -> layer; a module may import its own layer or lower ones.
LAYERS: dict[str, int] = {
    # base
    "__init__": 0, "errors": 0, "io": 0, "constants": 0, "checks": 0, "hydra_app": 0, "hydra_rundir": 0, "progress": 0, "canonical": 0,
    "ownership": 0, "fingerprint": 0, "settings_names": 0,
    # core: never reads a Hydra config or a run directory
    "data": 1, "models": 1, "meta": 1, "influence": 1, "reports": 1,
    # command packages
    "train": 2,
    "score": 3,
    "prune": 4,
    "importer": 5,
    # the dispatcher and the Python API
    "cli": 6, "api": 6,
}
CORE = 1
BASE_NO_SPEC = {"__init__", "errors", "io", "hydra_app", "hydra_rundir", "checks", "progress", "canonical", "ownership", "fingerprint",
                "settings_names"}  # plumbing: no method section to cite
HYDRA_MODULES = ("hydra", "omegaconf", f"{PACKAGE}.hydra_app", f"{PACKAGE}.hydra_rundir")
# The run directory's file names: a core module importing them would be reading a run directory.
CORE_FORBIDDEN = HYDRA_MODULES + (f"{PACKAGE}.constants",)


@dataclass(frozen=True)
class Edge:
    """``src`` imports ``dst`` (a module), optionally the name ``name`` from it, at ``line``."""

    src: str
    dst: str
    name: str | None
    line: int


def module_name(path: Path, root: Path, package: str) -> str:
    """``root/a/b.py`` -> ``package.a.b``; ``root/a/__init__.py`` -> ``package.a``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def parse_package(root: Path, package: str = PACKAGE) -> tuple[dict[str, list[Edge]], dict[str, Path]]:
    """Every import edge of every module under ``root`` (all of them, not only the top-level ones)."""
    files = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    edges: dict[str, list[Edge]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        out: list[Edge] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [Edge(mod, alias.name, None, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in files:  # ``from pkg import module``
                        out.append(Edge(mod, sub, None, node.lineno))
                    else:
                        out.append(Edge(mod, base, alias.name, node.lineno))
        edges[mod] = out
    return edges, files


def layer_of(module: str, layers: dict[str, int], package: str = PACKAGE) -> int | None:
    """The layer of a module of ``package`` (None for an outside module)."""
    parts = module.split(".")
    if parts[0] != package:
        return None
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in layers:
        raise KeyError(f"{module}: {top!r} has no layer; add it to LAYERS in tests/test_layout.py and to the "
                       "docs/design.md")
    return layers[top]


def upward_imports(edges: dict[str, list[Edge]], layers: dict[str, int], package: str = PACKAGE) -> list[str]:
    """Imports of a higher layer than the importer's."""
    bad = []
    for mod, out in edges.items():
        own = layer_of(mod, layers, package)
        for e in out:
            other = layer_of(e.dst, layers, package)
            if other is not None and other > own:
                bad.append(f"{mod}:{e.line} imports {e.dst} (layer {other} above {own})")
    return bad


def private_imports(edges: dict[str, list[Edge]], package: str = PACKAGE) -> list[str]:
    """``from package.x import _name`` in another module than ``package.x``."""
    return [f"{mod}:{e.line} imports the private name {e.name} of {e.dst}"
            for mod, out in edges.items() for e in out
            if e.name and e.name.startswith("_") and not e.name.startswith("__")
            and e.dst.split(".")[0] == package and e.dst != mod]


def forbidden_in_core(edges: dict[str, list[Edge]], layers: dict[str, int], core: int = CORE,
                      forbidden: tuple[str, ...] = CORE_FORBIDDEN, package: str = PACKAGE) -> list[str]:
    """Core modules importing Hydra, OmegaConf, the Hydra glue or the run directory's file names."""
    return [f"{mod}:{e.line} imports {e.dst}" for mod, out in edges.items() if layer_of(mod, layers, package) == core
            for e in out if any(e.dst == f or e.dst.startswith(f + ".") for f in forbidden)]


def cycles(edges: dict[str, list[Edge]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), by Tarjan."""
    graph = {m: sorted({e.dst for e in out if e.dst in edges}) for m, out in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


# ----------------------------------------------------------------------------- the real package


@pytest.fixture(scope="module")
def package():
    return parse_package(ROOT)


def test_every_module_has_a_layer(package):
    edges, _ = package
    for mod in edges:
        layer_of(mod, LAYERS)


def test_imports_flow_down(package):
    assert upward_imports(package[0], LAYERS) == []


def test_no_import_cycles(package):
    assert cycles(package[0]) == []


def test_no_private_names_across_modules(package):
    assert private_imports(package[0]) == []


def test_core_reads_no_hydra_config_or_run_directory(package):
    assert forbidden_in_core(package[0], LAYERS) == []


def test_hydra_only_in_the_command_layer(package):
    edges, _ = package
    allowed = lambda mod: mod.endswith(".command") or mod in (f"{PACKAGE}.cli", f"{PACKAGE}.hydra_app", f"{PACKAGE}.hydra_rundir")  # noqa: E731
    bad = [f"{mod}:{e.line} imports {e.dst}" for mod, out in edges.items() if not allowed(mod) for e in out
           if any(e.dst == f or e.dst.startswith(f + ".") for f in HYDRA_MODULES)]
    assert bad == []


def test_docstrings_name_job_and_spec_sections(package):
    _, files = package
    missing = []
    for mod, path in files.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        top = mod.split(".")[1] if "." in mod else "__init__"
        if not doc:
            missing.append(f"{mod}: no module docstring")
        elif not re.search(r"method\s+§", doc) and top not in BASE_NO_SPEC:
            missing.append(f"{mod}: the docstring names no section of docs/method.md (method §N)")
    assert missing == []


def test_no_file_over_max_lines(package):
    _, files = package
    long = {mod: n for mod, path in files.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


# ----------------------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_checker_finds_violations_in_a_synthetic_package(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": '"""p."""\n',
        "errors.py": '"""e."""\n',
        "core/__init__.py": '"""c."""\n',
        "core/a.py": '"""a."""\nfrom pkg.core import b\n\ndef f():\n    from pkg.cmd.run import go  # upward, in a function\n',
        "core/b.py": '"""b."""\nfrom . import a\nfrom pkg.core.c import _helper\n',
        "core/c.py": '"""c."""\nimport hydra\n\ndef _helper():\n    pass\n',
        "cmd/__init__.py": '"""cmd."""\n',
        "cmd/run.py": '"""run."""\nfrom pkg.core.a import f\nfrom pkg.errors import Err\n',
    })
    layers = {"__init__": 0, "errors": 0, "core": 1, "cmd": 2}
    edges, _ = parse_package(root, "pkg")
    assert Edge("pkg.core.b", "pkg.core.a", None, 2) in edges["pkg.core.b"]  # relative import resolved
    assert upward_imports(edges, layers, "pkg") == ["pkg.core.a:5 imports pkg.cmd.run (layer 2 above 1)"]
    assert sorted(map(sorted, cycles(edges))) == [["pkg.cmd.run", "pkg.core.a", "pkg.core.b"]]
    assert private_imports(edges, "pkg") == ["pkg.core.b:3 imports the private name _helper of pkg.core.c"]
    assert forbidden_in_core(edges, layers, 1, ("hydra",), "pkg") == ["pkg.core.c:2 imports hydra"]
    with pytest.raises(KeyError, match="has no layer"):
        layer_of("pkg.newthing", layers, "pkg")


def test_checker_passes_a_clean_synthetic_package(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": '"""p."""\n',
        "core/__init__.py": '"""c."""\n',
        "core/a.py": '"""a."""\nimport torch\n',
        "core/b.py": '"""b."""\nfrom pkg.core.a import helper\n',
        "cmd/run.py": '"""run."""\nfrom pkg.core import a, b\n',
    })
    edges, _ = parse_package(root, "pkg")
    layers = {"__init__": 0, "core": 1, "cmd": 2}
    assert upward_imports(edges, layers, "pkg") == []
    assert cycles(edges) == []
    assert private_imports(edges, "pkg") == []


# ----------------------------------------------------------------------------- citations of the method

METHOD_MD = ROOT.parent / "docs" / "method.md"


def method_sections() -> tuple[set[str], set[str]]:
    """Section numbers (``2``, ``7.1``) and equation numbers (``3.3``) of docs/method.md."""
    import re

    text = METHOD_MD.read_text()
    sections = set(re.findall(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", text, re.M))
    equations = set(re.findall(r"^\s*\((\d+\.\d+)\)", text, re.M))
    return sections, equations


def test_every_method_citation_resolves():
    """Every ``method §N``/``§N.k``/``§N-M`` and ``method (N.k)`` in the package names a section or
    an equation that docs/method.md has (the code cites the project's own method document)."""
    import re

    sections, equations = method_sections()
    assert {"1", "2", "3", "4", "5", "6", "7", "7.2", "8.5"} <= sections and "3.3" in equations
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"§(\d+(?:\.\d+)?)(?:-(\d+))?", text):
            for ref in filter(None, m.groups()):
                if ref not in sections:
                    bad.append(f"{path.name}: §{ref}")
        for m in re.finditer(r"method\s+\((\d+\.\d+)\)", text):
            if m.group(1) not in equations:
                bad.append(f"{path.name}: ({m.group(1)})")
    assert bad == []
