"""The one ``--set KEY=VALUE`` parser of the CLI (``simulate``, ``experiment``, ``audit``).

Each KEY is a ``[tool.flwr.app.config]`` key (a :class:`shared_model.config.RunConfig`
field, dashed); its VALUE is parsed by that field's type. An unknown key, a malformed item
or a value of the wrong type raises :class:`SetError` (a ``ConfigError``) with a one-line
message, so a command can refuse it (exit 2) before it creates or starts anything; ranges
are checked when the config is built (``RunConfig.replace``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from typing import Any

from shared_model.config import ConfigError, RunConfig

class SetError(ConfigError):
    """A ``--set`` item that cannot be applied (one-line message)."""


def field_types() -> dict[str, type]:
    """Dashed run-config key → the Python type of its :class:`RunConfig` field."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name.replace("_", "-"): hints[f.name] for f in dataclasses.fields(RunConfig)}


def parse_value(key: str, raw: str) -> Any:
    """``raw`` as the type of run-config field ``key`` (``SetError`` when it is not one)."""
    types = field_types()
    if key not in types:
        raise SetError(f"--set {key}: unknown key (known: the keys of pyproject.toml [tool.flwr.app.config])")
    kind = types[key]
    text = raw.strip()
    if kind is bool:
        if text.lower() in {"true", "false"}:
            return text.lower() == "true"
        raise SetError(f"--set {key}={raw}: expected true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise SetError(f"--set {key}={raw}: expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise SetError(f"--set {key}={raw}: expected a number") from None
    return text.strip("'\"")


def parse_set(items: Sequence[str] | None) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` → ``{dashed key: typed value}`` (later items win)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SetError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(key.strip(), raw)
    return out


def add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The ``--set KEY=VALUE`` option (repeatable), parsed later by :func:`parse_set`."""
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=help)


def refuse(command: str, error: Exception) -> int:
    """Print ``fedshift COMMAND: error`` on one line to stderr (a ``DataError``: one such line
    per problem, ``file:line: field: reason``); the exit status 2."""
    for line in str(error).splitlines() or [""]:
        print(f"fedshift {command}: {line}", file=sys.stderr)
    return 2
