"""One command at a time per output folder, and no command writing into another's folder
(no method section: plumbing of the run directory, STYLE "the run directory is the interface").

:func:`owned_dir` holds an advisory lock (``fcntl.flock`` on ``<folder>/.metaif.lock``) while
a command reads, checks and writes a folder. A second command on the same folder waits
until the first is done (saying who holds it), then makes its own checks against what the
first wrote: two ``metaif score`` with different settings into one folder never interleave
their files, and identical commands still both succeed. Shards of one scoring
(``shard=i/k``) share the lock; any other command needs it alone. The lock file is removed
on release (its inode is checked after locking, so a waiter that locked a removed file
tries again).

:func:`check_foreign` refuses a folder that holds another command's artefacts (``metaif
score`` into the training run's own folder would replace its ``.hydra/``).
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError

log = logging.getLogger(__name__)

LOCK_NAME = ".metaif.lock"

# the file that marks a folder as written by each command
MARKERS = {"train": (C.TRAIN_CONFIG_JSON, C.MODEL_PT), "score": (C.SCORE_SETTINGS_JSON, C.SCORE_JSON),
           "prune-and-retrain": (C.PRUNE_CONFIG_JSON,)}
MARKERS["import"] = MARKERS["train"]


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "another metaif command"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def acquire(folder: Path, command: str, shared: bool = False, wait: bool = True) -> int:
    """Lock ``folder`` for ``command``; return the lock's file descriptor (see :func:`release`).

    ``wait=False``: refuse at once (one line naming the holder) instead of waiting.
    """
    path = folder / LOCK_NAME
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    raise MetaifError(f"{folder} is in use by {holder}; wait for it to finish, or choose another "
                                      "hydra.run.dir") from None
                if not told:
                    log.warning("%s is in use by %s; waiting for it to finish (Ctrl-C to stop)", folder, holder)
                    told = True
                fcntl.flock(fd, mode)
            if not _same_file(fd, path):  # the holder removed the file as it released it: lock the new one
                os.close(fd)
                continue
        except BaseException:
            os.close(fd)
            raise
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"metaif {command} (pid {os.getpid()})".encode(), 0)
        return fd


def release(folder: Path, fd: int) -> None:
    """Remove the lock file when no other holder shares it, then unlock."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a shard alone (or an exclusive holder)
        except BlockingIOError:
            return  # other shards still hold it: the last one removes it
        if _same_file(fd, folder / LOCK_NAME):
            os.unlink(folder / LOCK_NAME)
    finally:
        os.close(fd)


@contextmanager
def owned_dir(folder: str | os.PathLike, command: str, shared: bool = False, wait: bool = True) -> Iterator[Path]:
    """Hold ``folder`` for ``command`` for the duration of the block.

    The folder (and its missing parents) is created if absent, and removed again on exit if
    it is still empty (a refused command leaves nothing behind).
    """
    folder = Path(folder)
    created = []  # the folders made here, innermost first
    probe = folder.absolute()
    while not probe.exists() and probe.parent != probe:
        created.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = acquire(folder, command, shared, wait)
    try:
        yield folder
    finally:
        release(folder, fd)
        for made in created:  # a refused command leaves no empty folder behind
            try:
                made.rmdir()  # only when empty
            except OSError:
                break


def check_foreign(folder: Path, command: str, run_dir: Path | None = None) -> None:
    """Refuse ``folder`` when it is the run ``command`` reads, or holds another command's artefacts."""
    if run_dir is not None and folder.resolve() == run_dir.resolve():
        raise MetaifError(f"hydra.run.dir={folder} is the training run itself; metaif {command} writes into its own "
                          "folder: leave hydra.run.dir out, or choose another")
    if not folder.is_dir():
        return
    mine = set(MARKERS.get(command, ()))
    for other, names in MARKERS.items():
        found = [n for n in names if n not in mine and (folder / n).exists()]
        if found and other != command and not (set(names) <= mine):
            raise MetaifError(f"{folder} holds the output of metaif {other} ({found[0]}); metaif {command} "
                              "would mix its files with it: choose another hydra.run.dir")
