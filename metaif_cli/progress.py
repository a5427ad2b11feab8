"""Progress bars and log lines that read cleanly in a terminal and in a log file (no SPEC section: plumbing).

- A bar is drawn only on a terminal (tqdm's ``disable=None``): a run whose stderr goes to
  a file or a pipe gets no carriage returns in it, only the log lines.
- :func:`redirect_logging` sends console log records through ``tqdm.write`` while the
  command runs, so a log line never lands on a bar's line (Hydra's ``.log`` file handler
  is left alone).
- :func:`finish` ends a bar whose loop stopped early (a solver that converged in 20 of
  100 allowed steps) at 100%, not at "20%".
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm


def bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar shown only when ``enabled`` and stderr is a terminal."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)


def finish(progress: tqdm) -> None:
    """Close ``progress``; a loop that stopped before ``total`` (converged) ends at 100%."""
    if progress.total is not None and progress.n < progress.total:
        progress.total = progress.n
        progress.refresh()
    progress.close()


@contextlib.contextmanager
def redirect_logging() -> Iterator[None]:
    """Console log records go through ``tqdm.write`` (above any bar) inside this block."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


def load_jvp_decompositions() -> None:
    """Import torch's forward-mode decompositions now, without the ``torch.jit.script``
    deprecation warning torch itself raises on its first ``jvp`` (torch 2.14).

    The warning comes from torch's own module, not from anything metaif could change;
    silenced here for that one import only, so every ``metaif score`` prints no warning.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
        import torch.autograd.forward_ad as fwad

        loader = getattr(fwad, "_maybe_load_decompositions", None)
        if loader is not None:
            loader()
