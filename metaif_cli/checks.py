"""Value checks shared by the typed configs' ``__post_init__`` (every SPEC section's settings).

Each check raises :class:`~metaif_cli.errors.MetaifError` with the fix in the message.
"""

from __future__ import annotations

from typing import Any

from metaif_cli.errors import MetaifError


def choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    """``value`` must be one of ``options``."""
    if value not in options:
        raise MetaifError(f"{name}={value!r} is not valid; choose one of: {', '.join(options)}")


def positive(name: str, value: float, allow_zero: bool = False) -> None:
    """``value`` must be > 0 (or >= 0 with ``allow_zero``)."""
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise MetaifError(f"{name}={value} is not valid; it must be {bound}")


def fraction(name: str, value: float) -> None:
    """``value`` must lie in ``[0, 1)``."""
    if not 0.0 <= value < 1.0:
        raise MetaifError(f"{name}={value} is not valid; it must be in [0, 1)")
