"""End the attack's calls that are already up, through OpenSIPS MI `dlg_end_dlg`.

Which calls: those the decision path *allowed* as clean (verdict allow, reason clean) from the
alert's A-numbers to its B-number within the alert's window (first detection - window .. last
detection). Their Call-IDs come from the decision records of the B-number's partition stream,
read backwards from the alert record. The routing script creates a dialog for every allowed
INVITE, so each of them is a dialog OpenSIPS can end.

OpenSIPS 3.x (modules/dialog, `dlg_end_dlg`): params `dialog_id` (the numeric dialog id *or* the
SIP Call-ID) and optional `extra_hdrs` (added to both BYEs, CRLF-terminated). It answers
`"result": "OK"`, or the JSON-RPC errors 404 "Requested Dialog not found" (already over),
403 (backup node of a replicated dialog) and 500 "Operation failed"; -32602 for bad params.
A dialog still ringing is CANCELled instead. mi_http answers HTTP 200 for results and errors
alike; mi_datagram sends the same JSON back to the sender's address.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from acm_module.actions.errors import MIReplyError, MIUnavailable
from acm_module.core import records
from acm_module.core.records import AlertChange
from acm_module.core.redis import Client

log = logging.getLogger("acm.actions.disconnect")

END_COMMAND = "dlg_end_dlg"
NOT_FOUND = 404
_ids = itertools.count(1)


def reason_header(alert_id: str, cause: int = 21) -> str:
    """Return the `extra_hdrs` value: a Q.850 Reason header naming the alert, CRLF-terminated."""
    return f'Reason: Q.850;cause={int(cause)};text="acm masking alert {alert_id}"\r\n'


class OpenSIPSMI:
    """A JSON-RPC 2.0 client of OpenSIPS's MI: mi_http (`http://host:8888/mi`) or mi_datagram
    (`udp:host:port`, `unix:/path`). One request at a time; not thread-safe."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = url.strip()
        self.timeout = timeout
        parsed = urllib.parse.urlsplit(self.url)
        self.kind = parsed.scheme.lower()
        if self.kind in ("http", "https"):
            self._target: Any = self.url
        elif self.kind == "udp":
            host, _, port = (parsed.netloc or parsed.path).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"opensips_mi_url {url!r}: expected udp:host:port")
            self._target = (host.strip("[]"), int(port))
        elif self.kind == "unix":
            self._target = parsed.path or self.url[len("unix:"):]
        else:
            raise ValueError(f"opensips_mi_url {url!r}: expected http(s)://, udp: or unix:")

    def execute(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Run one MI command and return its `result`.

        Raises MIUnavailable (no answer in time, unreachable) or MIReplyError (a JSON-RPC error).
        """
        rid = next(_ids)
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params:
            body["params"] = params
        raw = json.dumps(body).encode()
        http = self.kind in ("http", "https")
        reply = self._http(raw) if http else self._datagram(raw, rid)
        if "error" in reply:
            err = reply["error"] or {}
            raise MIReplyError(int(err.get("code", 0)), str(err.get("message", "")),
                               err.get("data"))
        if "result" not in reply:
            raise MIUnavailable(f"OpenSIPS MI reply without result or error: {reply!r:.200}")
        return reply["result"]

    def _http(self, raw: bytes) -> dict[str, Any]:
        req = urllib.request.Request(self._target, raw, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:  # 400/405/500 with no JSON body
            raise MIUnavailable(f"OpenSIPS MI HTTP {e.code}") from e
        except (OSError, ValueError) as e:
            raise MIUnavailable(f"OpenSIPS MI {self._target}: {e}") from e
        return _decode(data)

    def _datagram(self, raw: bytes, rid: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        tmp: tempfile.TemporaryDirectory[str] | None = None
        try:
            if self.kind == "unix":
                # mi_datagram replies to the sender's address: bind one of our own.
                tmp = tempfile.TemporaryDirectory(prefix="acm-osmi-")
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                s.bind(os.path.join(tmp.name, "reply.sock"))
            else:
                fam = socket.AF_INET6 if ":" in self._target[0] else socket.AF_INET
                s = socket.socket(fam, socket.SOCK_DGRAM)
            with s:
                s.sendto(raw, self._target)
                while True:  # skip a late reply to an earlier, timed-out request
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise MIUnavailable(f"OpenSIPS MI {self.url}: no reply in "
                                            f"{self.timeout:g}s")
                    s.settimeout(left)
                    reply = _decode(s.recv(65535))
                    if reply.get("id") == rid:
                        return reply
        except MIUnavailable:
            raise
        except TimeoutError as e:
            raise MIUnavailable(f"OpenSIPS MI {self.url}: no reply in {self.timeout:g}s") from e
        except OSError as e:
            raise MIUnavailable(f"OpenSIPS MI {self.url}: {e}") from e
        finally:
            if tmp is not None:
                tmp.cleanup()


def _decode(data: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(data)
    except ValueError as e:
        raise MIUnavailable(f"OpenSIPS MI reply is not JSON: {data[:100]!r}") from e
    if not isinstance(reply, dict):
        raise MIUnavailable(f"OpenSIPS MI reply is not an object: {data[:100]!r}")
    return reply


# -- which calls ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackCall:
    """An allowed call of the attack, still possibly up."""

    call_id: str
    a: str
    ts_ms: int


def entry_ms(entry_id: str) -> int:
    """Return the millisecond part of a stream entry id."""
    return int(entry_id.split("-", 1)[0])


def find_attack_calls(conn: Client, alert: AlertChange, *, page: int = 1000,
                      max_scan: int = 200_000, slack_ms: int = 30_000) -> list[AttackCall]:
    """Return the clean, allowed calls from the alert's A-numbers to its B-number in its window.

    Reads the partition stream backwards from the alert record (`alert.sid` is
    "<stream>/<entry id>") until entries are older than the window plus `slack_ms` of append
    time, or `max_scan` entries. Raises StoreError.
    """
    stream, _, alert_entry = alert.sid.partition("/")
    a_numbers = set(alert.a_numbers)
    lo_ts = alert.first_ms - alert.window_ms
    stop_ms = entry_ms(alert_entry) - alert.window_ms - (alert.last_ms - alert.first_ms) - slack_ms
    found: dict[str, AttackCall] = {}
    end = "(" + alert_entry
    scanned = 0
    while scanned < max_scan:
        raw = conn.xrevrange(stream, end, "-", count=page)
        if not raw:
            break
        for eid, entry in raw:
            scanned += 1
            f = records.fields(entry)
            if f.get("k") != "d" or f.get("b") != alert.b:
                continue
            try:
                d = records.parse_decision(f"{stream}/{eid.decode()}", f)
            except records.RecordError:
                continue  # poison: the writer dead-letters it
            if (d.verdict == "allow" and d.reason == "clean" and d.a in a_numbers
                    and lo_ts <= d.ts_ms <= alert.last_ms):
                found.setdefault(d.call_id, AttackCall(d.call_id, d.a, d.ts_ms))
        last = raw[-1][0].decode()
        if entry_ms(last) < stop_ms or len(raw) < page:
            break
        end = "(" + last
    return sorted(found.values(), key=lambda c: (c.ts_ms, c.call_id))


# -- ending them ----------------------------------------------------------------------------
@dataclass
class DisconnectResult:
    """What happened to each call: ended, already gone (404) or failed (with the reason)."""

    ended: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """Return ok (nothing failed), partial, failed (all failed) or noop (no call)."""
        total = len(self.ended) + len(self.not_found) + len(self.failed)
        if total == 0:
            return "noop"
        if not self.failed:
            return "ok"
        return "failed" if len(self.failed) == total else "partial"

    def to_json(self) -> dict[str, Any]:
        return {"ended": self.ended, "not_found": self.not_found, "failed": self.failed}


class Disconnector:
    """Ends calls by Call-ID through `dlg_end_dlg`, retrying an unreachable endpoint."""

    def __init__(self, mi: OpenSIPSMI, cause: int = 21, attempts: int = 3,
                 retry_wait_s: float = 0.2) -> None:
        self.mi = mi
        self.cause = cause
        self.attempts = attempts
        self.retry_wait_s = retry_wait_s

    def end_calls(self, alert_id: str, call_ids: list[str]) -> DisconnectResult:
        """End every call; never raises (each call's fate is in the result)."""
        out = DisconnectResult()
        hdrs = reason_header(alert_id, self.cause)
        for cid in call_ids:
            for attempt in range(1, self.attempts + 1):
                try:
                    self.mi.execute(END_COMMAND, {"dialog_id": cid, "extra_hdrs": hdrs})
                except MIReplyError as e:
                    if e.code == NOT_FOUND:
                        out.not_found.append(cid)
                    else:
                        out.failed[cid] = f"{e.code} {e.message}"
                    break
                except MIUnavailable as e:
                    if attempt == self.attempts:
                        out.failed[cid] = str(e)
                    else:
                        time.sleep(self.retry_wait_s * attempt)
                else:
                    out.ended.append(cid)
                    break
        log.info("alert %s: ended %d call(s), %d already gone, %d failed", alert_id,
                 len(out.ended), len(out.not_found), len(out.failed))
        return out

