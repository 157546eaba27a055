"""Typed presets and `--set key=value` overrides.

A module's hyper-parameters live in one dataclass at the top of its main file, CleanRL style, with
a docstring under each field:

    @dataclass
    class Config:
        gamma: float = 0.99
        \"\"\"discount factor\"\"\"

Presets are instances of that dataclass. `apply_overrides` parses each `key=value` to the field's
declared type and refuses unknown keys or values that do not parse, naming the key, its type and
the allowed keys.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad `--set` key or value; the message says which and what is allowed."""


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from its source); a field a
    subclass declares again takes the subclass's docstring."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        inner = typing.get_args(tp)[0]
        return f"comma-separated {type_name(inner)}s"
    if _optional_inner(tp) is not None:
        return f"{type_name(_optional_inner(tp))} or none"
    return getattr(tp, "__name__", str(tp))


def _optional_inner(tp: Any) -> Any | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(raw: str, tp: Any) -> Any:
    """Parse a command-line string to `tp`; raise ValueError when it does not fit."""
    origin = typing.get_origin(tp)
    inner = _optional_inner(tp)
    if inner is not None:
        return None if raw.strip().lower() in {"none", "null", ""} else parse_value(raw, inner)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == raw:
                return choice
        raise ValueError(raw)
    if origin in (tuple, list):
        item_type = typing.get_args(tp)[0]
        items = [parse_value(part.strip(), item_type) for part in raw.split(",") if part.strip()]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(raw)
    if tp is int:
        return int(raw)
    if tp is float:
        return float(raw)
    if tp is str:
        return raw
    raise ValueError(f"unsupported field type {tp!r}")


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return a copy of `config` with each `key=value` applied, parsed to the field's type."""
    types_ = field_types(type(config))
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in types_:
            allowed = ", ".join(types_)
            raise ConfigError(f"unknown key {key!r} for {type(config).__qualname__}; allowed keys: {allowed}")
        try:
            changes[key] = parse_value(raw, types_[key])
        except ValueError:
            raise ConfigError(f"bad value {raw!r} for {key!r}: expected {type_name(types_[key])}") from None
    return dataclasses.replace(config, **changes)


def to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
