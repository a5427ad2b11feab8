"""The names of a command's settings, for the hints of :mod:`metaif_cli.hydra_app` (no method section:
plumbing): every dotted setting of a config dataclass, whether a name is one, and the closest
one to a mistyped name (``datset`` -> ``dataset``, ``optim.stepz`` -> ``optim.steps``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any


def setting_names(schema: type, prefix: str = "") -> list[str]:
    """Dotted names of every setting of a config dataclass (``optim.steps``), sections included."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        out.append(name)
        kind = hints.get(f.name)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            out += setting_names(kind, f"{name}.")
    return out


def known_setting(schema: type, key: str) -> bool:
    """Whether ``key`` (dotted) names a setting of ``schema``; anything below a dict or untyped setting is."""
    node: Any = schema
    for part in key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return node is Any or node is dict or typing.get_origin(node) is dict
        if part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = typing.get_type_hints(node)[part]
        if typing.get_origin(node) is typing.Union:  # Optional[X]
            node = next(a for a in typing.get_args(node) if a is not type(None))
    return True


def closest(key: str, schema: type | None, groups: list[str]) -> str:
    """`` (did you mean dataset=?)`` naming the setting or group closest to ``key``, else ``""``."""
    names = (setting_names(schema) if schema is not None else []) + list(groups)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}=?)" if close else ""
