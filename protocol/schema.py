"""Typed records <-> msgpack maps, with strict validation on the way in.

Message bodies, certificates and verdicts are small frozen dataclasses whose
fields are ``int``, ``str``, ``bytes``, ``bool``, a nested record, or a
``tuple`` of one of those. ``to_map`` gives the map that is packed; ``from_map``
checks every field's presence and type and refuses unknown fields, raising
``Malformed`` with the field's name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from .codec import Value
from .errors import Malformed

R = TypeVar("R")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def to_map(record: object) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        out[f.name] = _out(getattr(record, f.name))
    return out


def _out(value: Any) -> Value:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_map(value)
    if isinstance(value, tuple):
        return [_out(v) for v in value]
    return value


def from_map(cls: type[R], data: Value, where: str = "") -> R:
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise Malformed(f"{where}: expected a map")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    extra = set(data) - names
    if extra:
        raise Malformed(f"{where}: unknown field(s) {sorted(extra)}")
    kwargs = {}
    for name in names:
        if name not in data:
            raise Malformed(f"{where}: missing field {name!r}")
        kwargs[name] = _in(hints[name], data[name], f"{where}.{name}")
    return cls(**kwargs)


def _in(hint: Any, value: Value, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _in(inner[0], value, where)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise Malformed(f"{where}: expected a list")
        return tuple(_in(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return from_map(hint, value, where)  # type: ignore[arg-type]
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint in (str, bytes):
        ok = isinstance(value, hint)
    else:
        raise TypeError(f"{where}: unsupported field type {hint!r}")
    if not ok:
        raise Malformed(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value
