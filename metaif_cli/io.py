"""Atomic writes and checked reads of run-directory artefacts.

Every artefact is written to ``.NAME.metaif-<pid>-<8 hex>.tmp`` beside its final name, flushed
and renamed onto it: a crash, a kill or Ctrl-C never leaves a half-written file under
its final name (STYLE, "the run directory is the interface between commands"). Files
get the usual mode (``0666`` less the umask), like any file a program creates.
Temporaries left by a killed process are removed by the next write of the same name
and by :func:`clean_stale_temporaries`; only names of that exact pattern, with its ``metaif-``
marker and the id of a process no longer running, are ever removed (a user's own ``*.tmp``
files are left alone). ``.pt`` files are serialised in memory first,
in canonical form, so their bytes do not depend on the temporary name, nor on whether a run
was resumed: equal content gives identical files.

Reads of another command's artefacts go through :func:`load_torch`, :func:`load_json`
and :func:`read_csv`: a missing, truncated or damaged file ends in one
:class:`MetaifError` line naming the file and what to do, never a decoder traceback.
``torch.load`` always runs with ``weights_only=True``, so opening a run directory cannot
execute code.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from metaif_cli.canonical import canonical
from metaif_cli.errors import MetaifError, os_error

TMP_MARKER = "metaif"  # in every temporary's name: only files with it are ever cleaned up
_TMP_RE = re.compile(rf"^\.(?P<name>.+)\.{TMP_MARKER}-(?P<pid>\d+)-[0-9a-f]{{8}}\.tmp$")


def resolved_path(text: str | os.PathLike) -> str:
    """``text`` as an absolute path without ``~``, ``$VAR``, ``..`` or a trailing slash: how settings
    that name files are compared (``run=out/x``, ``run=./out/x/`` and its absolute path are one run)."""
    return str(Path(os.path.expandvars(str(text))).expanduser().resolve())


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{TMP_MARKER}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


_WRITING: set[str] = set()  # temporaries this process is writing now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(tmp: Path, name: str | None = None) -> bool:
    """A temporary of ours (of ``name`` if given) whose writer is no longer running."""
    m = _TMP_RE.match(tmp.name)
    if m is None or (name is not None and m.group("name") != name):
        return False
    pid = m.group("pid")
    if int(pid) == os.getpid():  # ours: stale unless being written now (left by an interrupted write)
        return str(tmp) not in _WRITING
    return not _alive(int(pid))


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink()
    except OSError:  # already gone, or the folder went read-only: nothing of ours to keep
        pass


def clean_stale_temporaries(directory: str | os.PathLike, recursive: bool = True) -> int:
    """Remove metaif's temporaries (``.NAME.metaif-<pid>-<hex>.tmp``) left in ``directory`` by killed
    writers; return how many. Any other file, a user's ``*.tmp`` included, is left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    pattern = f".*.{TMP_MARKER}-*.tmp"
    found = directory.rglob(pattern) if recursive else directory.glob(pattern)
    removed = 0
    for tmp in found:
        if tmp.is_file() and not tmp.is_symlink() and _is_stale(tmp):
            _discard(tmp)
            removed += 1
    return removed


def _replace(src: Path, dst: Path) -> None:
    """The rename that publishes a file (a seam for tests that inject a kill here)."""
    os.replace(src, dst)


def rotate(path: str | os.PathLike, older: str | os.PathLike) -> None:
    """Rename ``path`` onto ``older`` (keeping the previous version of a file); no-op when absent."""
    path = Path(path)
    if path.exists():
        _replace(path, Path(older))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary is created empty with the usual mode, so whatever writes it keeps that
    mode; stale temporaries of the same name are removed first.
    """
    path = Path(path)
    tmp = _tmp_path(path)
    try:  # disk full, read-only folder, a name over the limit: one line naming the file (errors.os_error)
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f".{glob_escape(path.name)}.{TMP_MARKER}-*.tmp"):
            if _is_stale(old, path.name):
                _discard(old)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise os_error(exc, path) from None
    _WRITING.add(str(tmp))
    try:
        yield tmp
        _replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise os_error(exc, path) from None
    except BaseException:
        _discard(tmp)
        raise
    finally:
        _WRITING.discard(str(tmp))


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def write_bytes(data: bytes, path: str | os.PathLike, keep_previous: str | os.PathLike | None = None) -> None:
    """Write ``data`` atomically (flushed to disk before the rename).

    ``keep_previous``: once the new content is on disk, the current file (if any) is renamed
    to this name before the new one takes its place, so a good previous version survives.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None:
            rotate(path, keep_previous)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write UTF-8 ``text`` atomically."""
    write_bytes(text.encode("utf-8"), path)


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes: equal content gives the same bytes, whatever the file name and
    however the object was built (:func:`metaif_cli.canonical.canonical`)."""
    buf = io.BytesIO()
    torch.save(canonical(obj), buf)
    return buf.getvalue()


def save_torch(obj: Any, path: str | os.PathLike, keep_previous: str | os.PathLike | None = None) -> None:
    """``torch.save`` atomically; the bytes do not depend on the (temporary) file name.

    ``keep_previous``: see :func:`write_bytes`.
    """
    write_bytes(torch_bytes(obj), path, keep_previous)


def save_csv(frame, path: str | os.PathLike) -> None:
    """Write a pandas DataFrame as CSV without its index, atomically."""
    write_text(frame.to_csv(index=False, lineterminator="\n"), path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    write_bytes(buf.getvalue(), path)


# ---------------------------------------------------------------------------- checked reads


def unreadable(path: str | os.PathLike, fix: str, exc: BaseException | None = None) -> MetaifError:
    """The one-line error for a damaged file: ``corrupt or unreadable: <file> (<why>); <fix>``."""
    why = ""
    if exc is not None:
        text = " ".join(str(exc).split())[:160]
        why = f" ({type(exc).__name__}: {text})" if text else f" ({type(exc).__name__})"
    return MetaifError(f"corrupt or unreadable: {path}{why}; {fix}")


def _require(path: Path, fix: str) -> None:
    if not path.is_file():
        raise MetaifError(f"missing: {path}; {fix}")


def load_torch(path: str | os.PathLike, fix: str, keys: Iterable[str] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, or one line naming the file and ``fix``.

    Args:
        path: the ``.pt`` file.
        fix: what the user should do when it is missing or damaged (e.g. "rerun metaif train ...").
        keys: keys the loaded dict must hold.
    """
    path = Path(path)
    _require(path, fix)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle opcode, disallowed global, I/O error...
        raise unreadable(path, fix, exc) from exc
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise unreadable(path, fix, KeyError(f"lacks {', '.join(missing)}"))
    return obj


def load_json(path: str | os.PathLike, fix: str = "rerun the command that wrote it",
              keys: Iterable[str] = ()) -> Any:
    """Read a JSON file, or one line naming the file and ``fix``."""
    path = Path(path)
    _require(path, fix)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise unreadable(path, fix, exc) from exc
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise unreadable(path, fix, KeyError(f"lacks {', '.join(missing)}"))
    return obj


def read_csv(path: str | os.PathLike, fix: str, columns: Iterable[str] = (), rows: int | None = None,
             complete: Iterable[str] | None = None):
    """Read a CSV written by metaif, checking it was not truncated or damaged.

    Args:
        path: the file.
        fix: what to do when it is missing or damaged.
        columns: columns it must have.
        rows: the number of rows it must have (``None``: any).
        complete: columns that may hold no missing value (default: ``columns``). A file cut
            inside its last line parses with empty trailing fields; this catches it.
    """
    import pandas as pd

    path = Path(path)
    _require(path, fix)
    try:
        raw = path.read_bytes()
        frame = pd.read_csv(io.BytesIO(raw))
    except Exception as exc:  # ParserError, UnicodeDecodeError, EmptyDataError, OSError
        raise unreadable(path, fix, exc) from exc
    columns = list(columns)
    lacking = [c for c in columns if c not in frame.columns]
    if lacking:
        raise unreadable(path, fix, KeyError(f"lacks column(s) {', '.join(lacking)}"))
    if raw and not raw.endswith(b"\n"):
        raise unreadable(path, fix, ValueError("truncated: the last line is incomplete"))
    if rows is not None and len(frame) != rows:
        raise unreadable(path, fix, ValueError(f"truncated or padded: {len(frame)} rows, expected {rows}"))
    check = columns if complete is None else list(complete)
    if check and frame[check].isna().any().any():
        bad = int(frame[check].isna().any(axis=1).to_numpy().argmax())
        raise unreadable(path, fix, ValueError(f"row {bad + 1} has empty fields"))
    return frame
