"""Request and reply frames in pure Python: a strict msgpack subset decoder, reply encoders.

The pure-Python twin of ext/request.pyx and its readable reference. A request frame is a msgpack
map of the fields in types.FIELDS; anything else is refused with a RequestError whose code and
message go back to the caller.
"""

from __future__ import annotations

import math
import struct

import msgpack

from acm_module.engine.types import FIELDS, MAX_DEPTH, Request, RequestError

__all__ = ["FIELDS", "MAX_DEPTH", "decode_request", "encode_error", "encode_reply"]

_MAX_LEN = {b"call_id": 256, b"a": 256, b"b": 256, b"src_ip": 64, b"trunk": 128}
_MAX_TS = 1e11  # seconds; year 5138


class _Bad(Exception):
    pass


class _Str(bytes):
    """A msgpack str (as raw bytes), told apart from bin."""


_CONTAINER = object()  # a decoded array/map/ext/bin value nobody needs


def _need(data: bytes, pos: int, n: int) -> None:
    if pos + n > len(data):
        raise _Bad("truncated")


def _skip(data: bytes, pos: int, depth: int) -> tuple[object, int]:
    """Decode one object at pos; containers are validated and skipped. Return (value, end)."""
    _need(data, pos, 1)
    t = data[pos]
    pos += 1
    if t <= 0x7F:
        return t, pos
    if t >= 0xE0:
        return t - 0x100, pos
    if 0xA0 <= t <= 0xBF:
        n = t & 0x1F
        _need(data, pos, n)
        return _Str(data[pos:pos + n]), pos + n
    if 0x80 <= t <= 0x8F:
        return _container(data, pos, (t & 0x0F) * 2, depth)
    if 0x90 <= t <= 0x9F:
        return _container(data, pos, t & 0x0F, depth)
    if t == 0xC0:
        return None, pos
    if t == 0xC2:
        return False, pos
    if t == 0xC3:
        return True, pos
    if t == 0xC1:
        raise _Bad("reserved byte 0xc1")
    if t in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):
        w = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}[t]
        _need(data, pos, w)
        n = int.from_bytes(data[pos:pos + w], "big")
        pos += w
        _need(data, pos, n)
        if t >= 0xD9:
            return _Str(data[pos:pos + n]), pos + n
        return _CONTAINER, pos + n
    if t in (0xC7, 0xC8, 0xC9):
        w = {0xC7: 1, 0xC8: 2, 0xC9: 4}[t]
        _need(data, pos, w)
        n = int.from_bytes(data[pos:pos + w], "big")
        pos += w
        _need(data, pos, n + 1)
        return _CONTAINER, pos + n + 1
    if t == 0xCA:
        _need(data, pos, 4)
        return struct.unpack(">f", data[pos:pos + 4])[0], pos + 4
    if t == 0xCB:
        _need(data, pos, 8)
        return struct.unpack(">d", data[pos:pos + 8])[0], pos + 8
    if 0xCC <= t <= 0xCF:
        w = 1 << (t - 0xCC)
        _need(data, pos, w)
        return int.from_bytes(data[pos:pos + w], "big"), pos + w
    if 0xD0 <= t <= 0xD3:
        w = 1 << (t - 0xD0)
        _need(data, pos, w)
        return int.from_bytes(data[pos:pos + w], "big", signed=True), pos + w
    if 0xD4 <= t <= 0xD8:
        n = 1 << (t - 0xD4)
        _need(data, pos, n + 1)
        return _CONTAINER, pos + n + 1
    if t in (0xDC, 0xDD, 0xDE, 0xDF):
        w = 2 if t in (0xDC, 0xDE) else 4
        _need(data, pos, w)
        n = int.from_bytes(data[pos:pos + w], "big")
        pos += w
        return _container(data, pos, n * 2 if t >= 0xDE else n, depth)
    raise _Bad("unknown type byte")  # pragma: no cover - every byte value is handled above


def _container(data: bytes, pos: int, items: int, depth: int) -> tuple[object, int]:
    if depth >= MAX_DEPTH:
        raise _Bad(f"nesting deeper than {MAX_DEPTH}")
    if items > len(data) - pos:  # every item takes at least one byte
        raise _Bad("truncated")
    for _ in range(items):
        _, pos = _skip(data, pos, depth + 1)
    return _CONTAINER, pos


def _key_name(key: bytes) -> str:
    return key[:32].decode("utf-8", "replace")


def decode_request(data: bytes, max_bytes: int, now_ms: int) -> Request:
    """Decode and validate one request frame. Raises RequestError(code, message)."""
    if len(data) > max_bytes:
        raise RequestError("too_large", f"request of {len(data)} bytes exceeds {max_bytes}")
    if not data:
        raise RequestError("bad_msgpack", "empty frame")
    t = data[0]
    if (0x80 <= t <= 0x8F) or t in (0xDE, 0xDF):
        if t <= 0x8F:
            n, pos = t & 0x0F, 1
        else:
            w = 2 if t == 0xDE else 4
            if len(data) < 1 + w:
                raise RequestError("bad_msgpack", "invalid msgpack: truncated")
            n, pos = int.from_bytes(data[1:1 + w], "big"), 1 + w
        if n * 2 > len(data) - pos:
            raise RequestError("bad_msgpack", "invalid msgpack: truncated")
        pairs = []
        try:
            for _ in range(n):
                k, pos = _skip(data, pos, 1)
                v, pos = _skip(data, pos, 1)
                pairs.append((k, v))
        except _Bad as e:
            raise RequestError("bad_msgpack", f"invalid msgpack: {e}") from None
        if pos != len(data):
            raise RequestError("bad_msgpack", "invalid msgpack: trailing bytes")
    else:
        try:
            _, pos = _skip(data, 0, 0)
        except _Bad as e:
            raise RequestError("bad_msgpack", f"invalid msgpack: {e}") from None
        if pos != len(data):
            raise RequestError("bad_msgpack", "invalid msgpack: trailing bytes")
        raise RequestError("not_a_map", "request must be a msgpack map")

    got: dict[bytes, object] = {}
    for k, v in pairs:
        if type(k) is not _Str:
            raise RequestError("unknown_field", "map keys must be strings")
        key = bytes(k)
        if key not in _MAX_LEN and key != b"ts":
            raise RequestError("unknown_field", f"unknown field '{_key_name(key)}'")
        if key in got:
            raise RequestError("duplicate_field", f"duplicate field '{key.decode()}'")
        got[key] = v
        name = key.decode()
        if key == b"ts":
            if v is None:
                continue
            if type(v) is not int and type(v) is not float:
                raise RequestError("bad_type", "field 'ts' must be a number")
            if not (v >= 0 and v < _MAX_TS):  # also refuses NaN
                raise RequestError("bad_value", "field 'ts' must be finite seconds >= 0")
            continue
        if v is None:
            if key == b"call_id":
                raise RequestError("bad_type", "field 'call_id' must be a string")
            continue
        if type(v) is not _Str:
            raise RequestError("bad_type", f"field '{name}' must be a string")
        if len(v) > _MAX_LEN[key]:
            raise RequestError("bad_value", f"field '{name}' longer than {_MAX_LEN[key]} bytes")
        try:
            bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("bad_value", f"field '{name}' is not valid UTF-8") from None
        if key == b"call_id" and len(v) == 0:
            raise RequestError("bad_value", "field 'call_id' must not be empty")
    for req in (b"call_id", b"a", b"b"):
        if req not in got:
            raise RequestError("missing_field", f"missing field '{req.decode()}'")
    ts = got.get(b"ts")
    ts_ms = now_ms if ts is None else int(math.floor(ts * 1000.0))  # type: ignore[operator]
    a, b = got[b"a"], got[b"b"]
    ip, tr = got.get(b"src_ip"), got.get(b"trunk")
    return Request(
        bytes(got[b"call_id"]).decode(),  # type: ignore[arg-type]
        None if a is None else bytes(a).decode(),  # type: ignore[arg-type]
        None if b is None else bytes(b).decode(),  # type: ignore[arg-type]
        ts_ms,
        "" if ip is None else bytes(ip).decode(),  # type: ignore[arg-type]
        "" if tr is None else bytes(tr).decode(),  # type: ignore[arg-type]
    )


def encode_reply(verdict: str, reason: str, distinct: int, alert_id: str = "",
                 severity: str = "") -> bytes:
    """Encode a decision reply; alert_id and severity only when the decision has an alert."""
    if alert_id:
        return msgpack.packb({"verdict": verdict, "reason": reason, "distinct": distinct,
                              "alert_id": alert_id, "severity": severity})
    return msgpack.packb({"verdict": verdict, "reason": reason, "distinct": distinct})


def encode_error(code: str, message: str) -> bytes:
    """Encode an error reply."""
    return msgpack.packb({"error": code, "message": message})
