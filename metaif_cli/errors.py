"""User-facing errors.

A :class:`MetaifError` is a user mistake or a missing resource (wrong config value,
missing dataset, incomplete run directory). The command layer prints its message as
one line, without a traceback, and exits with status 2. Its message must say what to fix.
Faults of the operating system (disk full, read-only or unreadable folder, a name over the
system's limit, memory exhausted) become one too (:func:`system_error`), naming the file.
"""

from __future__ import annotations

import errno

INTERRUPTED_EXIT = 130  # Ctrl-C, as a shell reports SIGINT


class MetaifError(Exception):
    """An error the user can fix; the message says how."""


FIXES = {
    errno.ENOSPC: "the disk is full: free space or choose another folder (hydra.run.dir)",
    errno.EDQUOT: "your disk quota is used up: free space or choose another folder (hydra.run.dir)",
    errno.EROFS: "the file system is read-only: choose a writable folder (hydra.run.dir)",
    errno.EACCES: "you lack the permission: fix the folder's permissions or choose another (hydra.run.dir, "
                  "data.root)",
    errno.EPERM: "the operation is not permitted: fix the permissions or choose another folder",
    errno.ENAMETOOLONG: "the name is over the system's limit: choose a shorter hydra.run.dir or run name",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EISDIR: "it is a folder, not a file: fix the path",
    errno.ENOENT: "it does not exist: fix the path",
}


def os_error(exc: OSError, path: object = None) -> MetaifError:
    """One line for an operating-system fault: ``<what>: <file>; <fix>``."""
    name = path if path is not None else (exc.filename if exc.filename is not None else "?")
    why = exc.strerror or type(exc).__name__
    return MetaifError(f"{why}: {name}; {FIXES.get(exc.errno, 'check the path, the disk and the permissions')}")


def system_error(exc: BaseException) -> MetaifError | None:
    """The one-line :class:`MetaifError` for an operating-system fault or exhausted memory, else None
    (also when the fault is the cause of another error, as of logging's "Unable to configure handler")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return os_error(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        return MetaifError(f"out of memory ({type(exc).__name__}: {text[:120]}); the work does not fit: lower "
                           "model.hidden, optim.meta_batch_size, chunk or hessian.num_tasks")
    return None
