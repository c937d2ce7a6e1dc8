"""Command-line flags derived from a config dataclass, so that a setting and its default are written once.

Each field that is a setting carries its help (and any aliases or choices) in its metadata (`setting`).
`add_flags` turns the fields into argparse flags, `settings_from_args` reads the parsed values back, and
`settings_argv` turns settings into a command line that parses back to the same values (the engines that
`nanoserve up` starts, the containers the operator renders). Fields with init=False are derived, not set.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    unset: str | None = None,
    flags: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a flag. `unset`: what a default of None means, for --help ("cuda when
    available"); `flags`: its option strings, the canonical one first (default: --field-name); `factory` in
    place of a mutable default."""
    meta = {"help": help, "unset": unset, "flags": flags, "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless the help already says it (what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        return help if "(default:" in help else super()._get_help_string(action) or ""


def add_flags(
    parser: argparse.ArgumentParser, cls: type, only: Iterable[str] | None = None, defaults: dict | None = None
) -> None:
    """One flag per setting of `cls` (or of those named in `only`); nested config dataclasses are flattened.
    `defaults` replaces some fields' defaults (`nanoserve up` listens on 127.0.0.1, say)."""
    hints, defaults = typing.get_type_hints(cls), defaults or {}
    for f in _fields(cls, only):
        if dataclasses.is_dataclass(hints[f.name]):
            add_flags(parser, hints[f.name])
            continue
        if not f.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with common.flags.setting")
        kind, item = _kind(hints[f.name])
        default, help = defaults.get(f.name, _default(f)), f.metadata["help"]
        if default is None and f.metadata["unset"]:
            help += f" (default: {f.metadata['unset']})"
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": help}
        if kind is bool:  # --x and --no-x (and None: the setting's automatic choice)
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is list:  # repeated: --engine A --engine B
            kw.update(action="append", type=item, metavar=f.metadata["metavar"])
        else:
            kw.update(type=kind, choices=f.metadata["choices"], metavar=f.metadata["metavar"])
        parser.add_argument(*option_strings(f), **kw)


def settings_from_args(cls: type, args: argparse.Namespace, only: Iterable[str] | None = None) -> dict:
    """The settings of `cls` parsed by `add_flags`'s flags, as keyword arguments of `cls` (nested configs built)."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name](**settings_from_args(hints[f.name], args))
        if dataclasses.is_dataclass(hints[f.name])
        else getattr(args, f.name)
        for f in _fields(cls, only)
    }


def settings_argv(cls: type, settings: dict) -> list[str]:
    """`settings` (field name -> value; a nested config as a dict or an instance) as the flags that `add_flags`
    parses back to the same values. None is left out: it can only be the setting's own default."""
    hints, fields = typing.get_type_hints(cls), {f.name: f for f in _fields(cls, None)}
    argv: list[str] = []
    for name, value in settings.items():
        if name not in fields:
            raise KeyError(f"{cls.__name__} has no setting {name!r}")
        f = fields[name]
        if dataclasses.is_dataclass(hints[name]):
            argv += settings_argv(hints[name], value if isinstance(value, dict) else dataclasses.asdict(value))
            continue
        flag = option_strings(f)[0]
        if value is None:
            if _default(f) is not None:
                raise ValueError(f"{cls.__name__}.{name} cannot be None (its default is {_default(f)!r})")
        elif isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [a for v in value for a in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    return argv


def option_strings(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)


def _fields(cls: type, only: Iterable[str] | None) -> list[dataclasses.Field]:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    if only is None:
        return fields
    only = set(only)
    if only - {f.name for f in fields}:
        raise KeyError(f"{cls.__name__} has no setting {', '.join(sorted(only - {f.name for f in fields}))}")
    return [f for f in fields if f.name in only]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    if f.default is dataclasses.MISSING:
        raise TypeError(f"setting {f.name} has no default")
    return f.default


def _kind(hint: Any) -> tuple[type, type | None]:
    """`int | None` -> (int, None); `list[str]` -> (list, str)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return list, typing.get_args(hint)[0]
    return hint, None
