"""Typed stream records: parse what decide.lua and the worker append, reject what is malformed.

Parsing is strict on purpose: a record that does not parse is poison for every sink that needs
it and goes to the dead-letter stream with the reason, instead of reaching a database half-valid.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from acm_module.core.errors import AcmError
from acm_module.core.types import SEVERITIES

VERDICTS = frozenset({"allow", "drop"})
REASONS = frozenset({"clean", "masking", "whitelisted", "blocked", "invalid_b", "unverifiable_cli",
                     "rate_limited", "national_cli_on_international_route"})
# Reasons that mean the call is fraud (call_events.fraud_detected). A rate-limited call is not:
# the limit is about capacity. A national CLI on an international route is masking by definition.
FRAUD_REASONS = frozenset({"masking", "blocked", "national_cli_on_international_route"})
ALERT_OPS = frozenset({"open", "update"})
MODES = frozenset({"block", "monitor"})
ALERT_TYPES = ("masking", "fanout")  # the stream's `typ` (docs/GATEWAY.md)
# The fraud_alerts / ClickHouse `alert_type` value of each stream type (the seed's vocabulary).
ALERT_TYPE_COLUMN = {"masking": "MULTICALL_MASKING", "fanout": "MULTICALL_FANOUT"}
# Carrier and gateway ids (docs/GATEWAY.md); empty when the call came from no registered gateway.
_ATTR_ID = re.compile(r"[A-Za-z0-9._-]{0,64}")
# Every call timestamp fits a signed 64-bit microsecond count with room to spare.
_MAX_TS_MS = 9_000_000_000_000


class RecordError(AcmError, ValueError):
    """A stream record is malformed (poison): it can never be written."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision (`k=d`)."""

    sid: str  # "<partition stream>/<entry id>": unique, and the same on every replay
    call_id: str
    a: str
    b: str
    ts_ms: int
    verdict: str
    reason: str
    distinct: int
    alert_id: str
    severity: str
    src_ip: str
    trunk: str
    rx_us: int
    mode: str
    carrier_id: str = ""  # "" when unknown, and for records written before attribution
    gateway_id: str = ""


@dataclass(frozen=True, slots=True)
class AlertChange:
    """One alert change (`k=a`); a higher `ver` of the same alert supersedes a lower one.

    A masking alert is about one B-number (`b`) and the A-numbers that called it; a fan-out
    alert about one A-number (`a`, also the only member of `a_numbers`) and the B-numbers it
    called (`b_numbers`, the record's `an`), with `b` empty.
    """

    sid: str
    alert_id: str
    op: str
    b: str
    severity: str
    distinct: int
    a_numbers: tuple[str, ...]
    first_ms: int
    last_ms: int
    ver: int
    window_ms: int
    block_ttl_ms: int
    typ: str = "masking"
    carrier_id: str = ""
    gateway_id: str = ""
    a: str = ""  # the fan-out's A-number ("" for masking)
    b_numbers: tuple[str, ...] = ()  # the fan-out's B-numbers (empty for masking)


def _int(f: dict[str, str], name: str, lo: int = 0, hi: int = _MAX_TS_MS) -> int:
    raw = f.get(name)
    if raw is None:
        raise RecordError(f"missing field {name!r}")
    try:
        v = int(raw)
    except ValueError:
        raise RecordError(f"field {name!r} is not an integer: {raw[:40]!r}") from None
    if not lo <= v <= hi:
        raise RecordError(f"field {name!r} out of range: {v}")
    return v


def _choice(f: dict[str, str], name: str, allowed: frozenset[str], empty_ok: bool = False) -> str:
    v = f.get(name)
    if v is None:
        raise RecordError(f"missing field {name!r}")
    if v not in allowed and not (empty_ok and v == ""):
        raise RecordError(f"field {name!r} has an unknown value: {v[:40]!r}")
    return v


def _str(f: dict[str, str], name: str, max_len: int = 512, required: bool = True) -> str:
    v = f.get(name)
    if v is None:
        if required:
            raise RecordError(f"missing field {name!r}")
        return ""
    if len(v) > max_len:
        raise RecordError(f"field {name!r} longer than {max_len}")
    return v


def _uuid(f: dict[str, str], name: str, empty_ok: bool = False) -> str:
    v = f.get(name)
    if v is None:
        raise RecordError(f"missing field {name!r}")
    if v == "" and empty_ok:
        return ""
    try:
        return str(uuid.UUID(v))
    except ValueError:
        raise RecordError(f"field {name!r} is not a UUID: {v[:40]!r}") from None


def _attr_id(f: dict[str, str], name: str) -> str:
    """Return a carrier/gateway id field: absent (a record older than attribution) is ""."""
    v = f.get(name)
    if v is None:
        return ""
    if not _ATTR_ID.fullmatch(v):
        raise RecordError(f"field {name!r} is not an id of 0-64 [A-Za-z0-9._-]: {v[:40]!r}")
    return v


def fields(raw: dict[bytes, bytes] | list[bytes]) -> dict[str, str]:
    """Return a stream entry's fields (redis-py's dict, or the flat [name, value, ...] list of
    a raw reply) as a dict of strings."""
    if isinstance(raw, dict):
        return {k.decode(): v.decode() for k, v in raw.items()}
    return {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw) - 1, 2)}


def parse_decision(sid: str, f: dict[str, str]) -> Decision:
    """Return the Decision of a `k=d` record's fields. Raises RecordError."""
    # The writer parses every decision: one pass with direct lookups, helpers only on error.
    try:
        call_id, a, b, v, r, sv, md = f["id"], f["a"], f["b"], f["v"], f["r"], f["sv"], f["md"]
        ts, n, rx = int(f["ts"]), int(f["n"]), int(f["rx"])
    except KeyError as e:
        raise RecordError(f"missing field {e.args[0]!r}") from None
    except ValueError:
        for name in ("ts", "n", "rx"):
            _int(f, name, -(1 << 63), 1 << 63)
        raise
    if not call_id or len(call_id) > 512 or len(a) > 512 or len(b) > 512:
        raise RecordError("call id empty, or a field longer than 512")
    if not 0 <= ts <= _MAX_TS_MS or not 0 <= n < 1 << 31 or not 0 <= rx <= _MAX_TS_MS * 1000:
        raise RecordError(f"ts/n/rx out of range: {ts}/{n}/{rx}")
    if v not in VERDICTS or r not in REASONS or md not in MODES or (sv and sv not in SEVERITIES):
        raise RecordError(f"unknown verdict/reason/severity/mode: {v!r}/{r!r}/{sv!r}/{md!r}"[:200])
    al = f.get("al") or ""
    return Decision(
        sid=sid, call_id=call_id, a=a, b=b, ts_ms=ts, verdict=v, reason=r, distinct=n,
        alert_id=_uuid(f, "al") if al else "", severity=sv,
        src_ip=_str(f, "ip", 64, False), trunk=_str(f, "tr", 128, False), rx_us=rx, mode=md,
        carrier_id=_attr_id(f, "cr"), gateway_id=_attr_id(f, "gw"))


def parse_alert(sid: str, f: dict[str, str]) -> AlertChange:
    """Return the AlertChange of a `k=a` record's fields. Raises RecordError.

    A record without `typ` (written before fan-out existed) is a masking alert.
    """
    an = _str(f, "an", 1 << 20)
    numbers = tuple(x for x in an.split(",") if x)
    first, last = _int(f, "t0"), _int(f, "t1")
    if first > last:
        raise RecordError(f"first detection {first} after last {last}")
    typ = f.get("typ", "masking")
    b = _str(f, "b", 64)
    if typ == "masking":
        if not b:
            raise RecordError("field 'b' is empty in a masking alert")
        a, a_numbers, b_numbers = "", numbers, ()
    elif typ == "fanout":
        a = _str(f, "a", 64)
        if not a or b:
            raise RecordError("a fan-out alert needs a non-empty 'a' and an empty 'b'")
        a_numbers, b_numbers = (a,), numbers
    else:
        raise RecordError(f"field 'typ' has an unknown value: {typ[:40]!r}")
    return AlertChange(
        sid=sid, alert_id=_uuid(f, "al"), op=_choice(f, "op", ALERT_OPS), b=b,
        severity=_choice(f, "sv", SEVERITIES), distinct=_int(f, "n", 1, 1 << 31),
        a_numbers=a_numbers, first_ms=first, last_ms=last, ver=_int(f, "ver", 1, 1 << 31),
        window_ms=_int(f, "wms", 0, 1 << 31), block_ttl_ms=_int(f, "blk", 0, 1 << 40),
        typ=typ, carrier_id=_attr_id(f, "cr"), gateway_id=_attr_id(f, "gw"), a=a,
        b_numbers=b_numbers)


def latest_versions(alerts: list[AlertChange]) -> list[AlertChange]:
    """Return one change per alert, the highest version (what a sink needs to write)."""
    best: dict[str, AlertChange] = {}
    for a in alerts:
        cur = best.get(a.alert_id)
        if cur is None or a.ver > cur.ver:
            best[a.alert_id] = a
    return list(best.values())
