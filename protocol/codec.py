"""Deterministic msgpack encoding and bounded decoding.

msgpack has no canonical form, so we make one: maps are written with their keys
sorted, integers in their shortest width (msgpack's default), text as str and
bytes as bin, and floats and ext types are refused. The same value therefore
always gives the same bytes. Decoding applies hard limits before any object is
built, so a hostile frame cannot make us allocate much or recurse deeply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import Malformed, TooLarge

Value = Any  # None | bool | int | str | bytes | list[Value] | dict[str, Value]


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 1024
    max_str: int = 4 * 1024
    max_bin: int = 32 * 1024
    max_array: int = 256
    max_map: int = 64
    max_depth: int = 8


DEFAULT_LIMITS = Limits()
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)


def _canonical(value: Value, depth: int) -> Value:
    if depth > DEFAULT_LIMITS.max_depth:
        raise Malformed("value nested too deeply to encode")
    # exact types first (what our records hold): the same checks as below, without the isinstance chain
    kind = type(value)
    if kind is str or kind is bytes or kind is bool or value is None:
        return value
    if kind is int:
        if not MIN_INT <= value <= MAX_INT:
            raise Malformed("integer outside the signed 64-bit range")
        return value
    if kind is list or kind is tuple:
        return [v if type(v) in _LEAVES and depth < DEFAULT_LIMITS.max_depth else _canonical(v, depth + 1)
                for v in value]  # fmt: skip
    if kind is dict and all(type(k) is str for k in value):
        return {k: _canonical(value[k], depth + 1) for k in sorted(value)}
    return _canonical_any(value, depth)


_LEAVES = frozenset({str, bytes, bool, type(None)})  # returned as they are, at any allowed depth


def _canonical_any(value: Value, depth: int) -> Value:
    """Subclasses of the encodable types, and the refusals."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not MIN_INT <= value <= MAX_INT:
            raise Malformed("integer outside the signed 64-bit range")
        return value
    if isinstance(value, (list, tuple)):
        return [_canonical(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise Malformed("map keys must be strings")
        return {k: _canonical(value[k], depth + 1) for k in sorted(value)}
    raise Malformed(f"cannot encode a {type(value).__name__}: floats and objects are not allowed")


def pack(value: Value) -> bytes:
    """Encode ``value`` canonically."""
    return msgpack.packb(_canonical(value, 0), use_bin_type=True)  # type: ignore[no-any-return]


def _refuse_ext(code: int, data: bytes) -> Value:
    raise Malformed(f"msgpack ext type {code} is not allowed")


def _check_tree(value: Value, depth: int, limit: int) -> None:
    """Refuse floats anywhere and nesting deeper than ``limit``."""
    if depth > limit:
        raise Malformed(f"nested deeper than {limit} levels")
    kind = type(value)
    if kind is float:
        raise Malformed("floats are not allowed")
    if kind is int:
        if not MIN_INT <= value <= MAX_INT:
            raise Malformed("integer outside the signed 64-bit range")
        return
    if kind is dict:
        if not all(isinstance(k, str) for k in value):
            raise Malformed("map keys must be strings")
        children = value.values()
    elif kind is list:
        children = value
    else:
        return  # None, bool, str, bytes: all msgpack decodes to besides the above
    if depth >= limit and children:
        raise Malformed(f"nested deeper than {limit} levels")  # a child of this one would be too deep
    for v in children:
        if type(v) not in _LEAVES:  # a leaf needs no call: it holds nothing to refuse
            _check_tree(v, depth + 1, limit)


def unpack(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Value:
    """Decode exactly one msgpack object from ``data`` within ``limits``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Malformed("frame is not bytes")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"{len(data)} bytes is over the {limits.max_bytes}-byte limit")
    if not data:
        raise Malformed("empty frame")
    try:
        value = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_bin,
            max_array_len=limits.max_array,
            max_map_len=limits.max_map,
            max_ext_len=0,
        )
    except Malformed:
        raise
    except msgpack.ExtraData as exc:
        raise Malformed("trailing bytes after the message") from exc
    except ValueError as exc:  # msgpack reports limit breaches as ValueError
        text = str(exc)
        if "exceeds max" in text:
            raise TooLarge(f"a field is over its size limit: {text}") from exc
        raise Malformed(f"not valid msgpack: {text}") from exc
    except (msgpack.UnpackException, TypeError, RecursionError, UnicodeDecodeError) as exc:
        raise Malformed(f"not valid msgpack: {exc}") from exc
    except Exception as exc:  # msgpack raises a few undocumented types on garbage
        raise Malformed(f"not valid msgpack: {type(exc).__name__}: {exc}") from exc
    _check_tree(value, 0, limits.max_depth)
    return value
