"""Typed presets, declared ranges and `--set key=value` overrides.

A module's hyper-parameters live in one dataclass at the top of its main file, CleanRL style, with
its valid values in the annotation and a docstring under each field:

    @dataclass
    class Config:
        gamma: Annotated[float, Range(ge=0, le=1)] = 0.99
        \"\"\"discount factor\"\"\"
        lambdas: Annotated[tuple[float, ...], Range(ge=0, le=1)] = (0.0, 0.5, 1.0)
        \"\"\"a Range on a tuple bounds each item; the tuple needs 1 to 64 items unless a Length says\"\"\"

        def problems(self) -> list[str]:           # optional: rules between fields
            return [] if self.top_k <= self.n_experts else [f"top_k={self.top_k} exceeds n_experts"]

Every int and float field declares a Range with both ends (the registry refuses a manifest whose
config does not), so a value that would crash, run forever or mean nothing is refused before any
work starts, with one line that names the field and what it accepts. nan and inf are never
accepted: run.json could not store them, so the run could not be repeated from its record.
`--help` shows each field's range.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from core.errors import UserError
from core.paths import workdir


class ConfigError(UserError, ValueError):
    """A bad `--set` key or value; the message says which and what is allowed."""


@dataclass(frozen=True)
class Range:
    """Valid values of a number: `ge`/`gt` the lower end (inclusive/exclusive), `le`/`lt` the upper."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __post_init__(self) -> None:
        if (self.ge is None) == (self.gt is None) or (self.le is None) == (self.lt is None):
            raise TypeError(f"{self!r}: a Range needs exactly one lower end (ge or gt) and one upper end (le or lt)")

    def __contains__(self, x: float) -> bool:
        low_ok = x >= self.ge if self.ge is not None else x > self.gt
        high_ok = x <= self.le if self.le is not None else x < self.lt
        return low_ok and high_ok

    def __str__(self) -> str:
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}"
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})"
        return f"{low}, {high}"


@dataclass(frozen=True)
class Length:
    """How many items a tuple field takes (default 1 to 64)."""
    min: int = 1
    max: int = 64


@dataclass(frozen=True)
class InsideWorkdir:
    """A str field that names a folder: relative, and inside the work dir once resolved."""


Seed = Annotated[int, Range(ge=0, le=2**32 - 1)]
"""numpy seeds must fit in 32 bits"""

DEFAULT_LENGTH = Length()


def _num(x: float) -> str:
    if isinstance(x, int) and abs(x) >= 10_000 and math.log10(abs(x)).is_integer():
        return f"1e{int(math.log10(abs(x)))}" if x > 0 else f"-1e{int(math.log10(-x))}"
    if isinstance(x, int) and x == 2**32 - 1:
        return "2^32-1"
    return f"{x:g}" if isinstance(x, float) else str(x)


# --- reading a field's declaration ---------------------------------------------------------------
def field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation, with its Annotated markers kept."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """(the bare type, its Annotated markers)."""
    if typing.get_origin(tp) is Annotated:
        bare, *markers = typing.get_args(tp)
        inner, inner_markers = _unwrap(bare)
        return inner, (*markers, *inner_markers)
    return tp, ()


def _optional_inner(tp: Any) -> Any | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _marker(markers: tuple[Any, ...], kind: type) -> Any | None:
    return next((m for m in markers if isinstance(m, kind)), None)


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
    """What `--help` shows and errors quote: the type with its declared range."""
    tp, markers = _unwrap(tp)
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{type_name(inner)} or none"
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        item, item_markers = _unwrap(typing.get_args(tp)[0])
        length = _marker(markers, Length) or DEFAULT_LENGTH
        bounds = _marker(markers, Range) or _marker(item_markers, Range)
        return (f"{length.min}-{length.max} comma-separated {item.__name__}s"
                + (f" in {bounds}" if bounds else ""))
    if _marker(markers, InsideWorkdir):
        return "folder inside the work dir"
    bounds = _marker(markers, Range)
    return getattr(tp, "__name__", str(tp)) + (f" in {bounds}" if bounds else "")


def undeclared(cls: type) -> list[str]:
    """Fields whose annotation does not say which values are valid (a contract violation): every
    number needs a Range and every free-text str a marker."""
    missing = []
    for name, tp in field_types(cls).items():
        bare, markers = _unwrap(tp)
        bare, more = _unwrap(_optional_inner(bare) or bare)
        markers = (*markers, *more)
        if typing.get_origin(bare) in (tuple, list):
            item, item_markers = _unwrap(typing.get_args(bare)[0])
            bare, markers = item, (*markers, *item_markers)
        if bare in (int, float) and not _marker(markers, Range):
            missing.append(f"{name} ({bare.__name__} without a Range)")
        if bare is str and not _marker(markers, InsideWorkdir):
            missing.append(f"{name} (str without a marker)")
    return missing


# --- parsing and validating ----------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_INT = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take "１２" or "١٢"
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def parse_value(raw: str, tp: Any) -> Any:
    """Parse a command-line string to `tp`; raise ValueError when it does not fit the type (ranges
    are checked by `validate`)."""
    tp, _ = _unwrap(tp)
    raw = raw.strip()
    inner = _optional_inner(tp)
    if inner is not None:
        return None if raw.lower() in {"none", "null", ""} else parse_value(raw, inner)
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == raw:
                return choice
        raise ValueError(raw)
    if origin in (tuple, list):
        item_type = typing.get_args(tp)[0]
        items = [parse_value(part, item_type) for part in raw.split(",")] if raw else []
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(raw)
    if tp is int:
        if not _INT.fullmatch(raw):
            raise ValueError(raw)
        return int(raw)
    if tp is float:
        if not _FLOAT.fullmatch(raw):  # refuses nan, inf and non-ASCII digits
            raise ValueError(raw)
        return float(raw)
    if tp is str:
        return raw
    raise ValueError(f"unsupported field type {tp!r}")


def field_problems(name: str, value: Any, tp: Any) -> list[str]:
    """Why `value` is not valid for a field annotated `tp` (empty when it is)."""
    bare, markers = _unwrap(tp)
    inner = _optional_inner(bare)
    if inner is not None:
        return [] if value is None else field_problems(name, value, Annotated[inner, *markers] if markers else inner)
    expected = type_name(tp)
    if typing.get_origin(bare) in (tuple, list):
        length = _marker(markers, Length) or DEFAULT_LENGTH
        if not length.min <= len(value) <= length.max:
            return [f"{name} has {len(value)} items: expected {expected}"]
        item_type = typing.get_args(bare)[0]
        item_range = _marker(markers, Range)
        if item_range:
            item_type = Annotated[item_type, item_range]
        return [f"{name}: item {v!r} is not valid: expected {expected}"
                for v in value if field_problems(name, v, item_type)][:1]
    if bare in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (bare is int and not isinstance(value, int)):
            return [f"{name}={value!r}: expected {expected}"]
        bounds = _marker(markers, Range)
        if not math.isfinite(value) or (bounds and value not in bounds):
            return [f"{name}={value!r} is out of range: expected {expected}"]
    if bare is str and _marker(markers, InsideWorkdir):
        path = Path(value)
        if (not value or not value.isprintable() or path.is_absolute()
                or not (workdir() / path).resolve().is_relative_to(workdir())):
            return [f"{name}={value!r}: expected a relative folder inside the work dir ({workdir()})"]
    return []


def validate(config: Any) -> Any:
    """Return `config` when every field is in its declared range and its cross-field `problems()`
    (if the class has one) are empty; otherwise raise one ConfigError that lists them all."""
    problems = [p for name, tp in field_types(type(config)).items()
                for p in field_problems(name, getattr(config, name), tp)]
    if not problems and hasattr(config, "problems"):
        problems = list(config.problems())
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return a copy of `config` with each `key=value` applied, parsed to the field's type (the
    caller validates the result: see `validate`)."""
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
