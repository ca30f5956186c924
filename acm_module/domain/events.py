"""Call events of the Fraud context, validated."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from acm_module.domain.numbers import normalise


class InvalidCallEvent(ValueError):
    """A call event breaks a domain rule."""


@dataclass(frozen=True)
class CallEvent:
    """One INVITE seen by the detector: normalised numbers, call time in seconds."""

    call_id: str
    a_number: str | None  # None: the CLI is not a verifiable number
    b_number: str
    ts: float
    source_ip: str | None = None
    trunk: str | None = None

    @classmethod
    def create(cls, call_id: str, a_raw: str | None, b_raw: str | None, ts: float,
               source_ip: str | None = None, trunk: str | None = None,
               country_code: str = "234") -> CallEvent:
        """Validate and normalise; raise InvalidCallEvent naming the broken rule."""
        if not isinstance(call_id, str) or not call_id or len(call_id.encode()) > 256:
            raise InvalidCallEvent("call_id must be a non-empty string of at most 256 bytes")
        b = normalise(b_raw, country_code)
        if b is None:
            raise InvalidCallEvent(f"B-number {b_raw!r} is not a phone number")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) \
                or ts < 0:
            raise InvalidCallEvent("ts must be finite seconds >= 0")
        if source_ip:
            try:
                ipaddress.ip_address(source_ip)
            except ValueError as e:
                raise InvalidCallEvent(f"source_ip {source_ip!r} is not an IP address") from e
        return cls(call_id, normalise(a_raw, country_code), b, float(ts), source_ip or None,
                   trunk or None)
