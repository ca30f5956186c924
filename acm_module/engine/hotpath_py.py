"""The decision hot path in pure Python: the readable reference and test oracle of ext/_hotpath.pyx.

No I/O here. A worker hands a batch of request frames to `Decider.begin()`, sends the bytes it
returns to the store in one round trip, and hands the parsed store replies to `Decider.finish()`,
which returns one reply frame per request, in order.

Both implementations must stay byte-for-byte identical in what they return; the suite runs on
both and compares them on fuzzed input.
"""

from __future__ import annotations

import math
import struct

import msgpack

# ---------------------------------------------------------------------------------------------
# Phone numbers
# ---------------------------------------------------------------------------------------------

_SEPARATORS = frozenset(" -.()\t")


def normalise(raw: str, country_code: str = "234") -> str | None:
    """Return `raw` as E.164 ("+<digits>"), or None when it is not a phone number.

    Accepts +CC..., CC..., national 0..., international 00..., sip:/sips:/tel: URIs (user part
    before '@', ';params' dropped), spaces, dashes, dots and parentheses. A number has 8 to 15
    digits and its country code does not start with 0.
    """
    s = raw.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1].strip()
    low = s[:5].lower()
    if low.startswith("sip:") or low.startswith("tel:"):
        s = s[4:]
    elif low.startswith("sips:"):
        s = s[5:]
    at = s.find("@")
    if at >= 0:
        s = s[:at]
    semi = s.find(";")
    if semi >= 0:
        s = s[:semi]
    kept = [ch for ch in s if ch not in _SEPARATORS]
    t = "".join(kept)
    if t.startswith("+"):
        d = t[1:]
    elif t.startswith("00"):
        d = t[2:]
    elif t.startswith("0"):
        d = country_code + t[1:]
    else:
        d = t
    n = len(d)
    if n < 8 or n > 15:
        return None
    for ch in d:
        if ch < "0" or ch > "9":
            return None
    if d[0] == "0":
        return None
    return "+" + d


def partition_of(number: str, partitions: int) -> int:
    """Return the key partition of a normalised number (FNV-1a 32 of its UTF-8 bytes)."""
    h = 0x811C9DC5
    for byte in number.encode():
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def severity_of(distinct: int) -> str:
    """Return the seed's severity band for a distinct A-number count."""
    if distinct >= 7:
        return "CRITICAL"
    if distinct >= 5:
        return "HIGH"
    return "LOW"


# ---------------------------------------------------------------------------------------------
# Request frames: a strict msgpack subset decoder
# ---------------------------------------------------------------------------------------------

MAX_DEPTH = 32
FIELDS = (b"call_id", b"a", b"b", b"ts", b"src_ip", b"trunk")
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


class Request:
    """A decoded, validated request."""

    __slots__ = ("a", "b", "call_id", "src_ip", "trunk", "ts_ms")

    def __init__(self, call_id: str, a: str | None, b: str | None, ts_ms: int,
                 src_ip: str, trunk: str) -> None:
        self.call_id = call_id
        self.a = a
        self.b = b
        self.ts_ms = ts_ms
        self.src_ip = src_ip
        self.trunk = trunk


class RequestError(Exception):
    """A request frame was refused; `code` and `message` go back to the caller."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


# ---------------------------------------------------------------------------------------------
# RESP (Redis protocol)
# ---------------------------------------------------------------------------------------------


class Incomplete(Exception):
    """More bytes are needed to parse a whole reply."""


class RespError:
    """An error reply from the store."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RespError) and other.message == self.message

    def __repr__(self) -> str:
        return f"RespError({self.message!r})"


def encode_command(*args: bytes | str | int) -> bytes:
    """Encode one command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def parse_reply(buf: bytes | bytearray, pos: int) -> tuple[object, int]:
    """Parse one RESP2 reply at pos; return (value, next pos). Raises Incomplete.

    Bulk strings come back as bytes, integers as int, nil as None, errors as RespError.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    t = buf[pos]
    line = buf[pos + 1:end]
    pos = end + 2
    if t == 0x24:  # $
        n = int(line)
        if n < 0:
            return None, pos
        if pos + n + 2 > len(buf):
            raise Incomplete
        return bytes(buf[pos:pos + n]), pos + n + 2
    if t == 0x3A:  # :
        return int(line), pos
    if t == 0x2A:  # *
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            v, pos = parse_reply(buf, pos)
            items.append(v)
        return items, pos
    if t == 0x2B:  # +
        return bytes(line), pos
    if t == 0x2D:  # -
        return RespError(line.decode("utf-8", "replace")), pos
    raise ValueError(f"unexpected RESP type byte {t!r}")


# ---------------------------------------------------------------------------------------------
# The decider
# ---------------------------------------------------------------------------------------------

# What a pending slot in a batch is waiting for.
_READY = 0     # reply already encoded (error, invalid number)
_SCRIPT = 1    # decide.lua result
_RECORD = 2    # plain XADD of a decision that changes no state (result ignored)


class Decider:
    """Decide a batch of request frames with one store round trip per batch."""

    def __init__(self, *, decide_sha: str, threshold: int = 5, window: float = 5.0,
                 mode: str = "block", dedup_ttl: float = 32.0, block_ttl: float = 0.0,
                 country_code: str = "234", partitions: int = 16,
                 max_request_bytes: int = 4096, alert_prefix: str = "00000000-0000-4000-8000"
                 ) -> None:
        self.sha = decide_sha.encode()
        self.country_code = country_code
        self.partitions = partitions
        self.max_request_bytes = max_request_bytes
        self.alert_prefix = alert_prefix
        self.counter = 0
        self.configure(threshold=threshold, window=window, mode=mode, dedup_ttl=dedup_ttl,
                       block_ttl=block_ttl)
        self._slots: list[list] = []
        self._blocks: list[tuple[str, int, str, str]] = []
        self.noscript = False
        self.counts: dict[str, int] = {}  # "verdict:reason", "dup", "error", store errors
        # acm_module.gateway.context.GatewayContext while a registry is loaded or fan-out is
        # on; None keeps the decision path exactly as without the gateway context.
        self.context = None
        self._rated: list[list] = []  # slots whose rate-limit check is in flight

    def configure(self, *, threshold: int, window: float, mode: str, dedup_ttl: float,
                  block_ttl: float) -> None:
        """Apply detection settings to the next batch, all or nothing."""
        threshold = int(threshold)
        window_ms = int(round(window * 1000))
        dedup_ttl_ms = int(round(dedup_ttl * 1000))
        block_ttl_ms = int(round(block_ttl * 1000))
        self.threshold = threshold
        self.window_ms = window_ms
        self.mode = mode
        self.dedup_ttl_ms = dedup_ttl_ms
        self.block_ttl_ms = block_ttl_ms
        self.state_ttl_ms = 2 * window_ms + 1000

    # -- phase 1 ---------------------------------------------------------------------------
    def begin(self, frames: list[bytes], now_ms: int, rx_us: int) -> None:
        """Decode a batch of request frames; afterwards call rate_pipeline(), pipeline()."""
        # slot: [kind, reply, request, a, b, attribution, gateway rule verdict]
        slots: list[list] = []
        ctx = self.context
        for frame in frames:
            try:
                req = decode_request(frame, self.max_request_bytes, now_ms)
            except RequestError as e:
                slots.append([_READY, encode_error(e.code, e.message), None, None, None, None,
                              b""])
                continue
            b = None if req.b is None else normalise(req.b, self.country_code)
            a = None if req.a is None else normalise(req.a, self.country_code)
            att = None
            if ctx is not None and ctx.resolves:
                att = ctx.resolve(req.src_ip, req.trunk)
            if b is None or a is None:
                reason = "invalid_b" if b is None else "unverifiable_cli"
                slots.append([_RECORD, encode_reply("allow", reason, 0), req, a, b, att, b""])
                continue
            pre = b"" if att is None else ctx.pre_verdict(att, a)
            slots.append([_SCRIPT, b"", req, a, b, att, pre])
        self._slots = slots
        self._rx_us = rx_us

    def rate_pipeline(self) -> tuple[bytes, int]:
        """Return (rate-limit checks of the batch, count); (b"", 0) when none is needed.

        Calls from rate-limited gateways need one round trip before pipeline(): the verdict of
        the sliding window decides what decide.lua records. A call the CLI-origin rule drops
        anyway is not checked, so it takes no capacity.
        """
        ctx = self.context
        self._rated = []
        if ctx is None or not ctx.resolves:
            return b"", 0
        out = []
        for s in self._slots:
            att = s[5]
            if s[0] == _SCRIPT and att is not None and att.rl_key is not None \
                    and not s[6].startswith(b"drop|"):
                out.append(ctx.rate_command(att, s[2].call_id, self._rx_us // 1000))
                self._rated.append(s)
        return b"".join(out), len(out)

    def rate_finish(self, replies: list) -> None:
        """Apply the rate-limit replies (in rate_pipeline() order) to the batch.

        A store error on a check admits the call (counted as `rate_error`): the limiter
        protects capacity, it must not take calls down with it.
        """
        for s, r in zip(self._rated, replies, strict=True):
            if r == 0:
                s[6] = b"drop|rate_limited"
            elif r != 1:
                self._store_reply_error(r, "rate_error")

    def pipeline(self) -> tuple[bytes, int]:
        """Return (commands for the batch's store round trip, number of replies to read)."""
        out: list[bytes] = []
        for s in self._slots:
            kind = s[0]
            if kind == _READY:
                continue
            req: Request = s[2]
            a, b = s[3], s[4]
            if kind == _RECORD:
                # A decision that touches no state still reaches the durable stream.
                num = b if b is not None else (req.b or "")
                p = partition_of(num, self.partitions)
                reason = "invalid_b" if b is None else "unverifiable_cli"
                out.append(encode_command(
                    b"XADD", b"{acm.%d}:s" % p, b"*", b"k", b"d", b"id", req.call_id,
                    b"a", a if a is not None else (req.a or ""), b"b", num, b"ts", req.ts_ms,
                    b"v", b"allow", b"r", reason, b"n", b"0", b"al", b"", b"sv", b"",
                    b"ip", req.src_ip, b"tr", req.trunk, b"rx", self._rx_us, b"md", self.mode,
                    b"cr", s[5].carrier if s[5] is not None else b"",
                    b"gw", s[5].gateway if s[5] is not None else b""))
                continue
            p = partition_of(b, self.partitions)
            tag = b"{acm.%d}:" % p
            bb = b.encode()
            att = s[5]
            self.counter += 1
            out.append(encode_command(
                b"EVALSHA", self.sha, b"8",
                tag + b"w:" + bb, tag + b"e:" + bb, tag + b"ea:" + bb, tag + b"wl:" + bb,
                tag + b"c:" + req.call_id.encode(), tag + b"s", tag + b"n", tag + b"k",
                req.call_id, a, bb, req.ts_ms, self.window_ms, self.threshold, self.mode,
                s[6], "%s-%012x" % (self.alert_prefix, self.counter), self.dedup_ttl_ms,
                self.state_ttl_ms, req.src_ip, req.trunk, self._rx_us, self.block_ttl_ms,
                att.carrier if att is not None else b"", att.gateway if att is not None else b""))
            ctx = self.context
            if ctx is not None and ctx.fanout:
                self.counter += 1
                out.append(ctx.fanout_command(
                    req.call_id, a, b, req.ts_ms, "%s-%012x" % (self.alert_prefix, self.counter),
                    self.state_ttl_ms, att))
        return b"".join(out), len(out)

    def _store_reply_error(self, r: object, key: str) -> None:
        """Count a side script's error reply (rate limit, fan-out); note a lost script."""
        if isinstance(r, RespError) and r.message.startswith("NOSCRIPT"):
            self.noscript = True
        self.counts[key] = self.counts.get(key, 0) + 1

    # -- phase 2 ---------------------------------------------------------------------------
    def finish(self, replies: list) -> list[bytes]:
        """Turn the store's replies (in pipeline order) into one reply frame per request.

        A store error for one request becomes an error reply for that request alone.
        """
        out: list[bytes] = []
        i = 0
        self.noscript = False
        self._blocks = []
        counts = self.counts
        ctx = self.context
        fanout = ctx is not None and ctx.fanout
        for s in self._slots:
            kind = s[0]
            if kind == _READY:
                out.append(s[1])
                counts["error"] = counts.get("error", 0) + 1
                continue
            r = replies[i]
            i += 1
            if kind == _SCRIPT and fanout:
                f = replies[i]
                i += 1
                if isinstance(f, RespError) or not isinstance(f, list):
                    self._store_reply_error(f, "fanout_error")
            att = s[5]
            if kind == _RECORD:
                if isinstance(r, RespError):
                    out.append(encode_error("store_error", r.message))
                    counts["store_error"] = counts.get("store_error", 0) + 1
                else:
                    out.append(s[1])
                    key = "allow:invalid_b" if s[4] is None else "allow:unverifiable_cli"
                    counts[key] = counts.get(key, 0) + 1
                    if att is not None:
                        key = "@" + att.carrier + "|" + key
                        counts[key] = counts.get(key, 0) + 1
                continue
            if isinstance(r, RespError) or not isinstance(r, list) or len(r) != 7:
                msg = r.message if isinstance(r, RespError) else "unexpected store reply"
                if msg.startswith("NOSCRIPT"):
                    self.noscript = True
                out.append(encode_error("store_error", msg))
                counts["store_error"] = counts.get("store_error", 0) + 1
                continue
            verdict, reason = r[0].decode(), r[1].decode()
            alert_id = r[3].decode()
            sev = r[4].decode()
            out.append(encode_reply(verdict, reason, r[2], alert_id, sev))
            key = "dup" if r[5] else verdict + ":" + reason
            counts[key] = counts.get(key, 0) + 1
            if att is not None:
                key = "@" + att.carrier + "|" + key
                counts[key] = counts.get(key, 0) + 1
            if r[6]:
                exp = s[2].ts_ms + self.block_ttl_ms
                for m in r[6]:
                    self._blocks.append((m.decode(), exp, alert_id, sev))
        return out

    def fail(self, code: str, message: str) -> list[bytes]:
        """Return the batch's replies when its store round trip failed as a whole."""
        err = encode_error(code, message)
        out: list[bytes] = []
        for s in self._slots:
            if s[0] == _READY:
                out.append(s[1])
                self.counts["error"] = self.counts.get("error", 0) + 1
            else:
                out.append(err)
                self.counts[code] = self.counts.get(code, 0) + 1
        self._blocks = []
        return out

    def blocks_to_write(self) -> list[tuple[str, int, str, str]]:
        """Return (a_number, expiry_ms, alert_id, severity) that the last batch asks to block."""
        return self._blocks
