"""The compiled hot path (acm_module._hotpath) and its pure-Python twin agree byte for byte.

The pure twin is one module per concept (core/numbers.py, engine/request_py, resp_py, decider_py),
gathered by engine/hotpath_py; the compiled one is one module built from ext/<concept>.pyx.
Every public function of every concept module is fuzzed here against its compiled twin (see
FUZZED). Both modules are imported directly, whatever ACM_PUREPYTHON says. A missing compiled
module is an import error of this file, so the run fails: the package must be built, never
skipped.
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from acm_module import _hotpath as cy
from acm_module.core import numbers as numbers_py
from acm_module.core import types
from acm_module.decide.engine import decider_py, hotpath_py, request_py, resp_py
from acm_module.decide.engine import hotpath_py as py

pytestmark = pytest.mark.timeout(300)

NOW = 1_764_000_000_000
MODS = (py, cy)
CONCEPTS = (numbers_py, request_py, resp_py, decider_py)

# Each public name of a concept module -> the tests below that fuzz it against the compiled twin.
FUZZED = {
    "normalise": ("test_normalise_table", "test_normalise_country_code", "test_normalise_fuzz"),
    "partition_of": ("test_partition",),
    "decode_request": ("test_decode_request_fuzz", "test_decode_request_edges"),
    "encode_reply": ("test_encode_reply_matches_packb",),
    "encode_error": ("test_encode_reply_matches_packb",),
    "encode_command": ("test_encode_command",),
    "parse_reply": ("test_parse_reply_valid_and_split", "test_parse_reply_garbage"),
    "Decider": ("test_decider_end_to_end", "test_decider_attributes_and_configure",
                "test_decider_blocks_and_noscript",
                "test_decider_with_gateway_context_matches_the_twin"),
}


def test_compiled_module_is_compiled() -> None:
    assert cy.__file__ is not None
    assert cy.__file__.endswith((".so", ".pyd")), cy.__file__
    assert set(py.__all__) == set(cy.__all__)
    assert set(cy.__all__) <= set(dir(cy))


def test_every_public_function_of_every_concept_is_fuzzed() -> None:
    names = globals()
    for mod in CONCEPTS:
        own = [n for n in mod.__all__ if getattr(mod, n) is not getattr(types, n, None)]
        assert own, mod.__name__
        for n in own:
            assert n in FUZZED, f"{mod.__name__}.{n} is not fuzzed against the compiled twin"
            assert all(t in names for t in FUZZED[n]), FUZZED[n]
            assert getattr(hotpath_py, n) is getattr(mod, n)  # the facade is the concept's
            assert callable(getattr(cy, n))
    assert sorted(FUZZED) == sorted(n for m in CONCEPTS for n in m.__all__
                                    if getattr(m, n) is not getattr(types, n, None))


def test_the_twins_share_one_definition_of_each_type() -> None:
    """Request, RequestError, RespError, Incomplete, FIELDS, severities: core/types.py's."""
    for name in ("Request", "RequestError", "RespError", "Incomplete", "FIELDS", "MAX_DEPTH",
                 "severity_of"):
        assert getattr(cy, name) is getattr(types, name), name
        assert getattr(py, name) is getattr(types, name), name
    frame = msgpack.packb({"call_id": "c", "a": "1", "b": "2"})
    assert type(cy.decode_request(frame, 99, 1)) is type(py.decode_request(frame, 99, 1)) \
        is types.Request
    assert type(cy.parse_reply(b"-ERR x\r\n", 0)[0]) is types.RespError
    req = cy.decode_request(frame, 99, 1)
    with pytest.raises(AttributeError):
        req.other = 1  # type: ignore[attr-defined]
    assert (req.call_id, req.a, req.b, req.ts_ms, req.src_ip, req.trunk) == \
        ("c", "1", "2", 1, "", "")
    assert [types.severity_of(n) for n in (0, 4, 5, 6, 7, 300)] == \
        ["LOW", "LOW", "HIGH", "HIGH", "CRITICAL", "CRITICAL"]
    assert types.SEVERITIES == ("LOW", "HIGH", "CRITICAL")


def test_the_gateway_context_implements_the_declared_interface() -> None:
    from acm_module.decide.gateway.context import GatewayContext

    ctx = GatewayContext(_REGISTRY, fanout_threshold=2, rl_sha="r" * 40, fanout_sha="f" * 40)
    assert isinstance(ctx, types.GatewayContext)
    att = ctx.resolve("10.1.2.3", "")
    assert att is not None and isinstance(att, types.Attribution)
    for mod in MODS:
        assert mod.Decider(decide_sha=_SHA, context=ctx).context is ctx
        assert mod.Decider(decide_sha=_SHA).context is None


def _outcome(fn: Callable[..., Any], *args: Any) -> tuple:
    """Run fn(*args); return ("ok", value) or ("raise", exception type name, message)."""
    try:
        return ("ok", fn(*args))
    except Exception as e:  # the twins must fail alike, too
        return ("raise", type(e).__name__, str(e))


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

NORMALISE_CASES = [
    # E.164 in every accepted spelling
    ("+2348031234567", "+2348031234567"),
    ("2348031234567", "+2348031234567"),
    ("08031234567", "+2348031234567"),
    ("002348031234567", "+2348031234567"),
    ("sip:+2348031234567@example.com", "+2348031234567"),
    ("sips:08031234567@gw.example.com;transport=tls", "+2348031234567"),
    ("tel:+234-803-123-4567", "+2348031234567"),
    ("tel:08031234567;phone-context=+234", "+2348031234567"),
    ("SIP:+2348031234567@host", "+2348031234567"),
    ("Sips:2348031234567@host", "+2348031234567"),
    ("<sip:+2348031234567@host>", "+2348031234567"),
    ("  < sip:+2348031234567@host;user=phone >  ", "+2348031234567"),
    ("sip:+2348031234567;user=phone@host", "+2348031234567"),
    ("+234 803 123 4567", "+2348031234567"),
    (" +234-803-123-4567 ", "+2348031234567"),
    ("+234.803.123.4567", "+2348031234567"),
    ("(0803) 123-4567", "+2348031234567"),
    ("+234\t803\t1234567", "+2348031234567"),
    ("\n+2348031234567\r\n", "+2348031234567"),
    ("\x1c+2348031234567\x1f", "+2348031234567"),  # str.strip() separators
    ("\xa0+2348031234567\u3000", "+2348031234567"),  # Unicode whitespace, stripped
    ("sip:+2348031234567@h\u00f4te.example", "+2348031234567"),  # non-ASCII host, dropped
    ("+12345678", "+12345678"),  # 8 digits
    ("+123456789012345", "+123456789012345"),  # 15 digits
    ("0012025550123", "+12025550123"),
    ("+44 (0)20 7946 0958", "+440207946095" "8"),
    # not phone numbers
    ("anonymous", None),
    ("Anonymous", None),
    ("unknown", None),
    ("sip:anonymous@anonymous.invalid", None),
    ("", None),
    ("   ", None),
    ("<>", None),
    ("+", None),
    ("sip:", None),
    ("+234803123456a", None),
    ("+234 803 CALL ME", None),
    ("+1234567", None),  # 7 digits
    ("1234567", None),
    ("+1234567890123456", None),  # 16 digits
    ("08031234567890123", None),  # national, too long with the country code
    ("+0348031234567", None),  # country code starting with 0
    ("0002348031234567", None),
    ("+234_803_123_4567", None),
    ("+234/803/123/4567", None),
    ("+\uff12\uff13\uff14\uff18\uff10\uff13\uff11\uff12\uff13\uff14", None),  # fullwidth
    ("+\u0662\u0663\u0664\u0668\u0660\u0663\u0661\u0662\u0663", None),  # Arabic-Indic
    ("+2348031234567\x00", None),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISE_CASES)
def test_normalise_table(raw: str, expected: str | None) -> None:
    assert py.normalise(raw) == expected
    assert cy.normalise(raw) == expected


def test_normalise_country_code() -> None:
    for cc in ("234", "1", "44", "", "0", "12345678", "2a", "\u0662"):
        for raw in ("08031234567", "0 803 123", "+2348031234567", "0"):
            assert _outcome(cy.normalise, raw, cc) == \
                _outcome(py.normalise, raw, cc), (raw, cc)
    assert cy.normalise("08031234567", "1") == "+18031234567"


def test_normalise_fuzz() -> None:
    rnd = random.Random(1)
    pieces = ["0", "00", "+", "234", "803", "1234567", "9", " ", "-", ".", "(", ")", "\t",
              "\n", "\x1c", "\xa0", "\u2003", "sip:", "SIPS:", "tel:", "Tel:", "<", ">", "@",
              ";", "a", "Z", "\u0130", "\u212a", "\ud800", "\uff10", "anonymous", "@h\u00e9"]
    deadline = time.monotonic() + 20
    for i in range(100_000):
        if i % 1000 == 0 and time.monotonic() > deadline:
            break
        raw = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 9)))
        cc = rnd.choice(("234", "234", "1", "", "44"))
        assert cy.normalise(raw, cc) == py.normalise(raw, cc), (raw, cc)
    for bad in (None, b"+2348031234567", 2348031234567):
        assert _outcome(cy.normalise, bad)[:2] == _outcome(py.normalise, bad)[:2]


def test_partition() -> None:
    rnd = random.Random(2)
    for _ in range(20_000):
        num = "+" + "".join(rnd.choice("0123456789") for _ in range(rnd.randint(0, 15)))
        parts = rnd.choice((1, 2, 16, 64, 1000, 1 << 40, -7))
        assert cy.partition_of(num, parts) == py.partition_of(num, parts)
    for num in ("", "+2348031234567", "\u00e9\u4e2d", "anonymous"):
        for parts in (16, 3, -5, 1 << 70, True):
            assert cy.partition_of(num, parts) == py.partition_of(num, parts)
    for bad_num, parts in (("+234", 0), (b"+234", 16), ("\ud800", 16)):
        assert _outcome(cy.partition_of, bad_num, parts)[:2] == \
            _outcome(py.partition_of, bad_num, parts)[:2]


# ---------------------------------------------------------------------------------------------
# Request frames
# ---------------------------------------------------------------------------------------------


class S(bytes):
    """Raw bytes to encode as a msgpack str (may be invalid UTF-8)."""


class X(bytes):
    """An ext payload."""


class M(list):
    """A map as a list of (key, value) pairs: duplicates and any key order allowed."""


def _uint(v: int, w: int) -> bytes:
    return v.to_bytes(w, "big")


def _enc(o: Any, rnd: random.Random) -> bytes:
    """Encode o as msgpack, picking any valid (not only the smallest) encoding at random."""
    if o is None:
        return b"\xc0"
    if o is True:
        return b"\xc3"
    if o is False:
        return b"\xc2"
    if isinstance(o, int):
        opts = []
        if 0 <= o < 128:
            opts.append(bytes([o]))
        if -32 <= o < 0:
            opts.append(bytes([o + 0x100]))
        for i, w in enumerate((1, 2, 4, 8)):
            if 0 <= o < 1 << (8 * w):
                opts.append(bytes([0xCC + i]) + _uint(o, w))
            if -(1 << (8 * w - 1)) <= o < 1 << (8 * w - 1):
                opts.append(bytes([0xD0 + i]) + o.to_bytes(w, "big", signed=True))
        return rnd.choice(opts)
    if isinstance(o, float):
        if rnd.random() < 0.3:
            try:
                return b"\xca" + struct.pack(">f", o)
            except OverflowError:
                pass
        return b"\xcb" + struct.pack(">d", o)
    if isinstance(o, X):
        n = len(o)
        fix = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
        if n in fix and rnd.random() < 0.5:
            return bytes([fix[n], 5]) + o
        w = rnd.choice([w for w in (1, 2, 4) if n < 1 << (8 * w)])
        return bytes([{1: 0xC7, 2: 0xC8, 4: 0xC9}[w]]) + _uint(n, w) + b"\x05" + o
    if isinstance(o, str | S):
        b = o.encode("utf-8", "surrogatepass") if isinstance(o, str) else bytes(o)
        n = len(b)
        opts = [bytes([0xD9 + i]) + _uint(n, w) for i, w in enumerate((1, 2, 4))
                if n < 1 << (8 * w)]
        if n < 32:
            opts.append(bytes([0xA0 | n]))
        return rnd.choice(opts) + b
    if isinstance(o, bytes):
        n = len(o)
        opts = [bytes([0xC4 + i]) + _uint(n, w) for i, w in enumerate((1, 2, 4))
                if n < 1 << (8 * w)]
        return rnd.choice(opts) + o
    if isinstance(o, M):
        n = len(o)
        opts = [b"\xde" + _uint(n, 2), b"\xdf" + _uint(n, 4)]
        if n < 16:
            opts.append(bytes([0x80 | n]))
        return rnd.choice(opts) + b"".join(_enc(k, rnd) + _enc(v, rnd) for k, v in o)
    if isinstance(o, list):
        n = len(o)
        opts = [b"\xdc" + _uint(n, 2), b"\xdd" + _uint(n, 4)]
        if n < 16:
            opts.append(bytes([0x90 | n]))
        return rnd.choice(opts) + b"".join(_enc(v, rnd) for v in o)
    raise TypeError(o)


def _number(rnd: random.Random) -> Any:
    return rnd.choice([
        "+2348031234567", "08031234567", "2348031234568", "sip:+2348031234569@gw;user=phone",
        "+234 803 123 4560", "anonymous", "", "unknown", "+1234567", "tel:+447700900123",
        "+%d" % rnd.randint(10**7, 10**15), "0%d" % rnd.randint(10**6, 10**12),
        "\xa0+2348031234567", "+234803123456\u00e9", None,
    ])


def _string(rnd: random.Random, limit: int) -> Any:
    r = rnd.random()
    if r < 0.75:
        return "".join(rnd.choice("abcdef0123456789-@.:") for _ in range(rnd.randint(1, 24)))
    return rnd.choice([
        "", "x" * limit, "x" * (limit + 1), "\u00e9" * (limit // 2), "\u00e9" * (limit // 2 + 1),
        S(b"\xff\xfe"), S(b"\xed\xa0\x80"), S(b"\xc0\x80"), S(b"ok"), "\u4e2d\u6587", None, 7,
        -1, 1.5, True, b"bin", [], M(), X(b"\x01"), ["nested", [1, 2]],
    ])


def _ts(rnd: random.Random) -> Any:
    return rnd.choice([
        None, rnd.randint(0, 2 * 10**9), rnd.uniform(0, 2e9), 0, 0.0, -0.0, -1, -0.5,
        99_999_999_999, 100_000_000_000, 99_999_999_999.999, 1e11, math.nan, math.inf,
        -math.inf, 2**63, 2**64 - 1, -(2**63), 1.7e9 + 0.0005, "1700000000", True, b"1", [],
    ])


def _request(rnd: random.Random) -> M:
    """A request map: mostly valid, with every kind of defect now and then."""
    m = M()
    fields = {
        "call_id": (lambda: _string(rnd, 256)) if rnd.random() < 0.2
        else (lambda: f"{rnd.getrandbits(64):x}@host"),
        "a": lambda: _number(rnd) if rnd.random() < 0.9 else _string(rnd, 256),
        "b": lambda: _number(rnd) if rnd.random() < 0.9 else _string(rnd, 256),
        "ts": lambda: _ts(rnd),
        "src_ip": lambda: "10.0.0.%d" % rnd.randint(0, 255) if rnd.random() < 0.8
        else _string(rnd, 64),
        "trunk": lambda: "trunk-%d" % rnd.randint(0, 9) if rnd.random() < 0.8
        else _string(rnd, 128),
    }
    for name, make in fields.items():
        if rnd.random() < 0.93:
            m.append((name, make()))
    rnd.shuffle(m)
    r = rnd.random()
    if r < 0.04:
        m.insert(rnd.randint(0, len(m)), (rnd.choice(list(fields)), "dup"))
    elif r < 0.08:
        m.insert(rnd.randint(0, len(m)), (rnd.choice([
            "extra", "x" * 40, S(b"\xff" * 40), S("\u00e9".encode() * 20), "", "A",
            "call_id\x00", "ts ", "\u4e2d" * 12 + "z"]), 1))
    elif r < 0.10:
        m.insert(rnd.randint(0, len(m)), (rnd.choice([1, b"a", None, True, 1.0, [], M()]), 1))
    return m


def _decode(mod: Any, data: Any, max_bytes: Any = 4096, now_ms: int = NOW) -> tuple:
    try:
        r = mod.decode_request(data, max_bytes, now_ms)
    except mod.RequestError as e:
        assert e.args == (e.message,)
        return ("refused", e.code, e.message)
    return ("ok", r.call_id, r.a, r.b, r.ts_ms, r.src_ip, r.trunk)


def _nested(depth: int, leaf: bytes, rnd: random.Random) -> bytes:
    out = leaf
    for _ in range(depth):
        out = rnd.choice((b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\xdf\x00\x00\x00\x01\x01")) \
            + out
    return out


def _frames(rnd: random.Random) -> Any:
    """Yield (frame, max_bytes) forever, cycling through the kinds of input."""
    heads = list(range(256))
    while True:
        kind = rnd.randrange(10)
        if kind <= 2:  # a request, untouched
            yield _enc(_request(rnd), rnd), 4096
        elif kind == 3:  # truncated
            f = _enc(_request(rnd), rnd)
            yield f[:rnd.randint(0, len(f))], 4096
        elif kind == 4:  # mutated, extended
            f = bytearray(_enc(_request(rnd), rnd))
            for _ in range(rnd.randint(1, 3)):
                op = rnd.randrange(3)
                i = rnd.randint(0, len(f))
                if op == 0 and f:
                    f[min(i, len(f) - 1)] = rnd.randrange(256)
                elif op == 1:
                    f[i:i] = bytes([rnd.randrange(256)])
                else:
                    del f[i:i + 1]
            yield bytes(f), 4096
        elif kind == 5:  # random bytes
            n = rnd.choice((0, 1, 2, 3, 5, 9, 17, 40))
            yield bytes([rnd.choice(heads)]) + rnd.randbytes(n), 4096
        elif kind == 6:  # deep nesting, as a value or as the frame
            d = rnd.randint(28, 36)
            leaf = rnd.choice((b"\x01", b"\x90", b"\x80", b"\xc1", b""))
            inner = _nested(d, leaf, rnd)
            if rnd.random() < 0.5:
                yield inner, 4096
            else:
                yield b"\x83\xa1a\xa1x\xa1b\xa1y\xa7call_id" + inner, 4096
        elif kind == 7:  # big declared lengths
            t = rnd.choice((0xC6, 0xC9, 0xDB, 0xDD, 0xDF, 0xDE, 0xDC, 0xDA, 0xC5, 0xC8))
            w = 4 if t in (0xC6, 0xC9, 0xDB, 0xDD, 0xDF) else 2
            n = rnd.choice(((1 << (8 * w)) - 1, 1 << (8 * w - 1), 3, 0, 1))
            body = bytes([t]) + n.to_bytes(w, "big") + rnd.randbytes(rnd.randint(0, 6))
            yield (body if rnd.random() < 0.5 else b"\x81\xa1a" + body), 4096
        elif kind == 8:  # wrong types, edge values (msgpack's own encoder too)
            m = _request(rnd)
            d: dict = {}
            for k, v in m:
                if isinstance(k, str) and not isinstance(v, S | X | M):
                    d[k] = v
            try:
                yield msgpack.packb(d, use_bin_type=rnd.random() < 0.8), 4096
            except (ValueError, TypeError, OverflowError):
                continue
        else:  # size limits
            f = _enc(_request(rnd), rnd)
            yield f, rnd.choice((0, len(f) - 1, len(f), len(f) + 1, 10))


def test_decode_request_fuzz() -> None:
    rnd = random.Random(3)
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    gen = _frames(rnd)
    n = 0
    for n in range(200_000):
        if n % 2000 == 0 and time.monotonic() > deadline:
            break
        frame, max_bytes = next(gen)
        want = _decode(py, frame, max_bytes)
        got = _decode(cy, frame, max_bytes)
        assert got == want, (frame, max_bytes)
        if rnd.random() < 0.05:
            assert _decode(cy, bytearray(frame), max_bytes) == want
        seen.add(want[1] if want[0] == "refused" else "ok")
    assert n > 20_000
    codes = {"ok", "too_large", "bad_msgpack", "not_a_map", "unknown_field", "duplicate_field",
             "bad_type", "bad_value", "missing_field"}
    assert codes <= seen, codes - seen


def test_decode_request_edges() -> None:
    def frame(**kw: Any) -> bytes:
        return msgpack.packb(kw)

    base = {"call_id": "c1", "a": "08031234567", "b": "+2348031234567"}
    cases = [
        b"", b"\xc1", b"\x80", b"\x90", b"\xa3abc", b"\xde", b"\xde\x00", b"\xdf\x00\x00\x00",
        b"\xdf\xff\xff\xff\xff", b"\x81", b"\x81\xa1a", b"\x81\xc1\x01", frame(**base) + b"\x00",
        frame(**base, ts=1.7e9), frame(**base, ts=1_700_000_000), frame(**base, ts=None),
        frame(**base, ts=-0.0), frame(**base, ts=1e11), frame(**base, ts=99_999_999_999),
        frame(**base, ts=math.nan), frame(**base, ts=True), frame(**base, src_ip=None),
        frame(**{**base, "call_id": ""}), frame(**{**base, "call_id": None}),
        frame(**{**base, "a": None, "b": None}), frame(**{**base, "b": "x" * 257}),
        frame(**base, trunk="t" * 128), frame(**base, trunk="t" * 129),
        frame(**base, src_ip="\u00e9" * 33), frame(a="x", b="y"), frame(call_id="c", a="x"),
        b"\x8f" + b"\xa1a\xc0" * 15, b"\x87" + b"".join(
            msgpack.packb(k) + msgpack.packb("v") for k in
            ("call_id", "a", "b", "ts", "src_ip", "trunk", "zz")),
        b"\x81\xa1a" + _nested(31, b"\x01", random.Random(0)),
        b"\x81\xa1a" + b"\x91" * 31 + b"\x01", b"\x81\xa1a" + b"\x91" * 32 + b"\x01",
        b"\x91" * 32 + b"\x01", b"\x91" * 33 + b"\x01", b"\x91" * 33,
        b"\x81\xd9\x28" + b"\xe4\xb8\xad" * 13 + b"z" + b"\x01",  # cut inside a character
        b"\x81\xa1a\xca\x7f\xc0\x00\x00", b"\x81\xa2ts\xca\x4e\xca\xb0\x00",
    ]
    for f in cases:
        for mb in (4096, 3, len(f), -1, 4096.5, 1 << 80):
            assert _decode(cy, f, mb) == _decode(py, f, mb), (f, mb)
    r = cy.decode_request(frame(**base), 4096, NOW)
    assert (r.call_id, r.a, r.b, r.ts_ms, r.src_ip, r.trunk) == \
        ("c1", "08031234567", "+2348031234567", NOW, "", "")
    assert isinstance(cy.RequestError("x", "y"), Exception)
    # Non-bytes frames are refused by both with a TypeError.
    for bad in ("\x80", 5, None):
        assert _outcome(cy.decode_request, bad, 4096, NOW)[1] == "TypeError"
        assert _outcome(py.decode_request, bad, 4096, NOW)[1] == "TypeError"


# ---------------------------------------------------------------------------------------------
# Reply frames
# ---------------------------------------------------------------------------------------------

_INTS = [0, 1, 31, 32, 127, 128, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
         2**63 - 1, 2**63, 2**64 - 1, -1, -31, -32, -33, -127, -128, -129, -32767, -32768,
         -32769, -(2**31) + 1, -(2**31), -(2**31) - 1, -(2**63)]
_STRS = ["", "a", "allow", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 65535, "x" * 65536,
         "\u00e9", "\u4e2d\u6587" * 20, "drop", "CRITICAL"]


def test_encode_reply_matches_packb() -> None:
    rnd = random.Random(4)
    for d in _INTS:
        for alert in ("", "id-1"):
            for mod in MODS:
                got = mod.encode_reply("drop", "masking", d, alert, "HIGH")
                want = {"verdict": "drop", "reason": "masking", "distinct": d}
                if alert:
                    want.update(alert_id=alert, severity="HIGH")
                assert got == msgpack.packb(want), (mod, d)
    for _ in range(3000):
        v, r, al, sv = (rnd.choice(_STRS) for _ in range(4))
        d = rnd.choice(_INTS)
        assert cy.encode_reply(v, r, d, al, sv) == py.encode_reply(v, r, d, al, sv)
        assert cy.encode_reply(v, r, d) == py.encode_reply(v, r, d)
        assert cy.encode_error(v, r) == py.encode_error(v, r) == \
            msgpack.packb({"error": v, "message": r})
    odd = [None, True, 1.5, b"raw", [1, "x"], 2**64, -(2**63) - 1, "5", object()]
    for d in odd:
        assert _outcome(cy.encode_reply, "a", "b", d) == \
            _outcome(py.encode_reply, "a", "b", d), d
    for s in ("\ud800", b"bytes", None, 3):
        assert _outcome(cy.encode_reply, s, "r", 1, s, s)[:2] == \
            _outcome(py.encode_reply, s, "r", 1, s, s)[:2]
        assert _outcome(cy.encode_error, s, s)[:2] == \
            _outcome(py.encode_error, s, s)[:2]


# ---------------------------------------------------------------------------------------------
# RESP
# ---------------------------------------------------------------------------------------------


def test_encode_command() -> None:
    rnd = random.Random(5)
    pool: list[Any] = [b"", b"GET", b"\r\n", bytes(range(256)), "", "SET", "\u00e9\u4e2d",
                       0, -1, 7, 2**63 - 1, -(2**63), 2**80, -(2**70), True, False,
                       bytearray(b"ba"), "k" * 600, b"v" * 70_000]
    assert cy.encode_command() == py.encode_command() == b"*0\r\n"
    for _ in range(5000):
        args = [rnd.choice(pool) for _ in range(rnd.randint(0, 30))]
        assert cy.encode_command(*args) == py.encode_command(*args)
    for bad in (1.5, None, "\ud800", [b"x"]):
        assert _outcome(cy.encode_command, "SET", bad) == \
            _outcome(py.encode_command, "SET", bad), bad


def _resp(v: Any, rnd: random.Random) -> bytes:
    if v is None:
        return rnd.choice((b"$-1\r\n", b"*-1\r\n"))
    if isinstance(v, int):
        return b":%d\r\n" % v
    if isinstance(v, tuple):  # an error reply
        return b"-" + v[0] + b"\r\n"
    if isinstance(v, bytes):
        if b"\r" not in v and b"\n" not in v and rnd.random() < 0.3:
            return b"+" + v + b"\r\n"
        return b"$%d\r\n%s\r\n" % (len(v), v)
    return b"*%d\r\n" % len(v) + b"".join(_resp(x, rnd) for x in v)


def _value(rnd: random.Random, depth: int = 0) -> Any:
    r = rnd.random()
    if r < 0.3 and depth < 4:
        return [_value(rnd, depth + 1) for _ in range(rnd.randint(0, 5))]
    return rnd.choice([
        None, 0, -1, 2**62, -(2**80), 10**30, b"", b"OK", b"a\r\nb", rnd.randbytes(5),
        (b"NOSCRIPT No matching script",), (b"ERR \xff\xfe bad",), (b"",),
    ])


def _canon(mod: Any, v: Any) -> Any:
    if isinstance(v, mod.RespError):
        return ("RespError", v.message)
    if isinstance(v, list):
        return [_canon(mod, x) for x in v]
    return v


def _parse(mod: Any, buf: Any, pos: int) -> tuple:
    try:
        v, end = mod.parse_reply(buf, pos)
    except Exception as e:
        return ("raise", type(e).__name__, str(e))
    return ("ok", _canon(mod, v), end, type(v).__name__)


def test_parse_reply_valid_and_split() -> None:
    rnd = random.Random(6)
    deadline = time.monotonic() + 60
    for i in range(3000):
        if i % 100 == 0 and time.monotonic() > deadline:
            break
        vals = [_value(rnd) for _ in range(rnd.randint(1, 3))]
        buf = b"".join(_resp(v, rnd) for v in vals)
        pos = 0
        for _ in vals:
            want = _parse(py, buf, pos)
            assert want[0] == "ok"
            assert _parse(cy, buf, pos) == want
            assert _parse(cy, bytearray(buf), pos) == _parse(py, bytearray(buf), pos) == want
            pos = want[2]
        assert pos == len(buf)
        # Every strict prefix of a reply is Incomplete, in both.
        one = _resp(vals[0], rnd)
        for k in range(len(one)):
            assert _parse(cy, one[:k], 0) == _parse(py, one[:k], 0) == ("raise", "Incomplete", "")
            assert _parse(cy, bytearray(b"xx" + one[:k]), 2) == ("raise", "Incomplete", "")
    for v in (2**64, -(2**63) - 1, 10**18, -(10**18), 999_999_999_999_999_999):
        assert _parse(cy, b":%d\r\n" % v, 0) == _parse(py, b":%d\r\n" % v, 0)


def test_parse_reply_garbage() -> None:
    rnd = random.Random(7)
    alphabet = b"$*:+-\r\n0123456789 _x\xff"
    fixed = [b"", b"\r\n", b"?\r\n", b"$\r\n", b"$x\r\n", b"$ 3 \r\nabc\r\n", b"$+3\r\nabc\r\n",
             b"$1_0\r\n0123456789\r\n", b"$3\r\nabcXY", b"*2\r\n:1\r\n", b"*-5\r\n", b"$-7\r\n",
             b"*99999999999999999999\r\n:1\r\n", b"$99999999999999999999\r\n", b":+5\r\n",
             b":-0\r\n", b":007\r\n", b": 1\r\n", b"*1\r\n?\r\n", b"-\xc3(\r\n", b"\xff\r\n"]
    cases = fixed + [bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12)))
                     for _ in range(20_000)]
    for buf in cases:
        for pos in (0, 1, len(buf), len(buf) + 3, -1, -len(buf) - 2):
            assert _parse(cy, buf, pos) == _parse(py, buf, pos), (buf, pos)
            assert _parse(cy, bytearray(buf), pos) == _parse(py, bytearray(buf), pos), (buf, pos)
    deep = b"*1\r\n" * 20_000 + b":1\r\n"
    assert _parse(cy, deep, 0)[:2] == _parse(py, deep, 0)[:2] == ("raise", "RecursionError")
    assert _parse(cy, memoryview(b":1\r\n"), 0) == _parse(py, memoryview(b":1\r\n"), 0)


def test_resp_error_class() -> None:
    for mod in MODS:
        e = mod.RespError("ERR x")
        assert e == mod.RespError("ERR x")
        assert e != mod.RespError("ERR y")
        assert e != "ERR x"
        assert (e == "ERR x") is False
        assert repr(e) == "RespError('ERR x')"
        assert e.message == "ERR x"
        with pytest.raises(TypeError):
            hash(e)
        with pytest.raises(AttributeError):
            e.other = 1  # type: ignore[attr-defined]
        assert issubclass(mod.Incomplete, Exception)


# ---------------------------------------------------------------------------------------------
# The decider, end to end with a synthetic store
# ---------------------------------------------------------------------------------------------

_SHA = "5e3b1a2f9c0d4e6f8a7b6c5d4e3f2a1b0c9d8e7f"


def _make(mod: Any, **kw: Any) -> Any:
    return mod.Decider(decide_sha=_SHA, alert_prefix="0123abcd-0000-4000-8000", **kw)


def _state(d: Any) -> tuple:
    return (dict(d.counts), d.noscript, d.counter, d.threshold, d.window_ms, d.mode,
            d.dedup_ttl_ms, d.block_ttl_ms, d.state_ttl_ms, d.sha, d.partitions,
            d.country_code, d.max_request_bytes, d.alert_prefix)


def _good_frame(rnd: random.Random) -> bytes:
    m = {"call_id": f"{rnd.getrandbits(40):x}@h", "a": _number(rnd), "b": _number(rnd),
         "src_ip": "10.1.2.3", "trunk": rnd.choice(("t1", "", "trunk-\u00e9"))}
    if rnd.random() < 0.7:
        m["ts"] = rnd.choice((NOW / 1000 + rnd.uniform(-5, 5), NOW // 1000, None))
    return msgpack.packb(m)


def _store_reply(mod: Any, rnd: random.Random) -> Any:
    """A synthetic store reply for one pipelined command (built with mod's RespError)."""
    if rnd.random() < 0.85:  # what decide.lua returns
        distinct = rnd.choice((0, 1, 4, 5, 7, 300, 70_000, 2**40))
        alert = rnd.choice((b"", b"", b"0123abcd-0000-4000-8000-000000000001"))
        return [rnd.choice((b"allow", b"drop", b"hold")),
                rnd.choice((b"clean", b"masking", b"whitelisted", b"blocked", b"odd")),
                distinct, alert, rnd.choice((b"", b"HIGH", b"CRITICAL")) if alert else b"",
                rnd.choice((0, 0, 1)),
                rnd.choice(([], [], [b"+2348031234567", b"+2348031234500"]))]
    return rnd.choice([
        mod.RespError("NOSCRIPT No matching script. Please use EVAL."),
        mod.RespError("ERR Error running script"), mod.RespError("OOM command not allowed"),
        None, b"OK", 3, [], [b"allow", b"clean", 0, b"", b"", 0],
        [b"allow", b"clean", 0, b"", b"", 0, [], b"extra"],
        [b"allow", b"clean", True, b"", b"", 0, []], [b"allow", b"clean", None, b"", b"", 0, []],
        [b"allow", b"clean", b"5", b"", b"", 0, []], [b"allow", b"clean", 2**64, b"", b"", 0, []],
        [b"allow", b"cl\xc3\xa9an", 1, b"id", b"LOW", 0, []],
        [b"drop", b"masking", 5, b"id-\xc3\xa9", b"HIGH", 1, [b"+234\xc3\xa9"]],
        [b"drop", b"masking", 5, b"id", b"HIGH", 0, None],
    ])


_BROKEN = [  # 7-element replies the twin cannot take apart: both must raise the same way
    [1, b"clean", 0, b"", b"", 0, []], [b"allow", b"clean", 0, b"", b"", 0, b"xy"],
    [b"\xff", b"clean", 0, b"", b"", 0, []], [b"allow", b"clean", object(), b"", b"", 0, []],
]


def _run_batch(ds: tuple, rnd: random.Random, frames: list[bytes], now_ms: int) -> None:
    for d in ds:
        d.begin(frames, now_ms, now_ms * 1000 + 123)
    pipes = [d.pipeline() for d in ds]
    assert pipes[0] == pipes[1]
    payload, n = pipes[0]
    if n:
        cmds, pos = [], 0
        while pos < len(payload):  # the payload is n well-formed RESP arrays
            c, pos = py.parse_reply(payload, pos)
            cmds.append(c)
        assert len(cmds) == n
    r = rnd.random()
    if r < 0.08:
        outs = [d.fail("store_unavailable", "detection store unavailable") for d in ds]
        assert outs[0] == outs[1]
        assert ds[0].blocks_to_write() == ds[1].blocks_to_write() == []
        return
    seed = rnd.random()
    replies = []
    for mod in MODS:  # the same replies, each built with its own module's RespError
        rr = random.Random(seed)
        replies.append([_store_reply(mod, rr) for _ in range(n)])
    if r < 0.12 and n:
        broken = rnd.choice(_BROKEN)
        i = rnd.randrange(n)
        for rep in replies:
            rep[i] = list(broken)
    outs = [_outcome(lambda d=d, rep=rep: d.finish(rep))
            for d, rep in zip(ds, replies, strict=True)]
    assert outs[0][:2] == outs[1][:2]
    if outs[0][0] == "ok":
        assert outs[0] == outs[1]
        assert ds[0].blocks_to_write() == ds[1].blocks_to_write()


@pytest.mark.parametrize("block_ttl", [0.0, 30.0])
def test_decider_end_to_end(block_ttl: float) -> None:
    rnd = random.Random(8 + int(block_ttl))
    ds = (_make(py, block_ttl=block_ttl, max_request_bytes=300),
          _make(cy, block_ttl=block_ttl, max_request_bytes=300))
    gen = _frames(rnd)
    deadline = time.monotonic() + 60
    for batch in range(3000):
        if batch % 100 == 0 and time.monotonic() > deadline:
            break
        frames = []
        for _ in range(rnd.randint(0, 12)):
            r = rnd.random()
            frames.append(_good_frame(rnd) if r < 0.7 else next(gen)[0] if r < 0.95
                          else b"\x81\xa1a" + b"x" * 400)
        if batch % 250 == 249:
            kw = {"threshold": rnd.choice((3, 5)), "window": rnd.choice((5.0, 2.5, 0.0015)),
                  "mode": rnd.choice(("block", "monitor")), "dedup_ttl": 32.0,
                  "block_ttl": rnd.choice((0.0, 30.0, 0.0004))}
            for d in ds:
                d.configure(**kw)
        _run_batch(ds, rnd, frames, NOW + batch)
        assert _state(ds[0]) == _state(ds[1])
    assert ds[0].counter > 100
    assert {"error", "store_error", "allow:clean", "dup"} <= set(ds[0].counts)
    assert ds[0].noscript in (True, False)


def test_decider_attributes_and_configure() -> None:
    for kw in ({}, {"threshold": "7", "window": 2, "mode": "monitor", "dedup_ttl": 0.5,
                    "block_ttl": 1.0005, "country_code": "1", "partitions": 3,
                    "max_request_bytes": 100}):
        a, b = _make(py, **kw), _make(cy, **kw)
        assert _state(a) == _state(b)
        for bad in ({"block_ttl": "x"}, {"window": None}, {"threshold": "q"}):
            args = {"threshold": 9, "window": 9.0, "mode": "z", "dedup_ttl": 9.0,
                    "block_ttl": 9.0, **bad}
            ea = _outcome(lambda a=a, args=args: a.configure(**args))
            eb = _outcome(lambda b=b, args=args: b.configure(**args))
            assert ea[:2] == eb[:2] and ea[0] == "raise"
            assert _state(a) == _state(b)  # nothing applied: all or nothing
            assert a.threshold != 9
        a.counts["x"] = 1
        b.counts["x"] = 1
        a.counter = b.counter = 41
        frames = [_good_frame(random.Random(i)) for i in range(8)] + [b"\x00", b""]
        for d in (a, b):
            d.begin(frames, NOW, 1)
        assert a.pipeline() == b.pipeline()
        assert a.fail("store_unavailable", "down") == b.fail("store_unavailable", "down")
        assert _state(a) == _state(b)
        assert a.blocks_to_write() == b.blocks_to_write() == []


def test_decider_blocks_and_noscript() -> None:
    frame = msgpack.packb({"call_id": "c-1", "a": "08031234567", "b": "+2348031234560",
                           "ts": NOW / 1000})
    for mod in MODS:
        d = _make(mod, block_ttl=30.0)
        d.begin([frame, b"\xc1"], NOW, 5)
        payload, n = d.pipeline()
        assert n == 1
        cmd, _ = mod.parse_reply(payload, 0)
        # The block list is a declared key of the script's own slot; no pre-read, ARGV[8] empty.
        tag = b"{acm.%d}:" % mod.partition_of("+2348031234560", 16)
        assert cmd[0] == b"EVALSHA" and cmd[2] == b"8" and cmd[10] == tag + b"k"
        assert cmd[18] == b""
        assert cmd[19] == b"0123abcd-0000-4000-8000-000000000001"
        out = d.finish([[b"drop", b"blocked", 0, b"al-9", b"HIGH", 0,
                         [b"+2348031234567", b"+2348031234500"]]])
        assert msgpack.unpackb(out[0]) == {"verdict": "drop", "reason": "blocked",
                                           "distinct": 0, "alert_id": "al-9",
                                           "severity": "HIGH"}
        assert msgpack.unpackb(out[1])["error"] == "bad_msgpack"
        assert d.blocks_to_write() == [("+2348031234567", NOW + 30_000, "al-9", "HIGH"),
                                       ("+2348031234500", NOW + 30_000, "al-9", "HIGH")]
        assert d.counts == {"drop:blocked": 1, "error": 1}
        d.begin([frame], NOW, 5)
        d.pipeline()
        out = d.finish([mod.RespError("NOSCRIPT No matching script")])
        assert d.noscript is True
        assert msgpack.unpackb(out[0]) == {"error": "store_error",
                                           "message": "NOSCRIPT No matching script"}


# ---------------------------------------------------------------------------------------------
# The decider with the gateway context (attribution, CLI origin, rate limits, fan-out)
# ---------------------------------------------------------------------------------------------

_REGISTRY = {
    "carriers": [{"id": "igw", "name": "IGW", "licence": "international_gateway",
                  "contact": "", "cli_rule": None},
                 {"id": "mno", "name": "MNO", "licence": "mno", "contact": "",
                  "cli_rule": "monitor"}],
    "gateways": [{"id": "igw-1", "carrier_id": "igw", "addresses": ["10.1.2.3", "10.9.0.0/16"],
                  "trunks": ["t1"], "rate_limit_cps": 3, "rate_window_s": 1.0},
                 {"id": "mno-1", "carrier_id": "mno", "addresses": ["10.1.2.0/24"],
                  "trunks": [], "rate_limit_cps": 0, "rate_window_s": 1.0}],
    "routes": [{"id": "igw-intl", "carrier_id": "igw", "gateway_id": None, "trunk": None,
                "direction": "international", "cli_rule": None},
               {"id": "mno-intl", "carrier_id": "mno", "gateway_id": "mno-1", "trunk": None,
                "direction": "international", "cli_rule": None}],
}


def _ctx_frame(rnd: random.Random) -> bytes:
    m = {"call_id": f"{rnd.getrandbits(40):x}@h", "a": rnd.choice((_number(rnd), "08031234567",
                                                                   "+447700900123")),
         "b": _number(rnd), "src_ip": rnd.choice(("10.1.2.3", "10.1.2.77", "10.9.8.7",
                                                  "192.0.2.1", "", "::ffff:10.1.2.3")),
         "trunk": rnd.choice(("t1", "", "other"))}
    return msgpack.packb(m)


def _side_reply(mod: Any, rnd: random.Random, kind: str) -> Any:
    r = rnd.random()
    if r < 0.1:
        return mod.RespError("NOSCRIPT No matching script. Please use EVAL.")
    if r < 0.15:
        return None
    if kind == "rate":
        return rnd.choice((0, 1, 1))
    return [rnd.choice((0, 3, 9)), rnd.choice((b"", b"al-f")), rnd.choice((b"", b"HIGH"))]


@pytest.mark.parametrize("fanout", [0, 4])
def test_decider_with_gateway_context_matches_the_twin(fanout: int) -> None:
    from acm_module.decide.gateway.context import GatewayContext

    rnd = random.Random(77 + fanout)
    ds = (_make(py), _make(cy))
    for d in ds:
        d.context = GatewayContext(_REGISTRY, fanout_threshold=fanout, rl_sha="r" * 40,
                                   fanout_sha="f" * 40)
    seen_pre: set[bytes] = set()
    for batch in range(400):
        frames = [_ctx_frame(rnd) if rnd.random() < 0.85 else _good_frame(rnd)
                  for _ in range(rnd.randint(0, 10))]
        for d in ds:
            d.begin(frames, NOW + batch, 7)
        rates = [d.rate_pipeline() for d in ds]
        assert rates[0] == rates[1]
        seed = rnd.random()
        for mod, d in zip(MODS, ds, strict=True):
            rr = random.Random(seed)
            d.rate_finish([_side_reply(mod, rr, "rate") for _ in range(rates[0][1])])
        pipes = [d.pipeline() for d in ds]
        assert pipes[0] == pipes[1]
        payload, n = pipes[0]
        cmds, pos = [], 0
        while pos < len(payload):
            c, pos = py.parse_reply(payload, pos)
            cmds.append(c)
        assert len(cmds) == n
        for c in cmds:
            if c[0] == b"EVALSHA" and c[1] == _SHA.encode():
                seen_pre.add(c[18])
        seed = rnd.random()
        outs = []
        for mod, d in zip(MODS, ds, strict=True):
            rr = random.Random(seed)
            reps = [(_side_reply(mod, rr, "fanout") if c[1] == b"f" * 40
                     else _store_reply(mod, rr)) for c in cmds]
            outs.append(_outcome(lambda d=d, reps=reps: d.finish(reps)))
        assert outs[0] == outs[1]
        assert _state(ds[0]) == _state(ds[1])
    assert {b"", b"drop|rate_limited", b"drop|national_cli_on_international_route",
            b"monitor|national_cli_on_international_route"} <= seen_pre
    counts = ds[0].counts
    assert any(k.startswith("@igw|") for k in counts) and any(k.startswith("@mno|")
                                                                for k in counts)
    assert "rate_error" in counts
    if fanout:
        assert "fanout_error" in counts
