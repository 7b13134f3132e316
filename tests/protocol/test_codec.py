"""The canonical msgpack codec: determinism, round trips, limits and hostile input."""

from __future__ import annotations

import contextlib
import random
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import DEFAULT_LIMITS, MAX_INT, MIN_INT, Limits, pack, unpack
from protocol.errors import Malformed, Rejected, TooLarge

from .factory import exactly

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
L = DEFAULT_LIMITS

scalars = (
    st.none()
    | st.booleans()
    | st.integers(MIN_INT, MAX_INT)
    | st.sampled_from([MIN_INT, MAX_INT, -1, 0, 127, 128, 255, 256, 65535, 65536, 2**32, -33, -32])
    | st.text(max_size=40)
    | st.binary(max_size=40)
)


def depth(v) -> int:
    if isinstance(v, (list, tuple)):
        return 1 + max((depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((depth(x) for x in v.values()), default=0)
    return 0


values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
).filter(lambda v: depth(v) <= L.max_depth)


def level(v) -> int:
    """The codec's own depth measure: the deepest index at which a value sits (a scalar or [] is 0)."""
    if isinstance(v, (list, tuple)):
        return max((1 + level(x) for x in v), default=0)
    if isinstance(v, dict):
        return max((1 + level(x) for x in v.values()), default=0)
    return 0


def strict_eq(a, b) -> bool:
    """Equality that also tells bool from int, bytes from str, and list from tuple (after pack)."""
    if isinstance(a, tuple):
        a = list(a)
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_eq(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_eq(a[k], b[k]) for k in a)
    return a == b


def shuffled(v, rnd: random.Random):
    if isinstance(v, list):
        return [shuffled(x, rnd) for x in v]
    if isinstance(v, dict):
        items = list(v.items())
        rnd.shuffle(items)
        return {k: shuffled(x, rnd) for k, x in items}
    return v


# -- determinism and round trips --------------------------------------------------------
@FUZZ
@given(v=values)
def test_round_trip(v):
    data = pack(v)
    back = unpack(data)
    assert strict_eq(v, back)
    assert pack(back) == data


@FUZZ
@given(v=values, rnd=st.randoms(use_true_random=False))
def test_map_order_is_irrelevant(v, rnd):
    assert pack(shuffled(v, rnd)) == pack(v)


def test_same_value_same_bytes_examples():
    a = {"b": 1, "a": [1, b"x", "x"], "c": {"z": None, "y": True}}
    b = {"c": {"y": True, "z": None}, "a": [1, b"x", "x"], "b": 1}
    assert pack(a) == pack(b)
    assert pack((1, 2)) == pack([1, 2])
    # keys are written in sorted order
    assert pack({"b": 1, "a": 2}) == b"\x82\xa1a\x02\xa1b\x01"


def test_types_are_kept_apart():
    assert pack(b"a") != pack("a")
    assert pack(True) != pack(1)
    assert pack(0) != pack(False)
    assert pack(None) != pack(0)
    assert unpack(pack(b"a")) == b"a" and isinstance(unpack(pack(b"a")), bytes)
    assert unpack(pack(True)) is True


@pytest.mark.parametrize(
    "n", [0, 1, 127, 128, 255, 256, 2**16, 2**32, MAX_INT, -1, -32, -33, -(2**31), MIN_INT]
)
def test_integers_shortest_width(n):
    assert pack(n) == msgpack.packb(n)
    assert unpack(pack(n)) == n


# -- limits ------------------------------------------------------------------------------
def test_total_size_limit():
    ok = pack(b"x" * (L.max_bin - 10))
    assert unpack(ok) == b"x" * (L.max_bin - 10)
    with exactly(TooLarge):
        unpack(b"\x00" * (L.max_bytes + 1))
    small = Limits(max_bytes=10)
    assert unpack(pack("123456"), small) == "123456"
    with exactly(TooLarge):
        unpack(pack("1234567890"), small)


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        ("s" * (L.max_str + 1), "str"),
        (b"b" * (L.max_bin + 1), "bin"),
        ([0] * (L.max_array + 1), "array"),
        ({f"k{i}": 0 for i in range(L.max_map + 1)}, "map"),
    ],
)
def test_field_limits(value, limit):
    with pytest.raises(Malformed) as info:  # TooLarge is a Malformed
        unpack(pack(value))
    assert isinstance(info.value, TooLarge), info.value


@pytest.mark.parametrize(
    "value", ["s" * L.max_str, b"b" * L.max_bin, [0] * L.max_array, {f"k{i}": 0 for i in range(L.max_map)}]
)
def test_field_limits_boundary_accepted(value):
    assert unpack(pack(value)) == value


@pytest.mark.parametrize(
    "data",
    [
        b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\xdd\xff\xff\xff\xff",  # array32 of 4 G items
        b"\xdf\xff\xff\xff\xff",  # map32 of 4 G pairs
        b"\xdd\x00\x00\x01\x01" + b"\xc0" * 257,
    ],
)
def test_hostile_length_headers(data):
    with pytest.raises(Malformed):
        unpack(data)


def test_depth_limit():
    deepest_ok = b"\x91" * L.max_depth + b"\xc0"
    assert unpack(deepest_ok) is not None
    with exactly(Malformed):
        unpack(b"\x91" * (L.max_depth + 1) + b"\xc0")
    with exactly(Malformed):
        unpack(b"\x81\xa1k" * (L.max_depth + 1) + b"\xc0")
    with exactly(Malformed):
        unpack(b"\x91" * 60_000 + b"\xc0")  # far past msgpack's own stack
    v = None
    for _ in range(L.max_depth + 1):
        v = [v]
    with exactly(Malformed):
        pack(v)
    with exactly(Malformed):
        pack({"a": v})
    assert pack(v[0]) == deepest_ok
    with exactly(Malformed):
        unpack(b"\x91" * 3 + b"\xc0", Limits(max_depth=2))


# -- refused types -----------------------------------------------------------------
@pytest.mark.parametrize("value", [1.5, 0.0, float("nan"), [1, 2.0], {"a": 1.0}, {"a": [{"b": -0.0}]}])
def test_floats_refused_by_pack(value):
    with exactly(Malformed):
        pack(value)


@pytest.mark.parametrize(
    "data",
    [
        b"\xcb" + struct.pack(">d", 1.5),
        b"\xca" + struct.pack(">f", 1.5),
        b"\x92\x01\xcb" + struct.pack(">d", 0.0),
        b"\x81\xa1a\xca" + struct.pack(">f", 2.0),
        b"\x81\xcb" + struct.pack(">d", 1.0) + b"\x01",  # float map key
    ],
)
def test_floats_refused_by_unpack(data):
    with exactly(Malformed):
        unpack(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\xd4\x05\x00",  # fixext1
        b"\xd5\x05\x00\x00",
        b"\xd6\x05" + bytes(4),
        b"\xd7\x05" + bytes(8),
        b"\xd8\x05" + bytes(16),
        b"\xc7\x00\x05",  # ext8, empty
        b"\xc7\x03\x05abc",
        b"\xc8\x00\x03\x05abc",
        b"\xc9\x00\x00\x00\x03\x05abc",
        b"\xd6\xff\x00\x00\x00\x01",  # timestamp32
        b"\xd7\xff" + bytes(8),  # timestamp64
        b"\xc7\x0c\xff" + bytes(12),  # timestamp96
        b"\xc7\x00\xff",
        b"\x91\xd4\x01\x00",  # ext nested in an array
    ],
)
def test_ext_types_refused(data):
    with pytest.raises(Malformed):
        unpack(data)


@pytest.mark.parametrize("value", [object(), 1 + 2j, bytearray(b"x"), {1, 2}, Limits()])
def test_objects_refused_by_pack(value):
    with exactly(Malformed):
        pack(value)


@pytest.mark.parametrize("value", [MAX_INT + 1, MIN_INT - 1, 2**64, -(2**64)])
def test_out_of_range_integers_refused_by_pack(value):
    with exactly(Malformed):
        pack(value)


@pytest.mark.parametrize(
    "data",
    [
        b"\xcf\x80\x00\x00\x00\x00\x00\x00\x00",  # uint64 2**63: one past MAX_INT
        b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint64 max
    ],
)
def test_integers_pack_refuses_are_refused_by_unpack(data):
    """Whatever unpack returns must be a Value that pack can encode (the codec's one value domain)."""
    with pytest.raises(Malformed):
        unpack(data)


def test_trailing_bytes_refused():
    with exactly(Malformed):
        unpack(pack(1) + b"\x00")
    with exactly(Malformed):
        unpack(pack({"a": 1}) + pack({"a": 1}))


@pytest.mark.parametrize("value", [{1: 2}, {b"a": 1}, {None: 1}, {(1, 2): 3}, {"a": {2: 1}}, {True: 1}])
def test_non_str_map_keys_refused_by_pack(value):
    with exactly(Malformed):
        pack(value)


@pytest.mark.parametrize(
    "data",
    [
        b"\x81\x01\x02",  # int key
        b"\x81\xc0\x01",  # nil key
        b"\x81\xc3\x01",  # bool key
        b"\x81\x91\x01\x01",  # array key
        b"\x81\x80\x01",  # map key
    ],
)
def test_non_str_map_keys_refused_by_unpack(data):
    with exactly(Malformed):
        unpack(data)


@pytest.mark.parametrize(
    "data", [b"\x81\xc4\x01a\x01", b"\x82\xa1a\x01\xc4\x01a\x02", b"\x91\x81\xc4\x00\xc0"]
)
def test_bin_map_keys_refused_by_unpack(data):
    """msgpack's strict_map_key lets bytes keys through; our maps are keyed by str only."""
    with exactly(Malformed):
        unpack(data)


def test_empty_and_non_bytes_refused():
    with exactly(Malformed):
        unpack(b"")
    with exactly(Malformed):
        unpack("abc")  # type: ignore[arg-type]
    assert unpack(bytearray(pack([1]))) == [1]
    assert unpack(memoryview(pack([1]))) == [1]


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", b"\xa5abc", b"\xc4\x05ab", b"\xd9\x02\xff\xfe"])
def test_invalid_msgpack(data):
    with exactly(Malformed):
        unpack(data)


# -- hostile input ----------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_only_raise_rejected(data):
    with contextlib.suppress(Rejected):
        unpack(data)


@FUZZ
@given(data=st.binary(max_size=60))
def test_whatever_unpack_accepts_is_a_value_pack_encodes(data):
    """unpack's output stays in the codec's value domain (within limits, and re-encodable)."""
    try:
        value = unpack(data)
    except Rejected:
        return
    assert level(value) <= L.max_depth
    pack(value)


@FUZZ
@given(v=values, data=st.data())
def test_mutated_encodings_only_raise_rejected(v, data):
    enc = bytearray(pack(v))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(enc) - 1))
        enc[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(Rejected):
        unpack(bytes(enc))


@FUZZ
@given(
    v=values,
    limits=st.builds(
        Limits,
        max_str=st.integers(0, 20),
        max_bin=st.integers(0, 20),
        max_array=st.integers(0, 4),
        max_map=st.integers(0, 4),
        max_depth=st.integers(0, 4),
    ),
)
def test_small_limits_never_crash(v, limits):
    try:
        back = unpack(pack(v), limits)
    except Rejected:
        return
    assert strict_eq(v, back)
    assert level(back) <= limits.max_depth
