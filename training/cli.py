"""Command-line options declared once, on the fields of a typed settings dataclass.

A field made with `option(...)` is all there is to a flag: `add_arguments` turns the fields into argparse arguments
(name, type, default, help), `from_args` reads the parsed values back into the dataclass, and `recorded` writes the
options that reproduce a run, for the command line stored with its results. A field whose type is itself a settings
dataclass contributes its own fields, in an argument group titled by its help.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

OPTION = "cli_option"  # the key of a field's Option in its dataclass metadata


class Recorded(Enum):
    """Whether an option is written into the recorded command line."""

    ALWAYS = "always"  # spelled out even at its default, so the command reads without the defaults
    CHANGED = "changed"  # only when it differs from the default (flags, and options that default to "not given")
    NEVER = "never"  # how a run executes (device, threads, figures), not what it computes


@dataclass(frozen=True)
class Option:
    """How one settings field appears on the command line."""

    help: str | None = None  # for a nested settings field: the title of its argument group
    names: tuple[str, ...] = ()  # default: --field-name; the first is the one written in recorded commands
    record: Recorded = Recorded.CHANGED
    metavar: str | None = None
    choices: Sequence[Any] | None = None
    show: Callable[[Any], str] | None = None  # the value as written in a recorded command (default: `show`)


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **how: Any) -> Any:
    """A dataclass field with its command-line option (`how`: the fields of `Option`); no default: a required flag."""
    return dataclasses.field(default=default, default_factory=factory, metadata={OPTION: Option(**how)})


def show(value: Any) -> str:
    """A value as the command line takes it: sequences comma-separated, enums by value."""
    if isinstance(value, tuple | list):
        return ",".join(show(v) for v in value)
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


@dataclass(frozen=True)
class Flag:
    """One field of a settings dataclass as a command-line option."""

    field: str
    kind: Any  # the field's type, `X | None` unwrapped to X
    default: Any  # dataclasses.MISSING for a required option
    option: Option
    dest: str  # the attribute of the parsed namespace (a dotted path for a nested settings field)

    @property
    def names(self) -> tuple[str, ...]:
        return self.option.names or ("--" + self.field.replace("_", "-"),)

    @property
    def nested(self) -> bool:
        return dataclasses.is_dataclass(self.kind)

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: Any) -> None:
        """The argparse argument; `default` None for an override whose absence keeps another source's value."""
        how: dict[str, Any] = {
            "dest": self.dest,
            "help": self.option.help.format(field=self.field) if self.option.help else None,
        }
        if self.kind is bool and default is None:
            how |= {"action": argparse.BooleanOptionalAction, "default": None}
        elif self.kind is bool:
            how |= {"action": "store_const", "const": not default, "default": default}
        else:
            how |= {
                "type": parser_of(self.kind),
                "default": None if default is dataclasses.MISSING else default,
                "required": default is dataclasses.MISSING,
                "choices": self.option.choices,
                "metavar": self.option.metavar or self._metavar(),
            }
        parser.add_argument(*self.names, **how)

    def _metavar(self) -> str | None:
        """argparse's own: the choices for a closed set, else the flag's name (not the dotted dest) in capitals."""
        return None if self.option.choices else self.names[0].removeprefix("--").replace("-", "_").upper()

    def words(self, value: Any) -> list[str]:
        """The option with `value` as written in a recorded command: a boolean as its flag alone (`--no-x` for an
        off-switch, which is recorded only when off; `--x` / `--no-x` for an override either way)."""
        name = self.names[0]
        if self.kind is bool:
            return [name] if name.startswith("--no-") or value else [f"--no-{name[2:]}"]
        return [name, (self.option.show or show)(value)]


def _unwrap(kind: Any) -> Any:
    """X for `X | None`."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def parser_of(kind: Any) -> Callable[[str], Any]:
    """str -> value for a field type: numbers, strings, paths, enums, and tuples as comma-separated lists."""
    if typing.get_origin(kind) is tuple:
        item = parser_of(typing.get_args(kind)[0])
        return lambda text: tuple(item(v.strip()) for v in text.split(",") if v.strip())
    if typing.get_origin(kind) is typing.Literal:
        return type(typing.get_args(kind)[0])
    if kind in (int, float, str, Path) or isinstance(kind, type) and issubclass(kind, Enum):
        return kind
    raise TypeError(f"no command-line parser for a field of type {kind!r}")


def flags(cls: type, options: Mapping[str, Option] | None = None, prefix: str = "") -> list[Flag]:
    """The options of a settings dataclass, in field order: a field's own `option(...)`, else `options[name]`;
    fields with neither have no flag."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        how = f.metadata.get(OPTION) or (options or {}).get(f.name)
        if how is None:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(Flag(f.name, _unwrap(hints[f.name]), default, how, prefix + f.name))
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """The argparse arguments of every option of `cls` (nested settings in their own argument group)."""

    def add(target: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str) -> None:
        for flag in flags(cls, prefix=prefix):
            if flag.nested:
                add(parser.add_argument_group(flag.option.help), flag.kind, flag.dest + ".")
            else:
                flag.add_to(target, flag.default)

    add(parser, cls, "")


def from_args(cls: type, args: argparse.Namespace, prefix: str = "") -> Any:
    """The settings `add_arguments(parser, cls)` parsed into `args`."""
    values = {
        flag.field: from_args(flag.kind, args, flag.dest + ".") if flag.nested else getattr(args, flag.dest)
        for flag in flags(cls, prefix=prefix)
    }
    return cls(**values)


def recorded(settings: Any, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> list[str]:
    """The options that reproduce `settings`, in field order (top-level fields restricted to `only` / not in `skip`),
    each as its `Recorded` says."""
    keep = set(only) if only is not None else None
    out: list[str] = []
    for flag in flags(type(settings)):
        if (keep is not None and flag.field not in keep) or flag.field in skip:
            continue
        value = getattr(settings, flag.field)
        if flag.nested:
            out += recorded(value)
        elif flag.option.record is Recorded.ALWAYS or (
            flag.option.record is Recorded.CHANGED and value != flag.default
        ):
            out += flag.words(value)
    return out
