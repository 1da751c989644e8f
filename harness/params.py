"""Typed parameters for methods and suites: dataclass fields, filled from `key=value` strings.

The CLI's `--param f=1.5` and the Python API's `method_params={"f": 1.5}` go through the same
coercion and validation, so both give the same one-line errors.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from harness.errors import HarnessError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def describe(cls: type) -> list[tuple[str, str, Any]]:
    """(name, type name, default) of each parameter of a dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, getattr(hints[f.name], "__name__", str(hints[f.name])), default))
    return out


def shown(value: Any, limit: int = 60) -> str:
    """A user's value as an error message quotes it: repr, cut to `limit` characters (a 100 kB
    value is not echoed whole)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _coerce(value: Any, kind: Any, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise HarnessError(f"{where} must be true or false, got {shown(value)}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise HarnessError(f"{where} must be a number, got {shown(value)}")
        try:
            number = kind(value) if kind is float or not isinstance(value, str) else int(value, 0)
        except (TypeError, ValueError):
            raise HarnessError(
                f"{where} must be {'an integer' if kind is int else 'a number'}, got {shown(value)}"
            ) from None
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise HarnessError(f"{where} must be an integer, got {shown(value)}")
        if kind is float and not math.isfinite(number):  # "nan", "inf", "1e100000"
            raise HarnessError(f"{where} must be a finite number, got {shown(value)}")
        return number
    if kind is str:
        return str(value)
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise HarnessError(f"{where} must be one of {', '.join(map(str, choices))}; got {shown(value)}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or str(value).lower() == "none":
            return None
        return _coerce(value, args[0], where)
    return value


def build(cls: type, values: dict[str, Any] | None, *, what: str) -> Any:
    """Instantiate a parameter dataclass from user values, with one-line errors."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        listing = ", ".join(f"{n} ({t}={d!r})" for n, t, d in describe(cls)) or "none"
        raise HarnessError(f"unknown parameter {unknown[0]!r} for {what}; its parameters: {listing}")
    kwargs = {k: _coerce(v, hints[k], f"parameter {k!r} of {what}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"bad parameters for {what}: {exc}") from None


def parse_pairs(pairs: list[str] | None, *, flag: str) -> dict[str, str]:
    """`["f=1.5", "seed=3"]` -> `{"f": "1.5", "seed": "3"}`."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"{flag} expects key=value, got {shown(pair)} (for example {flag} seed=1)")
        out[key.strip()] = value.strip()
    return out


def parse_ints(text: str, what: str) -> list[int]:
    """'4,8,16' -> [4, 8, 16] (sorted, unique): a suite parameter listing sizes; ValueError naming `what` otherwise."""
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {shown(text)}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must list positive integers, got {shown(text)}")
    return sorted(set(values))


def as_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
