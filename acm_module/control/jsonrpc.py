"""JSON-RPC 2.0 as OpenSIPS MI speaks it: one request object in, one response object out.

No I/O here: the transports (server.py) hand in bytes and send back what this returns.
Notifications (no "id") get no response, as the spec says; OpenSIPS's event_datagram sends its
events that way.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Server errors (-32000 .. -32099), ours:
STORE_UNAVAILABLE = -32000
UNAUTHORIZED = -32001
CONFIG_INVALID = -32002
CONFLICT = -32003
NOT_FOUND = -32004
REPLY_TOO_LARGE = -32005
BUSY = -32006  # every MI HTTP connection slot is answering a request: retry

MAX_REQUEST_BYTES = 65536

_NO_ID = object()
# Python refuses to turn longer digit strings into an int (CVE-2020-10735); such a number is
# kept as a HugeInt so it becomes a clear error where it is used instead of no reply at all.
_MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300


class HugeInt:
    """A JSON integer too long for int(): no parameter accepts it."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"

    __str__ = __repr__


class _DuplicateKey(ValueError):
    pass


def parse_int(text: str) -> int | HugeInt:
    """json's parse_int: an int, or a HugeInt past Python's digit limit."""
    return HugeInt(text) if len(text) > _MAX_INT_DIGITS else int(text)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a dict, or _DuplicateKey (a ValueError) naming the key."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return obj


class MIError(Exception):
    """A JSON-RPC error to return to the caller (code, message, optional data)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-RPC `error` member."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


def bad_params(message: str, data: Any = None) -> MIError:
    """Return an invalid-params (-32602) error."""
    return MIError(INVALID_PARAMS, message, data)


@dataclass
class Request:
    """One decoded JSON-RPC request."""

    method: str
    params: dict[str, Any] | list[Any]
    id: Any = _NO_ID

    @property
    def is_notification(self) -> bool:
        """Say whether the caller expects no response (no "id" member)."""
        return self.id is _NO_ID


def parse(raw: bytes) -> Request:
    """Decode one request. Raises MIError (-32700 or -32600) with id unknown."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise MIError(INVALID_REQUEST, f"request larger than {MAX_REQUEST_BYTES} bytes")
    try:
        obj = json.loads(raw, object_pairs_hook=unique_keys, parse_int=parse_int)
    except _DuplicateKey as e:
        # As the request decoder refuses a duplicate field: which one wins is nobody's guess.
        raise _with_id(MIError(INVALID_REQUEST, f"duplicate key {str(e)[:64]!r}"),
                       _lone_id(raw)) from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MIError(PARSE_ERROR, f"parse error: {e}") from e
    if isinstance(obj, list):
        raise MIError(INVALID_REQUEST, "batch requests are not supported")
    if not isinstance(obj, dict):
        raise MIError(INVALID_REQUEST, "a request is a JSON object")
    rid = obj.get("id", _NO_ID)
    if rid is not _NO_ID and (isinstance(rid, bool) or not (
            rid is None or isinstance(rid, str | int)
            or (isinstance(rid, float) and math.isfinite(rid)))):
        raise MIError(INVALID_REQUEST, "id must be a string, a finite number or null")
    if obj.get("jsonrpc") != "2.0":
        raise _with_id(MIError(INVALID_REQUEST, 'jsonrpc must be "2.0"'), rid)
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise _with_id(MIError(INVALID_REQUEST, "method must be a non-empty string"), rid)
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict | list):
        raise _with_id(MIError(INVALID_REQUEST, "params must be an object or an array"), rid)
    return Request(method=method, params=params, id=rid)


def _lone_id(raw: bytes) -> Any:
    """Return the id of a body refused for a duplicate key, when its top level has exactly one
    valid id (the reply can then still be matched); else _NO_ID."""
    objects: list[list[tuple[str, Any]]] = []

    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(pairs)  # built innermost first: the request object comes last
        return dict(pairs)

    try:
        obj = json.loads(raw, object_pairs_hook=keep, parse_int=parse_int)
    except (ValueError, RecursionError):  # also nested too deep after the duplicate
        return _NO_ID
    ids = [v for k, v in objects[-1] if k == "id"] if isinstance(obj, dict) else []
    if len(ids) == 1 and (isinstance(ids[0], str) or (
            isinstance(ids[0], int | float) and not isinstance(ids[0], bool)
            and math.isfinite(ids[0]))):
        return ids[0]
    return _NO_ID


def _with_id(err: MIError, rid: Any) -> MIError:
    err.request_id = rid  # type: ignore[attr-defined]
    return err


def error_id(err: MIError) -> Any:
    """Return the request id an early (parse-stage) error belongs to, or None."""
    rid = getattr(err, "request_id", None)
    return None if rid is _NO_ID else rid


def result(rid: Any, value: Any) -> bytes:
    """Encode a success response."""
    return _dump({"jsonrpc": "2.0", "result": value, "id": None if rid is _NO_ID else rid})


def error(rid: Any, err: MIError) -> bytes:
    """Encode an error response."""
    return _dump({"jsonrpc": "2.0", "error": err.to_json(),
                  "id": None if rid is _NO_ID else rid})


def _dump(obj: dict[str, Any]) -> bytes:
    try:  # strict JSON: NaN and Infinity are not JSON, whatever Python's default says
        return json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False).encode()
    except (ValueError, RecursionError):
        err = {"code": INTERNAL_ERROR, "message": "internal error: reply not encodable"}
        return json.dumps({"jsonrpc": "2.0", "error": err, "id": None},
                          separators=(",", ":")).encode()


def valid_text(s: str) -> str:
    """Return s if it is valid Unicode text (no lone surrogates). Raises ValueError."""
    try:
        s.encode()
    except UnicodeEncodeError as e:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from e
    return s


def param_str(v: Any) -> str:
    """Parse an MI string parameter (numbers are accepted as their text)."""
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValueError("must be a string")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a string")
    return valid_text(str(v))


def param_bool(v: Any) -> bool:
    """Parse an MI boolean parameter (true/false, 1/0, yes/no, on/off)."""
    if isinstance(v, bool):
        return v
    if not isinstance(v, str | int):
        raise ValueError("must be true or false")
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")
