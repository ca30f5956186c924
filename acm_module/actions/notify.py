"""Tell people: a webhook (signed JSON, retried with jittered backoff) and a log line per alert.

The webhook request:

    POST <webhook_url>
    Content-Type: application/json
    X-ACM-Event-Id: <alert_id>:<trigger>        (the same on every retry: dedup on it)
    X-ACM-Timestamp: <unix seconds of this attempt>
    X-ACM-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

A receiver recomputes the HMAC over the timestamp and the raw body with the shared secret,
compares in constant time, and refuses a timestamp more than 5 minutes from its clock: a captured
request cannot be replayed later (`verify()` does all three). Each attempt is signed afresh.

Retried (up to `webhook_retries` times): connection errors, timeouts, HTTP 408, 425, 429, 5xx
and redirects (a `Retry-After` in seconds is honoured, capped at the backoff maximum). Any other
4xx means the receiver refuses the event: not retried.

Redirects are never followed: a 3xx is a failed attempt (logged with its `Location`), and an
event only answered with redirects ends `failed`. Following one would turn the POST into a
body-less GET (301/302/303) that "succeeds" without the event, or re-send a signed event to a
host nobody configured (307/308). Set `webhook_url` to the final URL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from acm_module.core.backoff import Backoff

log = logging.getLogger("acm.actions.notify")
alert_log = logging.getLogger("acm.alerts")

SIGNATURE_HEADER = "X-ACM-Signature"
TIMESTAMP_HEADER = "X-ACM-Timestamp"
EVENT_HEADER = "X-ACM-Event-Id"
TOLERANCE_S = 300
_RETRY_STATUS = frozenset({408, 425, 429})
USER_AGENT = "acm-actions/1"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Return the signature header value of a body sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), str(int(timestamp)).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, body: bytes, timestamp: str | None, signature: str | None,
           now: float | None = None, tolerance_s: int = TOLERANCE_S) -> bool:
    """Say whether a received webhook is authentic and fresh (the receiver's check)."""
    if not secret or not timestamp or not signature:
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def encode(payload: dict[str, Any]) -> bytes:
    """Return the canonical JSON body (sorted keys, no spaces)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()


@dataclass
class DeliveryResult:
    """The fate of one webhook event."""

    delivered: bool
    attempts: int
    status: int | None = None
    error: str | None = None

    @property
    def outcome(self) -> str:
        """Return ok, rejected (a 4xx: not retried) or failed (retries exhausted)."""
        if self.delivered:
            return "ok"
        if self.status is not None and 400 <= self.status < 500 \
                and self.status not in _RETRY_STATUS:
            return "rejected"
        return "failed"

    def to_json(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "attempts": self.attempts, "status": self.status,
                "error": self.error}


class _Retryable(Exception):
    def __init__(self, status: int | None, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: urllib then raises HTTPError with the 3xx status."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class Webhook:
    """Deliver signed events to one URL. Thread-safe (no shared connection)."""

    def __init__(self, url: str, secret: str, timeout: float = 5.0, retries: int = 5,
                 backoff_base: float = 0.5, backoff_max: float = 30.0,
                 stop: threading.Event | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("webhook_url must be an http:// or https:// URL")
        if not secret:
            raise ValueError("webhook_secret is required with webhook_url")
        self.url = url
        self._secret = secret
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stop = stop or threading.Event()
        self._backoff = Backoff(backoff_base, backoff_max, rng)
        self._clock = clock

    def backoff(self, attempt: int) -> float:
        """Return the wait before retry `attempt` (1-based): equal jitter, capped."""
        return self._backoff.compute(attempt - 1)

    def deliver(self, event_id: str, payload: dict[str, Any]) -> DeliveryResult:
        """Send one event, retrying what is retryable; never raises."""
        body = encode(payload)
        attempt = 0
        while True:
            attempt += 1
            try:
                status = self._send(event_id, body)
            except _Retryable as e:
                if attempt > self.retries or self.stop.is_set():
                    log.warning("webhook %s: giving up after %d attempt(s): %s", event_id,
                                attempt, e)
                    return DeliveryResult(False, attempt, e.status, str(e))
                wait = self.backoff(attempt)
                if e.retry_after is not None:
                    wait = max(wait, min(e.retry_after, self.backoff_max))
                log.info("webhook %s: attempt %d failed (%s); retry in %.2fs", event_id,
                         attempt, e, wait)
                if self.stop.wait(wait):
                    return DeliveryResult(False, attempt, e.status, f"{e} (stopping)")
                continue
            if 200 <= status < 300:
                return DeliveryResult(True, attempt, status)
            log.warning("webhook %s: refused with HTTP %d; not retried", event_id, status)
            return DeliveryResult(False, attempt, status, f"HTTP {status}")

    def _send(self, event_id: str, body: bytes) -> int:
        ts = int(self._clock())
        req = urllib.request.Request(self.url, body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": USER_AGENT,
            EVENT_HEADER: event_id, TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(self._secret, ts, body)})
        try:
            with _OPENER.open(req, timeout=self.timeout) as r:
                r.read(65536)
                return int(r.status)
        except urllib.error.HTTPError as e:
            e.close()
            if 300 <= e.code < 400:
                where = (e.headers.get("Location") if e.headers is not None else None) or "?"
                raise _Retryable(e.code, f"HTTP {e.code} redirect to {where[:200]!r}: "
                                         "not followed (webhook_url must be the final URL)",
                                 _retry_after(e.headers)) from e
            if e.code >= 500 or e.code in _RETRY_STATUS:
                raise _Retryable(e.code, f"HTTP {e.code}", _retry_after(e.headers)) from e
            return int(e.code)
        except (OSError, ValueError) as e:  # URLError, timeouts, resets, bad status line
            reason = getattr(e, "reason", e)
            raise _Retryable(None, f"{type(e).__name__}: {reason}") from e


def _retry_after(headers: Any) -> float | None:
    raw = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def log_alert(event: str, alert: dict[str, Any]) -> None:
    """Write the one-line log record of an alert event (the `acm.alerts` logger)."""
    alert_log.warning(
        "%s alert=%s type=%s severity=%s b=%s distinct=%s a_numbers=%d b_numbers=%d "
        "window_ms=%s carrier=%s gateway=%s ncc=%s",
        event, alert.get("alert_id"), alert.get("alert_type"), alert.get("severity"),
        alert.get("b_number"), alert.get("distinct"), len(alert.get("a_numbers") or ()),
        len(alert.get("b_numbers") or ()), alert.get("window_ms"),
        alert.get("carrier_id") or "-", alert.get("gateway_id") or "-",
        alert.get("ncc_incident_id") or "-")
