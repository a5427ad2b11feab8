"""Value checks shared by the typed configs' ``__post_init__`` (every method section's settings).

Each check raises :class:`~metaif_cli.errors.MetaifError` with the fix in the message. Every
numeric check is written so that NaN and infinity fail it (``not value > 0`` rather than
``value <= 0``: every comparison with NaN is false), and integer settings must be whole
numbers (a bool is not one). :func:`differing_keys` names what differs between saved and
current settings, for the commands that refuse to mix them.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any, Sequence

from metaif_cli.errors import MetaifError


def choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    """``value`` must be one of ``options``."""
    if value not in options:
        raise MetaifError(f"{name}={value!r} is not valid; choose one of: {', '.join(options)}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetaifError(f"{name}={value!r} is not valid; it must be a number")
    if not math.isfinite(value):
        raise MetaifError(f"{name}={value} is not valid; it must be a finite number")
    return value


def finite(name: str, value: Any) -> None:
    """``value`` must be a finite number (not NaN, not +-inf)."""
    _number(name, value)


def positive(name: str, value: Any, allow_zero: bool = False) -> None:
    """``value`` must be finite and > 0 (or >= 0 with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    if value is None:
        raise MetaifError(f"{name}=None is not valid; it must be a finite number {bound}")
    _number(name, value)
    if not (value > 0 or (allow_zero and value == 0)):
        raise MetaifError(f"{name}={value} is not valid; it must be {bound}")


def in_range(name: str, value: Any, low: float | None = None, high: float | None = None,
             low_open: bool = False, high_open: bool = False) -> None:
    """``value`` must be finite and within ``[low, high]`` (open ends with ``low_open``/``high_open``)."""
    _number(name, value)
    ok = True
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise MetaifError(f"{name}={value} is not valid; it must be {' and '.join(p for p in (lo, hi) if p)}")


def fraction(name: str, value: Any) -> None:
    """``value`` must lie in ``[0, 1)``."""
    in_range(name, value, 0.0, 1.0, high_open=True)


def integer(name: str, value: Any, minimum: int | None = None) -> None:
    """``value`` must be a whole number, ``>= minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MetaifError(f"{name}={value!r} is not valid; it must be a whole number")
    if minimum is not None and value < minimum:
        raise MetaifError(f"{name}={value} is not valid; it must be >= {minimum}")


def non_empty(name: str, values: Sequence[Any], example: str) -> None:
    """A list setting must name at least one item (``example`` shows one)."""
    if values is None or len(values) == 0:
        raise MetaifError(f"{name} is empty; give at least one item, e.g. {name}={example}")


def at_most(name: str, value: int, limit: int, what: str, fix: str) -> None:
    """``value`` must not exceed ``limit`` (``what``: what the limit counts; ``fix``: what to do)."""
    if value > limit:
        raise MetaifError(f"{name}={value} exceeds {what} ({limit}); {fix}")


def differing_keys(have: dict, want: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings whose values differ between two nested dicts, sorted."""
    out = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``; total memory where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: never refuse on memory


def free_disk(path: str | os.PathLike) -> int:
    """Bytes free on the file system holding ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62  # unknown: never refuse on disk


def gib(nbytes: float) -> str:
    """``nbytes`` in GiB for a message (``1.5e+03 GiB`` for absurd sizes)."""
    value = nbytes / 2**30
    return f"{value:.3g} GiB"


def fits(what: str, need: float, have: int, where: str, fix: str) -> None:
    """Refuse work whose estimated ``need`` (bytes) exceeds ``have`` (``where``: memory or disk)."""
    if need > have:
        raise MetaifError(f"{what} would need about {gib(need)} of {where}, and {gib(have)} is available; {fix}")
