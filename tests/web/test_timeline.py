"""The episode's calls after `acm writer` trimmed them from the stream: read back from QuestDB's
call_events (GET /api/v1/alerts/{id} and the console's episode page), merged with what the
stream still holds; a QuestDB that is down or silent degrades the page to the stream, said so,
within its timeout.

Real servers: redis-server, PostgreSQL, QuestDB (tests/support/writer_fixtures.py), `acm writer` and
`acm serve`; the episode page in headless Chromium (test_console's fixture).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from acm_module.core import keys
from acm_module.core.settings import BY_NAME
from acm_module.decide.engine import hotpath
from acm_module.decide.store.conn import StoreConnection
from acm_module.write.base import SinkRejected
from acm_module.write.questdb import QuestDB, literal
from tests.support.web import running_web
from tests.web.test_api import fresh_b
from tests.web.test_api_pg import wait_row
from tests.web.test_console import DESKTOP, browser, log_in, zmq_burst

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

__all__ = ["browser"]  # a fixture, used by name


def stream_calls(store_url: str, b: str) -> list[str]:
    """Return the call ids of the decisions to b still in its partition stream."""
    c = StoreConnection(store_url, timeout=2.0)
    try:
        part = hotpath.partition_of(b, BY_NAME["partitions"].default)
        raw = c.call("XRANGE", keys.stream(part), "-", "+")
    finally:
        c.close()
    assert isinstance(raw, list)
    out = []
    for _rid, flat in raw:
        f = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        if f.get("k") == "d" and f.get("b") == b:
            out.append(f["id"])
    return out


def wait_trimmed(store_url: str, b: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while stream_calls(store_url, b):
        assert time.monotonic() < deadline, "the writer never trimmed the episode's calls"
        time.sleep(0.2)


def questdb_calls(url: str, b: str) -> int:
    """Return how many calls to b QuestDB's call_events holds (0 before the writer made it)."""
    q = QuestDB(url)
    q.wait_applied(("call_events",))
    try:
        rows = q.rows(f"SELECT count() FROM call_events WHERE b_number = {literal(b)}")
    except SinkRejected as e:
        if "does not exist" in str(e):
            return 0
        raise
    return int(rows[0][0])


def test_an_episode_trimmed_from_the_stream_keeps_its_calls_from_questdb(
        browser: Any, store_url: str, database_url: str, questdb_url: str,
        writer_factory: Any) -> None:
    env = {"DATABASE_URL": database_url, "QUESTDB_URL": questdb_url}
    with running_web(store_url, env=env) as web:
        web.make_users()
        b = fresh_b()
        tag = f"tl{time.monotonic_ns()}"
        replies = zmq_burst(web.svc.endpoint, b, n=6, tag=tag)
        sent = [f"{tag}-{i}" for i in range(6)]
        alert_id = replies[-1]["alert_id"]
        assert alert_id and replies[-1]["reason"] == "masking"
        # First a writer that keeps the stream (its one trim at start comes before it has
        # written anything): every call is in both places, shown once.
        keeper = writer_factory(env=env,
                                args=["--sinks", "pg,questdb", "--trim-interval", "3600"])
        wait_row(database_url, alert_id)
        deadline = time.monotonic() + 30
        while questdb_calls(questdb_url, b) < 6:
            assert time.monotonic() < deadline, "the calls never reached call_events"
            time.sleep(0.2)
        viewer = web.as_role("viewer")
        d = viewer.get(f"/api/v1/alerts/{alert_id}").json()
        assert d["calls_source"] == "questdb+stream" and d["calls_warning"] is None
        assert len(stream_calls(store_url, b)) == 6
        assert [c["call_id"] for c in d["calls"]] == sent

        # Then a writer that trims: the stream loses them, the episode does not.
        keeper.stop()
        writer_factory(env=env, args=["--sinks", "pg,questdb", "--trim-interval", "0.5"])
        wait_trimmed(store_url, b)
        d = viewer.get(f"/api/v1/alerts/{alert_id}").json()
        assert d["calls_source"] == "questdb+stream" and d["calls_warning"] is None
        assert [c["call_id"] for c in d["calls"]] == sent
        assert [c["verdict"] for c in d["calls"]] == ["allow"] * 4 + ["drop"] * 2
        assert d["calls"][-1]["distinct"] == 6 and d["calls"][-1]["reason"] == "masking"
        assert sum(1 for e in d["timeline"] if e["kind"] == "call") == 6

        ctx = browser.new_context(viewport=DESKTOP)
        try:
            page = ctx.new_page()
            log_in(page, web.url, "analyst")
            page.goto(f"{web.url}/alerts/{alert_id}")
            assert page.locator("svg.timeline circle").count() == 6
            assert page.locator("svg.timeline circle.dot-drop").count() == 2
            assert "no longer in the store" not in page.inner_text("main")
        finally:
            ctx.close()


def test_questdb_literals_carry_any_text(questdb_url: str) -> None:
    q = QuestDB(questdb_url)
    for text in ("+2348031000", "o'brien", "x'; DROP TABLE call_events; --", "''", "\\'"):
        assert q.rows(f"SELECT {literal(text)} t") == [[text]]
    with pytest.raises(ValueError):
        literal("a\x00b")


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A loopback port that accepts connections and never answers (a hung QuestDB)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def test_a_silent_questdb_degrades_the_episode_to_the_stream_in_time(store_url: str) -> None:
    with silent_server() as url, running_web(store_url, env={"QUESTDB_URL": url}) as web:
        web.make_users()
        b = fresh_b()
        replies = zmq_burst(web.svc.endpoint, b, n=6)
        alert_id = replies[-1]["alert_id"]
        t0 = time.monotonic()
        r = web.as_role("viewer").get(f"/api/v1/alerts/{alert_id}")
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["calls_source"] == "stream"
        assert "questdb unavailable" in d["calls_warning"]
        assert len(d["calls"]) == 6  # the stream still holds them: nothing is lost
        assert took < 8.0, f"the page waited {took:.1f} s on a silent QuestDB"
