"""Helpers for the tests of flags derived from config dataclasses (common/flags.py): a value other than its
default for every setting, and the entries of a --help text."""

from __future__ import annotations

import dataclasses
import re
import types
import typing


def changed_settings(cls: type) -> dict:
    """Every setting of `cls` at a value that is not its default (nested configs as instances)."""
    hints, out = typing.get_type_hints(cls), {}
    for i, f in enumerate(f for f in dataclasses.fields(cls) if f.init):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out[f.name] = hint(**changed_settings(hint))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(hint, types.UnionType):  # int | None -> int
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = typing.get_origin(hint) or hint  # list[str] -> list
        if f.metadata.get("choices"):
            out[f.name] = [c for c in f.metadata["choices"] if c != default][-1]
        elif kind is bool:
            out[f.name] = False if default is None else not default  # None: the explicit --no-x
        elif kind is list:
            out[f.name] = [f"{f.name}-a", f"{f.name}-b"]
        elif kind is int:
            out[f.name] = (default or 0) + 7 + i
        elif kind is float:
            out[f.name] = (default or 0) + 0.25 + i
        else:
            out[f.name] = f"{f.name}-x"
        assert out[f.name] != default, f.name
    return out


def help_entries(text: str) -> dict[str, str]:
    """--help output -> {an entry's first option string (or positional's name): the entry, on one line}."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if re.match(r"  \S", line):  # an entry starts: "  --flag VALUE   help ..."
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("   "):  # its help goes on
            entries[current] += " " + line
        else:
            current = None
    return {key: " ".join(entry.split()) for key, entry in entries.items()}
