"""The webhook: retries with jittered backoff against a receiver that fails first, timeouts,
no retry on a refusal, and signatures a receiver can verify (and that resist replay)."""

from __future__ import annotations

import json
import random
import time

import pytest

from acm_module.actions.notify import (
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Webhook,
    sign,
    verify,
)
from tests.support.fakes import WebhookReceiver

pytestmark = pytest.mark.timeout(30)

SECRET = "another-shared-secret-0123456789"


def headers(req: dict) -> dict[str, str]:
    return {k.lower(): v for k, v in req["headers"].items()}


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retried_until_delivered_every_attempt_signed(status: int) -> None:
    rx = WebhookReceiver(fail_first=3, fail_status=status)
    try:
        hook = Webhook(rx.url, SECRET, timeout=2.0, retries=5, backoff_base=0.02,
                       backoff_max=0.1)
        payload = {"event": "alert.opened", "alert": {"alert_id": "a1", "severity": "HIGH"}}
        res = hook.deliver("a1:open", payload)
        assert res.delivered and res.outcome == "ok"
        assert (res.attempts, res.status) == (4, 200)
        assert len(rx.requests) == 4
        bodies = {r["body"] for r in rx.requests}
        assert len(bodies) == 1  # the same event each time
        body = bodies.pop()
        assert json.loads(body) == payload
        for r in rx.requests:
            h = headers(r)
            assert h["content-type"] == "application/json"
            assert h[EVENT_HEADER.lower()] == "a1:open"
            assert h[SIGNATURE_HEADER.lower()] == sign(SECRET, int(h[TIMESTAMP_HEADER.lower()]),
                                                        body)
            assert verify(SECRET, body, h[TIMESTAMP_HEADER.lower()],
                          h[SIGNATURE_HEADER.lower()])
    finally:
        rx.close()


def test_gives_up_after_the_retries_with_growing_jittered_waits() -> None:
    rx = WebhookReceiver(fail_first=100, fail_status=502)
    try:
        hook = Webhook(rx.url, SECRET, timeout=2.0, retries=3, backoff_base=0.05,
                       backoff_max=1.0, rng=random.Random(7))
        t0 = time.monotonic()
        res = hook.deliver("a2:open", {"x": 1})
        took = time.monotonic() - t0
        assert not res.delivered and res.outcome == "failed"
        assert (res.attempts, res.status) == (4, 502)
        assert len(rx.requests) == 4
        # Equal jitter: waits of at least half of 0.05, 0.1, 0.2 s.
        assert took >= (0.05 + 0.1 + 0.2) / 2
    finally:
        rx.close()
    waits = [Webhook("http://x", "k", backoff_base=0.5, backoff_max=4.0,
                     rng=random.Random(s)).backoff(n) for s in range(20) for n in (1, 2, 3, 6)]
    for i, n in enumerate((1, 2, 3, 6) * 20):
        cap = min(4.0, 0.5 * 2 ** (n - 1))
        assert cap / 2 <= waits[i] <= cap


def test_a_refusal_is_not_retried() -> None:
    rx = WebhookReceiver(fail_first=100, fail_status=401)
    try:
        res = Webhook(rx.url, SECRET, retries=5, backoff_base=0.01).deliver("a3:open", {})
        assert (res.delivered, res.outcome, res.attempts, res.status) == (False, "rejected",
                                                                            1, 401)
        assert len(rx.requests) == 1
    finally:
        rx.close()


def test_a_receiver_that_does_not_answer_times_out_and_is_retried() -> None:
    rx = WebhookReceiver(fail_first=1, delay_first=5.0)
    try:
        hook = Webhook(rx.url, SECRET, timeout=0.3, retries=2, backoff_base=0.01)
        t0 = time.monotonic()
        res = hook.deliver("a4:open", {"y": 2})
        assert res.delivered and res.attempts == 2
        assert 0.3 <= time.monotonic() - t0 < 3.0
    finally:
        rx.close()


def test_unreachable_receiver_fails_after_retries() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        res = Webhook(f"http://127.0.0.1:{port}/h", SECRET, timeout=0.5, retries=2,
                      backoff_base=0.01).deliver("a5:open", {})
    assert (res.delivered, res.outcome, res.attempts, res.status) == (False, "failed", 3, None)
    assert "refused" in (res.error or "").lower()


def test_signature_rejects_tampering_wrong_secret_and_replay() -> None:
    body = b'{"event":"alert.opened"}'
    now = 1_800_000_000
    sig = sign(SECRET, now, body)
    assert verify(SECRET, body, str(now), sig, now=now + 10)
    assert not verify(SECRET, body + b" ", str(now), sig, now=now)  # body changed
    assert not verify(SECRET, body, str(now + 1), sig, now=now)  # timestamp changed
    assert not verify("not-the-secret", body, str(now), sig, now=now)
    assert not verify(SECRET, body, str(now), sig, now=now + 301)  # replayed 5 min later
    assert not verify(SECRET, body, None, sig, now=now)
    assert not verify(SECRET, body, "abc", sig, now=now)


def test_webhook_needs_a_secret_and_an_http_url() -> None:
    with pytest.raises(ValueError):
        Webhook("http://127.0.0.1:1/h", "")
    with pytest.raises(ValueError):
        Webhook("ftp://127.0.0.1/h", SECRET)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_is_a_failed_attempt(status: int) -> None:
    target = WebhookReceiver()  # answers 200 to anything, GET included
    rx = WebhookReceiver(final_status=status, location=target.url)
    try:
        hook = Webhook(rx.url, SECRET, timeout=2.0, retries=2, backoff_base=0.01,
                       backoff_max=0.02)
        res = hook.deliver("a6:open", {"event": "alert.opened"})
        assert (res.delivered, res.outcome, res.status) == (False, "failed", status)
        assert res.attempts == 3 and len(rx.requests) == 3
        assert {r["method"] for r in rx.requests} == {"POST"}
        assert str(status) in (res.error or "") and target.url in (res.error or "")
        # Nothing reached the redirect's target: no body-less GET, no re-sent signed POST.
        assert target.requests == []
    finally:
        rx.close()
        target.close()
