"""Progress bars and log lines that read cleanly in a terminal and in a log file (no method section: plumbing).

- On a terminal, a tqdm bar as usual.
- Elsewhere (stderr sent to a file, a pipe, ``nohup``, SLURM, ``| tee``) no bar and no carriage
  return: a :class:`LogBar` logs one line through :mod:`logging` at most every
  :data:`LOG_EVERY_SECONDS` (``meta-train 1200/2000 (60%) loss=0.532 | 3.2 it/s, 4m10s left``),
  so a cluster log shows that a long run is alive, what it is doing and when it will end.
- :func:`redirect_logging` sends console log records through ``tqdm.write`` while the
  command runs, so a log line never lands on a bar's line (Hydra's ``.log`` file handler
  is left alone).
- :func:`finish` ends a bar whose loop stopped early (a solver that converged in 20 of
  100 allowed steps) at 100%, not at "20%".
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger("metaif.progress")

# Off a terminal, a bar logs a line at most this often (seconds): often enough that a cluster
# log shows a run is alive, rarely enough that a 6-hour run writes a few hundred lines.
LOG_EVERY_SECONDS = 30.0


class _Discard:
    """A file that drops what a :class:`LogBar` would draw (it logs instead)."""

    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class LogBar(tqdm):
    """A tqdm bar that, instead of drawing, logs a line at most every ``log_every`` seconds."""

    def __init__(self, *args: Any, log_every: float | None = None, **kwargs: Any) -> None:
        self.log_every = LOG_EVERY_SECONDS if log_every is None else log_every
        self._last_logged: float | None = None
        kwargs.update(file=_Discard(), disable=False)
        super().__init__(*args, **kwargs)
        self._last_logged = self.start_t

    def line(self) -> str:
        """``desc n/total (pct%) postfix | rate, time left``."""
        d = self.format_dict
        n, total, elapsed = d["n"], d["total"], d["elapsed"]
        rate = (n - self.initial) / elapsed if elapsed > 0 else None  # this session's rate (a resumed run too)
        head = f"{d['prefix'] or 'progress'} {n:g}" + (f"/{total:g} ({100 * n / total:.0f}%)" if total else "")
        if d.get("postfix"):
            head += f" {d['postfix']}"
        unit = d.get("unit") or "it"
        tail = []
        if rate:
            tail.append(f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}")
            if total:
                tail.append(f"{_duration(max(total - n, 0) / rate)} left")
        tail.append(f"{_duration(elapsed)} elapsed")
        return head + " | " + ", ".join(tail)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self._last_logged is None:  # tqdm's first draw, from __init__
            return True
        now = self._time()
        if now - self._last_logged < self.log_every:
            return True
        self._last_logged = now
        log.info("%s", self.line())
        return True


def _on_terminal(kwargs: dict) -> bool:
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal, a :class:`LogBar` elsewhere; nothing at all unless ``enabled``."""
    kwargs.setdefault("dynamic_ncols", True)
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if _on_terminal(kwargs):
        return tqdm(iterable, **kwargs)
    kwargs.pop("dynamic_ncols")
    return LogBar(iterable, **kwargs)


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
