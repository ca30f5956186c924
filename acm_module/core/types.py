"""What both hot-path twins share: the request and reply types, errors, severities, interfaces.

Pure Python and defined once, as msgpack-python shares `exceptions.py` and `ext.py` between
`_cmsgpack.pyx` and `fallback.py`: the compiled twin (ext/ -> acm_module._hotpath) and the
pure one (decide/engine/*_py.py) both import these, so an object made by one twin is the same type
as one made by the other. Imports nothing from acm_module, so any layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "FIELDS", "MAX_DEPTH", "SEVERITIES", "SEVERITY_CRITICAL", "SEVERITY_HIGH", "Attribution",
    "GatewayContext", "Incomplete", "Request", "RequestError", "RespError", "severity_of",
]

# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

MAX_DEPTH = 32  # nesting a request frame may have before it is refused as bad_msgpack
FIELDS = (b"call_id", b"a", b"b", b"ts", b"src_ip", b"trunk")


@dataclass(slots=True, eq=False)
class Request:
    """A decoded, validated request."""

    call_id: str
    a: str | None
    b: str | None
    ts_ms: int
    src_ip: str
    trunk: str


class RequestError(Exception):
    """A request frame was refused; `code` and `message` go back to the caller."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# RESP replies
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

    __hash__ = None  # type: ignore[assignment]  # equal by value, and mutable

    def __repr__(self) -> str:
        return f"RespError({self.message!r})"


# ---------------------------------------------------------------------------------------------
# Severity: the seed's bands by the largest distinct A-number count of an episode. decide.lua
# and fanout.lua compute the same bands inside the store (Lua cannot import this).
# ---------------------------------------------------------------------------------------------

SEVERITIES = ("LOW", "HIGH", "CRITICAL")  # in rising order
SEVERITY_HIGH = 5  # distinct A-numbers from which an alert is HIGH
SEVERITY_CRITICAL = 7  # ... and CRITICAL


def severity_of(distinct: int) -> str:
    """Return the seed's severity band for a distinct A-number count."""
    if distinct >= SEVERITY_CRITICAL:
        return "CRITICAL"
    if distinct >= SEVERITY_HIGH:
        return "HIGH"
    return "LOW"


# ---------------------------------------------------------------------------------------------
# The gateway context, as the deciders see it (acm_module.decide.gateway.context implements it)
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class Attribution(Protocol):
    """Where one call came from: what a decider reads of it."""

    carrier: str
    gateway: str
    rl_key: bytes | None  # the gateway's rate-limit key; None when it has no limit


@runtime_checkable
class GatewayContext(Protocol):
    """What a decider calls per request while a carrier registry is loaded or fan-out is on.

    `resolves`: attribute each request (resolve, pre_verdict, rate_command); `fanout`: add
    fanout_command after each decide.lua call. With neither, the decider never calls it.
    """

    resolves: bool
    fanout: bool

    def resolve(self, src_ip: str, trunk: str) -> Attribution | None:
        """Return the attribution of a request's source address and trunk, or None."""
        ...

    def pre_verdict(self, att: Attribution | None, a: str) -> bytes:
        """Return decide.lua's ARGV[8] for a call: b"" or b"<drop|monitor>|<reason>"."""
        ...

    def rate_command(self, att: Attribution, call_id: str, now_ms: int) -> bytes:
        """Return the RESP command checking a call against its gateway's rate limit."""
        ...

    def fanout_command(self, call_id: str, a: str, b: str, ts_ms: int, alert_id: str,
                       state_ttl_ms: int, att: Attribution | None) -> bytes:
        """Return the RESP command recording a call for the A-number fan-out rule."""
        ...
