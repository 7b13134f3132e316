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


_NAMES: dict[type, tuple[str, ...]] = {}
_NAME_SETS: dict[type, frozenset[str]] = {}


def _names(cls: type) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
        _NAME_SETS[cls] = frozenset(names)
    return names


def to_map(record: object) -> dict[str, Value]:
    return {name: _out(getattr(record, name)) for name in _names(type(record))}


def _out(value: Any) -> Value:
    kind = type(value)
    if kind is str or kind is bytes or kind is int or kind is bool or value is None:
        return value  # the common case, decided without the checks below
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
    names = _names(cls)
    known = _NAME_SETS[cls]
    if len(data) != len(names) or not all(k in known for k in data):  # an exact match builds no set
        extra = set(data) - known
        if extra:
            raise Malformed(f"{where}: unknown field(s) {sorted(extra)}")
    kwargs = {}
    for name in names:
        if name not in data:
            raise Malformed(f"{where}: missing field {name!r}")
        kwargs[name] = _in(hints[name], data[name], f"{where}.{name}")
    return cls(**kwargs)


_ORIGINS: dict[Any, tuple[Any, tuple[Any, ...]]] = {}


def _origin(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """``typing.get_origin`` and ``get_args`` of ``hint``, worked out once per hint."""
    known = _ORIGINS.get(hint)
    if known is None:
        known = _ORIGINS[hint] = (typing.get_origin(hint), typing.get_args(hint))
    return known


def _in(hint: Any, value: Value, where: str) -> Any:
    kind = type(value)
    if hint is int:  # the common scalar cases first, with the same checks as below
        if kind is int:
            return value
    elif hint is str or hint is bytes:
        if kind is hint:
            return value
    elif hint is bool and kind is bool:
        return value
    origin, args = _origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _in(inner[0], value, where)
    if origin is tuple:
        item = args[0]
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
