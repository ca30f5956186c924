"""The live alert feed of the console: alert changes pushed to browsers as Server-Sent Events.

One poller per web process, running only while a browser listens. Every `interval` it reads
the partitions' alert counters (one pipelined round trip: decide.lua bumps them in the same step
as it appends an alert record); only a partition whose counters moved has its durable stream
read back, newest first, down to the last record already seen. So an idle or busy-but-calm
system costs one small round trip per tick, and the browser sees a burst's alert within about
one tick of the call that raised it — before the writer has persisted it.

The stream is a buffer: `acm writer` trims what every sink has committed. When a partition's
counters moved but its stream no longer holds the alert record (trimmed between the append and
this poll), the change is in the repository already — the writer trims nothing it has not
written — so the poller reads the newest alerts there (`recent`) and sends those it has not
sent yet.

Lifecycle changes (status, assignee) made anywhere — this console, the REST API, MI, `acm alert`
— are appended by the MI lifecycle commands to `{acm.ctl}:lifecycle` as they commit; the same
round trip reads what was appended since the last tick, and each becomes a `lifecycle` event
that updates the row of a queue showing the alert (or removes it from a queue filtered on a
status it left).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from acm_module.control.repository import LIFECYCLE_STREAM, _alert_view
from acm_module.core import keys, records
from acm_module.core.errors import StoreError
from acm_module.core.redis import LazyRedis

log = logging.getLogger("acm.web.console")

_SCAN = 2000  # stream records read back per partition and tick, newest first
_QUEUE = 256  # events a slow browser may lag behind before it is dropped (it reconnects)
_SENT_MAX = 10_000  # alert versions remembered (to send a repository alert once)
KEEPALIVE_S = 15.0


class Feed:
    """Fan alert changes out to subscribers; poll the store while anyone subscribes."""

    def __init__(self, store_url: str, partitions: int, interval: float = 0.5,
                 recent: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.store_url = store_url
        self.partitions = partitions
        self.interval = interval
        self.recent = recent  # the newest alerts of the repository (blocking)
        self._sent: dict[str, int] = {}  # alert id -> the version last sent
        self._subs: set[asyncio.Queue[dict[str, Any]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._conn = LazyRedis(store_url, timeout=2.0, connect_timeout=2.0)
        self._counters: list[bytes | None] = [None] * partitions
        self._last_id: list[str | None] = [None] * partitions
        self._life_last: str | None = None  # the lifecycle stream's last entry seen
        self._primed = asyncio.Event()

    # -- subscribers -----------------------------------------------------------------------
    async def subscribe(self, wait: float = 5.0) -> asyncio.Queue[dict[str, Any]]:
        """Return a queue of alert views; start the poller if it is not running.

        Waits (up to `wait` s) until the poller has looked at the store once: what changes
        after this returns reaches the queue, so a browser told "live" misses nothing.
        """
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_QUEUE)
        self._subs.add(q)
        if self._task is None or self._task.done():
            self._primed = asyncio.Event()
            self._task = asyncio.create_task(self._run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._primed.wait(), wait)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        """Forget a subscriber; the poller stops at its next tick when none is left."""
        self._subs.discard(q)

    def publish(self, alert: dict[str, Any]) -> None:
        """Send one alert view (or a lifecycle change: `event` lifecycle) to every subscriber."""
        if alert.get("event") != "lifecycle":
            if len(self._sent) > _SENT_MAX:
                self._sent.clear()
            self._sent[str(alert.get("alert_id"))] = int(alert.get("version") or 0)
        for q in list(self._subs):
            try:
                q.put_nowait(alert)
            except asyncio.QueueFull:  # a stalled browser: drop it, EventSource reconnects
                self._subs.discard(q)

    async def close(self) -> None:
        """Stop the poller and close its store connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._conn is not None:
            self._conn.close()

    # -- the poller ------------------------------------------------------------------------
    async def _run(self) -> None:
        while self._subs:
            try:
                for alert in await run_in_threadpool(self.poll):
                    self.publish(alert)
                self._primed.set()
            except (StoreError, OSError) as e:
                log.warning("console feed: store unavailable: %s", e)
            await asyncio.sleep(self.interval)

    def poll(self) -> list[dict[str, Any]]:
        """Return the alert and lifecycle changes since the previous poll, oldest first
        (blocking)."""
        pipe = self._conn.pipeline(transaction=False)
        for p in range(self.partitions):
            pipe.hgetall(keys.counters(p))
        # The lifecycle stream rides on the same pipeline: only what is new since last tick.
        life = self._life_last
        if life is None:
            pipe.xrevrange(LIFECYCLE_STREAM, "+", "-", count=1)
        else:
            pipe.xrange(LIFECYCLE_STREAM, "(" + life, "+", count=_SCAN)
        replies = pipe.execute()
        out: list[dict[str, Any]] = []
        trimmed = False
        for p, reply in enumerate(replies[:self.partitions]):
            stamp = b"|".join(sorted(k + b"=" + v for k, v in reply.items()))
            first = self._counters[p] is None
            if stamp == self._counters[p]:
                continue
            self._counters[p] = stamp
            views = self._read(p, baseline=first)
            trimmed |= not first and not views
            out += views
        if trimmed and self.recent is not None:
            seen = {v["alert_id"] for v in out}
            out += [a for a in reversed(self.recent()) if a["alert_id"] not in seen
                    and self._sent.get(a["alert_id"], -1) < int(a.get("version") or 0)]
        for v in out:
            v["distinct"] = v.get("distinct_max") or v.get("a_number_count") or 0
        return out + self._lifecycle(replies[-1], baseline=life is None)

    def _lifecycle(self, reply: Any, baseline: bool) -> list[dict[str, Any]]:
        """Return the lifecycle changes of an XRANGE reply (none on the first look)."""
        if not isinstance(reply, list) or not reply:
            if baseline and isinstance(reply, list):
                self._life_last = "0-0"  # an empty stream: everything appended is new
            return []
        self._life_last = reply[-1][0].decode() if not baseline else reply[0][0].decode()
        if baseline:
            return []
        return [{**records.fields(entry), "event": "lifecycle"} for _rid, entry in reply]

    def _read(self, p: int, baseline: bool) -> list[dict[str, Any]]:
        last = self._last_id[p]
        # Only what was appended since the last look (an exclusive start), newest first.
        start = "-" if last is None else "(" + last
        raw = self._conn.xrevrange(keys.stream(p), "+", start, count=1 if baseline else _SCAN)
        latest: dict[str, records.AlertChange] = {}
        for rid, entry in raw:
            sid = rid.decode()
            if last is not None and _id_le(sid, last):
                break
            f = records.fields(entry)
            if f.get("k") != "a" or f.get("al") in latest:
                continue  # a decision, or an older record of an alert already seen
            try:  # the writer's parser: one reading of a record everywhere
                a = records.parse_alert(f"{keys.stream(p)}/{sid}", f)
            except records.RecordError:
                continue  # poison: the writer dead-letters it
            latest[a.alert_id] = a
        if raw:
            self._last_id[p] = raw[0][0].decode()
        if baseline:  # the first look only sets where "new" starts
            return []
        views = []
        for a in reversed(list(latest.values())):
            v = _alert_view(a)
            if a.op == "open":
                v["status"] = "NEW"
            views.append(v)
        return views


def _id_le(a: str, b: str) -> bool:
    """Say whether stream id a <= b."""
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) <= (int(bms), int(bseq or 0))


def matches(alert: dict[str, Any], filters: dict[str, str]) -> bool:
    """Say whether a live alert passes the queue's filters (those the stream can tell)."""
    sev_rank = {"LOW": 0, "HIGH": 1, "CRITICAL": 2}
    if filters.get("severity") and sev_rank.get(alert.get("severity", ""), 0) < sev_rank.get(
            filters["severity"], 0):
        return False
    if filters.get("b_number") and alert.get("b_number") != filters["b_number"]:
        return False
    if filters.get("carrier") and (alert.get("carrier_id") or "") != filters["carrier"]:
        return False
    status = filters.get("status")
    return not (status and alert.get("status") and alert["status"] != status)


async def sse(feed: Feed, q: asyncio.Queue[dict[str, Any]], filters: dict[str, str],
              disconnected: Callable[[], Awaitable[bool]],
              authorized: Callable[[], Awaitable[bool]]) -> AsyncIterator[bytes]:
    """Yield the event stream of one browser (subscribed as `q`) until it goes away or its
    login ends (checked at every keep-alive: a revoked session stops within KEEPALIVE_S)."""
    try:
        yield b"retry: 2000\n\n"
        while True:
            try:
                alert = await asyncio.wait_for(q.get(), KEEPALIVE_S)
            except TimeoutError:
                if await disconnected() or not await authorized():
                    return
                yield b": keep-alive\n\n"
                continue
            if alert.get("event") == "lifecycle":  # the page updates only rows it shows
                body = json.dumps(_lifecycle_public(alert, filters), separators=(",", ":"))
                yield f"event: lifecycle\ndata: {body}\n\n".encode()
            elif matches(alert, filters):
                body = json.dumps(_public(alert), separators=(",", ":"))
                yield f"event: alert\ndata: {body}\n\n".encode()
    finally:
        feed.unsubscribe(q)


def _public(a: dict[str, Any]) -> dict[str, Any]:
    keep = ("alert_id", "b_number", "severity", "distinct", "status", "carrier_id",
            "assigned_to", "detected_at", "last_detection_at")
    return {k: a.get(k) for k in keep}


def _lifecycle_public(change: dict[str, Any], filters: dict[str, str]) -> dict[str, Any]:
    """Return what a queue needs of a lifecycle change: the new status and assignee, and
    whether the alert left the status the queue is filtered on."""
    status = change.get("status") or ""
    return {"alert_id": change.get("alert_id"), "status": status,
            "assigned_to": change.get("assigned_to") or None,
            "left": bool(filters.get("status")) and status != filters.get("status")}
