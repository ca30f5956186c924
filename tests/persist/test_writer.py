"""The writer against real servers: PostgreSQL, QuestDB, chdb, redis-server, and `acm serve`.

Each test checks rows one for one against the durable stream: every `k=d` record is one
call_events row, every distinct alert is one fraud_alerts row and one ClickHouse row with its
final severity and A-numbers.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import time
import uuid
from typing import Any

import psycopg
import pytest

from acm_module.core import keys
from acm_module.core.records import FRAUD_REASONS
from acm_module.decide.client import Client
from acm_module.decide.store.conn import StoreConnection
from acm_module.write.questdb import QuestDB
from acm_module.write.store import StreamStore
from acm_module.write.writer import GROUP_PREFIX, GroupWatch, group_positions, writer_stats
from tests.support.numbers import a_num, b_num
from tests.support.pgqdb import (
    ALL_SINKS,
    TAP_GROUP,
    add_tap,
    ch_query,
    qdb_count,
    stream_records,
    synthetic,
    wait_drained,
    writer_env,
)
from tests.support.servers import free_port
from tests.support.streamrec import dead_letters

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

_ids = itertools.count()


def drive(client: Client, episodes: int, base_ts: float, callers: int = 8,
          clean_calls: int = 20) -> int:
    """Make real decisions: `episodes` masking bursts (LOW..CRITICAL), clean and invalid calls.

    Returns how many requests were sent.
    """
    n = 0
    for e in range(episodes):
        b = b_num(e)
        for i in range(callers - (e % 3)):  # 8, 7, 6 callers: CRITICAL and HIGH alerts
            client.decide(f"m{next(_ids)}", a_num(e * 100 + i), b, ts=base_ts + e * 60 + i * 0.1,
                          src_ip="10.0.0.%d" % (e % 250), trunk=f"trunk{e % 4}")
            n += 1
    for i in range(clean_calls):
        client.decide(f"c{next(_ids)}", a_num(90000 + i), b_num(5000 + i), ts=base_ts + i)
        n += 1
    for raw in ("anonymous", "12345"):
        client.decide(f"i{next(_ids)}", a_num(1), raw, ts=base_ts)
        client.decide(f"u{next(_ids)}", raw, b_num(1), ts=base_ts)
        n += 2
    return n


def expected(store_url: str) -> tuple[list[dict[str, str]], dict[str, dict[str, str]]]:
    """Return (decision records, {alert_id: its highest-version change}) from the streams."""
    recs = [f for _, _, f in stream_records(store_url)]
    decisions = [f for f in recs if f.get("k") == "d"]
    alerts: dict[str, dict[str, str]] = {}
    for f in recs:
        if f.get("k") == "a" and (f["al"] not in alerts
                                  or int(f["ver"]) > int(alerts[f["al"]]["ver"])):
            alerts[f["al"]] = f
    return decisions, alerts


def check_all(store_url: str, database_url: str, questdb_url: str, chdb_path: str) -> None:
    """Assert every sink holds exactly the stream's decisions and alerts."""
    decisions, alerts = expected(store_url)
    assert decisions and alerts
    # QuestDB: one row per decision, same verdict and reason; no duplicate.
    q = QuestDB(questdb_url)
    assert q.wait_applied(("call_events",))
    rows = q.rows("SELECT call_id, verdict, reason, distinct_count, alert_id, fraud_detected, "
                  "detection_latency_us, a_number, b_number FROM call_events")
    assert len(rows) == len(decisions)
    by_id = {r[0]: r for r in rows}
    assert len(by_id) == len(rows)
    for d in decisions:
        r = by_id[d["id"]]
        assert (r[1], r[2], r[3]) == (d["v"], d["r"], int(d["n"]))
        assert (r[4] or "") == d["al"]
        assert r[5] == (d["r"] in FRAUD_REASONS)
        assert (r[7], r[8]) == (d["a"], d["b"])
    # PostgreSQL: one row per alert, final severity / A-numbers / version.
    with psycopg.connect(database_url) as c:
        pg = {str(r[0]): r for r in c.execute(
            "SELECT alert_id, severity, a_numbers, version, distinct_count, b_number, status "
            "FROM fraud_alerts")}
    assert set(pg) == set(alerts)
    for aid, f in alerts.items():
        assert pg[aid][1] == f["sv"]
        assert pg[aid][2] == f["an"].split(",")
        assert pg[aid][3] == int(f["ver"])
        assert pg[aid][4] == int(f["n"])
        assert pg[aid][5] == f["b"] and pg[aid][6] == "NEW"
    # ClickHouse: one current row per alert, and the daily view counts each alert once.
    ch = ch_query(chdb_path, "SELECT toString(alert_id) AS id, severity, a_number_count, version "
                             "FROM acm.fraud_alerts_analytics FINAL")
    assert len(ch) == len(alerts)
    assert {r["id"]: (r["severity"], int(r["a_number_count"]), int(r["version"])) for r in ch} \
        == {a: (f["sv"], len(f["an"].split(",")), int(f["ver"])) for a, f in alerts.items()}
    daily = ch_query(chdb_path, "SELECT severity, sum(alert_count) AS n, "
                                "sum(total_a_numbers) AS t FROM acm.daily_stats_mv "
                                "GROUP BY severity HAVING n != 0")
    want: dict[str, list[int]] = {}
    for f in alerts.values():
        w = want.setdefault(f["sv"], [0, 0])
        w[0] += 1
        w[1] += len(f["an"].split(","))
    assert {r["severity"]: [int(r["n"]), int(r["t"])] for r in daily} == want


def test_rows_equal_decisions_and_alerts_one_for_one(
        service_factory: Any, writer_factory: Any, store_url: str, database_url: str,
        questdb_url: str, chdb_path: str) -> None:
    add_tap(store_url)
    with service_factory() as (_svc, client):
        w = writer_factory(env=writer_env(database_url, questdb_url, chdb_path))
        drive(client, episodes=12, base_ts=1_800_000_000.0)
        wait_drained(store_url, ALL_SINKS, writer=w)
        # Latencies are joined for live traffic (best effort: most, not necessarily all).
        q = QuestDB(questdb_url)
        q.wait_applied(("call_events",))
        with_latency = q.rows("SELECT count() FROM call_events "
                              "WHERE detection_latency_us != null")[0][0]
        assert with_latency > 0
        # The workers' stats reach detection_metrics once a second.
        want = {"requests_total", "latency_p99_us", "decisions_per_s"}
        deadline = time.monotonic() + 10
        names: set[str] = set()
        while not want <= names and time.monotonic() < deadline:
            time.sleep(0.3)
            assert q.wait_applied(("detection_metrics",))
            names = {r[0] for r in q.rows("SELECT DISTINCT metric_name FROM detection_metrics")}
        assert want <= names
        # Backlog is visible and zero.
        c = StreamStore(store_url)
        try:
            time.sleep(1.2)  # one stats interval
            st = writer_stats(c)
            for s in ALL_SINKS:
                assert st["sinks"][s]["pending"] == 0 and st["sinks"][s]["lag"] == 0
                mine = st["sinks"][s]["writers"][0]
                assert mine["state"] == "up" and mine["acked"] > 0
        finally:
            c.close()
    assert w.stop() == 0  # chdb's directory belongs to one process at a time
    check_all(store_url, database_url, questdb_url, chdb_path)
    # Replaying everything (groups rewound; the tap group kept the stream from being trimmed)
    # changes no row: the sinks are idempotent.
    c = StoreConnection(store_url, timeout=5.0)
    try:
        for s in keys.streams(16):
            for sink in ALL_SINKS:
                c.call("XGROUP", "SETID", s, GROUP_PREFIX + sink, "0")
    finally:
        c.close()
    w2 = writer_factory(env=writer_env(database_url, questdb_url, chdb_path))
    wait_drained(store_url, ALL_SINKS, writer=w2)
    assert w2.stop() == 0
    check_all(store_url, database_url, questdb_url, chdb_path)


def test_trim_only_what_every_group_acked(
        service_factory: Any, writer_factory: Any, store_url: str, database_url: str,
        questdb_url: str, chdb_path: str) -> None:
    with service_factory() as (_svc, client):
        drive(client, episodes=2, base_ts=1_800_100_000.0, clean_calls=5)
    recs = stream_records(store_url)
    before = len(recs)
    n_decisions = sum(1 for _, _, f in recs if f["k"] == "d")
    add_tap(store_url)  # one group that never acks: nothing may be trimmed
    env = writer_env(database_url, questdb_url, chdb_path)
    w = writer_factory(env=env, args=["--sinks", "pg,clickhouse"])
    wait_drained(store_url, ["pg", "clickhouse"], writer=w)
    time.sleep(6)  # one trim interval
    assert len(stream_records(store_url)) == before
    c = StoreConnection(store_url, timeout=5.0)
    try:
        for s in keys.streams(16):
            c.call("XGROUP", "DESTROY", s, TAP_GROUP)
    finally:
        c.close()
    # QuestDB is configured but fed by another writer process that has not run yet: its group
    # exists from the start (created by this writer), so its records stay.
    time.sleep(6)
    assert len(stream_records(store_url)) == before
    assert w.stop() == 0
    wq = writer_factory(env=env, args=["--sinks", "questdb"])
    wait_drained(store_url, ["questdb"], writer=wq)
    deadline = time.monotonic() + 15
    while stream_records(store_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stream_records(store_url) == []  # acked by every group: gone
    assert wq.stop() == 0
    q = QuestDB(questdb_url)
    assert q.wait_applied(("call_events",))
    assert q.rows("SELECT count() FROM call_events")[0][0] == n_decisions


def test_writer_killed_mid_batch_leaves_no_gap_and_no_duplicate(
        writer_factory: Any, store_url: str, database_url: str, questdb_url: str,
        chdb_path: str) -> None:
    add_tap(store_url)
    synthetic(store_url, 30_000)
    env = writer_env(database_url, questdb_url, chdb_path, ACM_WRITER_BATCH="4000")
    w1 = writer_factory(env=env, args=["--consumer", "w1"])
    deadline = time.monotonic() + 60
    while qdb_count(questdb_url) < 5000 and time.monotonic() < deadline:
        time.sleep(0.05)
    w1.stop(signal.SIGKILL)  # mid-run: batches delivered but not acked stay pending
    c = StoreConnection(store_url, timeout=5.0)
    try:
        pending = sum(int(c.call("XPENDING", s, GROUP_PREFIX + "questdb")[0])  # type: ignore[index]
                      for s in keys.streams(16))
    finally:
        c.close()
    # Another writer (another consumer name) claims what the dead one left pending.
    w2 = writer_factory(env=env, args=["--consumer", "w2", "--claim-idle-ms", "500"])
    wait_drained(store_url, ALL_SINKS, timeout=90, writer=w2)
    assert w2.stop() == 0
    assert pending > 0 or qdb_count(questdb_url) > 0
    check_all(store_url, database_url, questdb_url, chdb_path)
    # And a restart under the same name re-reads its own pending entries at once.
    synthetic(store_url, 8_000, seed=1)
    w3 = writer_factory(env=env, args=["--consumer", "w3"])
    while qdb_count(questdb_url) < 31_000 and time.monotonic() < deadline + 60:
        time.sleep(0.02)
    w3.stop(signal.SIGKILL)
    w4 = writer_factory(env=env, args=["--consumer", "w3", "--claim-idle-ms", "600000"])
    wait_drained(store_url, ALL_SINKS, timeout=60, writer=w4)
    assert w4.stop() == 0
    check_all(store_url, database_url, questdb_url, chdb_path)


def test_sink_down_then_back_loses_nothing_and_others_go_on(
        service_factory: Any, writer_factory: Any, store_url: str, database_url: str,
        questdb_url: str, chdb_path: str, pg_server: Any, questdb_server: Any) -> None:
    if isinstance(pg_server, str) or isinstance(questdb_server, str):
        pytest.skip("needs the suite's own PostgreSQL and QuestDB to stop them")
    add_tap(store_url)
    w = writer_factory(env=writer_env(database_url, questdb_url, chdb_path,
                                      ACM_WRITER_BACKOFF_MAX="1"))
    with service_factory() as (_svc, client):
        drive(client, episodes=2, base_ts=1_800_300_000.0, clean_calls=5)
        wait_drained(store_url, ALL_SINKS, writer=w)
        pg_server.stop()
        questdb_server.stop()
        drive(client, episodes=6, base_ts=1_800_400_000.0)
        # ClickHouse goes on while the other two are down; their backlog waits, visible.
        wait_drained(store_url, ["clickhouse"], writer=w)
        c = StreamStore(store_url)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                st = writer_stats(c)
                if all(st["sinks"][s]["writers"][0]["state"] == "down" for s in ("pg", "questdb")):
                    break
                time.sleep(0.2)
            for s in ("pg", "questdb"):
                assert st["sinks"][s]["pending"] + (st["sinks"][s]["lag"] or 0) > 0
                assert st["sinks"][s]["writers"][0]["state"] == "down", w.read_log()[-4000:]
                assert st["sinks"][s]["writers"][0]["last_error"]
        finally:
            c.close()
        pg_server.start()
        questdb_server.start()
        wait_drained(store_url, ALL_SINKS, timeout=60, writer=w)
    assert w.stop() == 0
    check_all(store_url, database_url, questdb_url, chdb_path)


def test_poisoned_records_are_dead_lettered_and_do_not_block(
        writer_factory: Any, store_url: str, database_url: str, questdb_url: str,
        chdb_path: str) -> None:
    add_tap(store_url)
    synthetic(store_url, 100)
    c = StoreConnection(store_url, timeout=5.0)
    try:
        bad_d = c.call("XADD", keys.stream(3), "*", "k", "d", "id", "poison-1", "a", "x",
                       "b", "y", "ts", "not-a-number", "v", "allow", "r", "clean", "n", "0",
                       "al", "", "sv", "", "ip", "", "tr", "", "rx", "1", "md", "block")
        bad_a = c.call("XADD", keys.stream(5), "*", "k", "a", "al", "not-a-uuid", "op", "open",
                       "b", "+2348030000000", "sv", "HIGH", "n", "5", "an", "a,b", "t0", "1",
                       "t1", "1", "ver", "1", "wms", "5000", "blk", "0")
        bad_k = c.call("XADD", keys.stream(7), "*", "k", "zz", "junk", "1")
        # Not UTF-8: read (bytes replaced) and dead-lettered, not a reply that fails each read.
        bad_u = c.call("XADD", keys.stream(11), "*", "k", b"\xff", "junk", b"\xfe1")
        # Parses, but PostgreSQL refuses it (b_number is VARCHAR(20)): found by bisection.
        long_b = c.call("XADD", keys.stream(9), "*", "k", "a", "al", str(uuid.uuid4()),
                        "op", "open", "b", "+" + "9" * 30, "sv", "HIGH", "n", "5", "an", "x,y",
                        "t0", "1", "t1", "1", "ver", "1", "wms", "5000", "blk", "0")
    finally:
        c.close()
    synthetic(store_url, 100, seed=2)
    w = writer_factory(env=writer_env(database_url, questdb_url, chdb_path))
    wait_drained(store_url, ALL_SINKS, writer=w)
    assert w.stop() == 0
    dlq = dead_letters(store_url)
    # Entry ids are unique per stream only: a dead letter names both.
    d_key = (keys.stream(3), bad_d.decode())  # type: ignore[union-attr]
    a_key = (keys.stream(5), bad_a.decode())  # type: ignore[union-attr]
    k_key = (keys.stream(7), bad_k.decode())  # type: ignore[union-attr]
    r_key = (keys.stream(9), long_b.decode())  # type: ignore[union-attr]
    u_key = (keys.stream(11), bad_u.decode())  # type: ignore[union-attr]
    by = {(d["stream"], d["id"], d["sink"]): d["reason"] for d in dlq}
    assert set(by) == {(*d_key, "questdb"), (*a_key, "pg"), (*a_key, "clickhouse"),
                       *((*k_key, s) for s in ALL_SINKS), (*r_key, "pg"),
                       *((*u_key, s) for s in ALL_SINKS)}
    assert "rejected by pg" in by[(*r_key, "pg")]
    assert "'ts'" in by[(*d_key, "questdb")]
    assert "UUID" in by[(*a_key, "pg")] and "UUID" in by[(*a_key, "clickhouse")]
    assert "unknown record kind" in by[(*k_key, "pg")]
    assert {json.loads(d["record"])["k"] for d in dlq} == {"d", "a", "zz", "\ufffd"}
    with psycopg.connect(database_url) as db:
        assert db.execute("SELECT count(*) FROM fraud_alerts").fetchone()[0] == 8  # type: ignore[index]
    assert len(ch_query(chdb_path, "SELECT alert_id FROM acm.fraud_alerts_analytics FINAL")) == 9
    # Everything else went through: 200 decisions, 8 alerts (+1 ClickHouse took).
    q = QuestDB(questdb_url)
    assert q.wait_applied(("call_events",))
    assert q.rows("SELECT count() FROM call_events")[0][0] == 200


def _groups(store_url: str) -> set[str]:
    c = StreamStore(store_url)
    try:
        return {g for s in keys.streams(16) for g in group_positions(c, s)}
    finally:
        c.close()


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_only_the_configured_sinks_hold_back_the_trim(
        writer_factory: Any, store_url: str, database_url: str, questdb_url: str,
        chdb_path: str) -> None:
    synthetic(store_url, 3000)
    env = writer_env(database_url, questdb_url, chdb_path, ACM_WRITER_TRIM_INTERVAL="0.5")
    w = writer_factory(env=env, args=["--sinks", "pg,questdb"])
    wait_drained(store_url, ["pg", "questdb"], writer=w)
    # No ClickHouse anywhere in this deployment (no clickhouse_url, not in --sinks): no group
    # of its own, and a full drain leaves empty streams.
    _wait(lambda: stream_records(store_url) == [], 15,
          f"an empty stream; groups {_groups(store_url)}\n{w.read_log()[-2000:]}")
    assert _groups(store_url) == {GROUP_PREFIX + "pg", GROUP_PREFIX + "questdb"}
    assert w.stop() == 0
    assert qdb_count(questdb_url) == 3000


def test_a_group_nobody_reads_is_reported_and_released_a_down_sink_keeps_its_backlog(
        writer_factory: Any, store_url: str, database_url: str, questdb_url: str,
        chdb_path: str, pg_server: Any) -> None:
    if isinstance(pg_server, str):
        pytest.skip("needs the suite's own PostgreSQL to stop it")
    from acm_module.ops.metrics import render_once

    stale = GROUP_PREFIX + "clickhouse"  # left by an earlier deployment: nobody reads it
    c = StoreConnection(store_url, timeout=5.0)
    try:
        for s in keys.streams(16):
            c.call("XGROUP", "CREATE", s, stale, "0", "MKSTREAM")
    finally:
        c.close()
    synthetic(store_url, 2000)
    first = stream_records(store_url)
    env = writer_env(database_url, questdb_url, chdb_path, ACM_WRITER_TRIM_INTERVAL="0.5",
                     ACM_WRITER_GROUP_MAX_IDLE="2", ACM_WRITER_BACKOFF_MAX="1")
    w = writer_factory(env=env, args=["--sinks", "pg,questdb"])
    wait_drained(store_url, ["pg", "questdb"], writer=w)
    # Two seconds without progress: reported, released, and what it never read is trimmed and
    # counted (not lost silently).
    _wait(lambda: stream_records(store_url) == [], 20, f"the release\n{w.read_log()[-2000:]}")

    def series(name: str, group: str) -> float | None:
        text = render_once(store_url, 16).decode()
        for line in text.splitlines():
            if line.startswith(f'{name}{{group="{group}"}} '):
                return float(line.split()[-1])
        return None

    _wait(lambda: series("acm_stream_group_trimmed_unread_records_total", stale) == len(first),
          10, "the trimmed-unread counter")
    assert series("acm_stream_group_released", stale) == 1.0
    assert series("acm_stream_group_idle_seconds", stale) >= 2.0  # type: ignore[operator]
    log = w.read_log()
    assert f"group {stale}" in log and "no longer holds back trimming" in log
    assert re.search(rf"group {stale}: trimmed \d+ records it never acknowledged", log)

    # A sink that is down has a live writer: its group holds the backlog however long it lasts.
    pg_server.stop()
    synthetic(store_url, 1000, seed=1)
    second = stream_records(store_url)
    waiting = {(s, eid) for s, eid, f in second if f["k"] == "a"}  # PostgreSQL takes alerts
    time.sleep(5)  # > writer_group_max_idle + trim intervals
    assert waiting <= {(s, eid) for s, eid, _ in stream_records(store_url)}
    assert series("acm_stream_group_released", GROUP_PREFIX + "pg") == 0.0
    assert series("acm_stream_group_trimmed_unread_records_total", GROUP_PREFIX + "pg") is None
    pg_server.start()
    wait_drained(store_url, ["pg", "questdb"], timeout=60, writer=w)
    _wait(lambda: stream_records(store_url) == [], 15, "the trim after the outage")
    assert w.stop() == 0
    alerts = {f["al"] for _, _, f in first + second if f["k"] == "a"}
    with psycopg.connect(database_url) as db:
        assert {str(r[0]) for r in db.execute("SELECT alert_id FROM fraud_alerts")} == alerts
    assert series("acm_stream_group_trimmed_unread_records_total", stale) == \
        len(first) + len(second)


def test_a_writer_that_saw_a_release_late_does_not_publish_the_group_as_held(
        store_url: str) -> None:
    """Each sink process trims. One whose pass read the clocks before another released a group
    and trimmed what it held must not publish that group as holding back trimming again: the
    released gauge would drop to 0 until its next pass (seen as a flaky release test)."""
    store = StreamStore(store_url, timeout=5.0)
    stream, group = keys.streams(16)[0], GROUP_PREFIX + "left-" + uuid.uuid4().hex[:8]
    try:
        store.call("XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
        store.call("XADD", stream, "*", "k", "c")
        now = [1000.0]
        first, late = GroupWatch(2.0, clock=lambda: now[0]), GroupWatch(2.0, clock=lambda: now[0])
        first.load(store)
        first.observe(store, stream, group_positions(store, stream), set())
        first.save(store)  # the group's clock starts
        now[0] = 1003.0
        first.load(store)
        late.load(store)  # before `first` saves the release below
        assert first.observe(store, stream, group_positions(store, stream), set())[group] == \
            (3.0, True)
        first.save(store)
        store.call("XTRIM", stream, "MAXLEN", "0")  # `first` trims what the group held
        late.observe(store, stream, group_positions(store, stream), set())
        late.save(store)
        assert late.stale == {group}
        # Its next pass sees the release like everyone else.
        late.load(store)
        assert late.observe(store, stream, group_positions(store, stream), set())[group][1]
        late.save(store)
        assert late.stale == set()
    finally:
        store.call("XGROUP", "DESTROY", stream, group)
        store.close()


def test_a_sink_process_killed_is_restarted_and_all_die_with_the_writer(
        writer_factory: Any, chdb_path: str) -> None:
    """One process per sink: kill -9 of a child restarts it after a backoff; kill -9 of the
    writer leaves no child behind."""
    w = writer_factory(env={"ACM_WRITER_SINKS": "clickhouse,questdb", "ACM_CHDB_PATH": chdb_path,
                            # Nobody listens there: that child retries, alive, as when it is down.
                            "QUESTDB_URL": f"http::addr=127.0.0.1:{free_port()};"})
    assert w.proc is not None

    def children() -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(w.proc.pid)], capture_output=True, text=True)
        return sorted(int(x) for x in out.stdout.split())

    deadline = time.monotonic() + 20
    while len(children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    first = children()
    assert len(first) == 2, w.read_log()
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (first[0] in children() or len(children()) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    now = children()
    assert first[0] not in now and first[1] in now and len(now) == 2, w.read_log()
    assert re.search(rf"writer child for sink \w+ \(pid {first[0]}\) exited with status 9; "
                     r"restarting in \d\.\ds", w.read_log())
    w.proc.kill()  # the parent alone: its children must not live on as orphans
    w.proc.wait(5)
    deadline = time.monotonic() + 20  # each finishes its batch on the SIGTERM it gets
    while any(_running(p) for p in now) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(p) for p in now), w.read_log()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
