"""Helpers of the tests that assert a refusal: one line, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaif_cli.errors import MetaifError


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to compare before and after a refusal."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(fn, *args, fragment: str = "", **kw) -> str:
    """Call ``fn``; it must raise a one-line :class:`MetaifError` holding ``fragment``; return its text."""
    with pytest.raises(MetaifError) as exc:
        fn(*args, **kw)
    text = str(exc.value)
    assert "\n" not in text and fragment in text, text
    return text
