"""The decision contract, pinned line by line against a real pool and a real Redis store."""

from __future__ import annotations

import threading

import msgpack
import pytest

from acm_module.core import keys
from acm_module.core import liveconfig as store_config
from acm_module.decide.client import Client
from acm_module.decide.store.conn import StoreConnection
from tests.support.numbers import a_num, cid
from tests.support.servers import flush

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

B = "+2348039999999"


def stream_entries(url: str, partitions: int = 16) -> list[dict[str, str]]:
    """Return every record of every durable stream, decoded."""
    c = StoreConnection(url, timeout=2.0)
    out = []
    try:
        for p in range(partitions):
            for _id, f in c.call("XRANGE", keys.stream(p), "-", "+"):  # type: ignore[union-attr]
                out.append({f[i].decode(): f[i + 1].decode() for i in range(0, len(f), 2)})
    finally:
        c.close()
    return out


def decisions(url: str) -> list[dict[str, str]]:
    return [r for r in stream_entries(url) if r["k"] == "d"]


def alert_records(url: str) -> list[dict[str, str]]:
    return [r for r in stream_entries(url) if r["k"] == "a"]


def test_seed_scenario_seven_callers_one_critical_alert(client: Client, service) -> None:
    t0 = 1_800_000_000.0
    replies = [client.decide(cid(), a_num(i), "0803 999 9999", ts=t0 + i * 0.3) for i in range(7)]
    assert [r["verdict"] for r in replies] == ["allow"] * 4 + ["drop"] * 3
    assert [r["distinct"] for r in replies] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["reason"] for r in replies] == ["clean"] * 4 + ["masking"] * 3
    assert all("alert_id" not in r for r in replies[:4])
    ids = {r["alert_id"] for r in replies[4:]}
    assert len(ids) == 1
    assert [r["severity"] for r in replies[4:]] == ["HIGH", "HIGH", "CRITICAL"]
    alerts = alert_records(service.store_url)
    assert {a["al"] for a in alerts} == ids
    assert [a["op"] for a in alerts] == ["open", "update", "update"]
    last = alerts[-1]
    assert last["sv"] == "CRITICAL" and last["n"] == "7" and last["b"] == B
    assert sorted(last["an"].split(",")) == sorted(a_num(i) for i in range(7))
    # The partition's alert counters (what the metrics exporter reads) saw one HIGH alert open
    # and one escalation to CRITICAL.
    from acm_module.decide.engine import hotpath

    conn = StoreConnection(service.store_url, timeout=2.0)
    try:
        raw = conn.call("HGETALL", keys.counters(hotpath.partition_of(B, 16)))
    finally:
        conn.close()
    counts = {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}
    assert counts == {"open:HIGH": 1, "upd": 2, "esc:CRITICAL": 1}


def test_invalid_b_and_unverifiable_cli_change_no_state(client: Client, service) -> None:
    for raw in ["anonymous", "unknown", "", "12345", "abc123456789", "+1234567890123456"]:
        r = client.decide(cid(), a_num(1), raw, ts=1000.0)
        assert r == {"verdict": "allow", "reason": "invalid_b", "distinct": 0}
    for raw in ["anonymous", "sip:anonymous@anonymous.invalid", "unknown", "0803"]:
        r = client.decide(cid(), raw, B, ts=1000.0)
        assert r == {"verdict": "allow", "reason": "unverifiable_cli", "distinct": 0}
    r = client.decide(cid(), None, B, ts=1000.0)
    assert r["reason"] == "unverifiable_cli"
    # Neither touched the window: the next real caller is the first.
    assert client.decide(cid(), a_num(1), B, ts=1000.1)["distinct"] == 1
    # ...but every decision reached the durable stream.
    reasons = [d["r"] for d in decisions(service.store_url)]
    assert reasons.count("invalid_b") == 6 and reasons.count("unverifiable_cli") == 5


@pytest.mark.parametrize("form", [
    "+2348039999999", "2348039999999", "08039999999", "002348039999999",
    "sip:08039999999@10.0.0.1", "sips:+234-803-999-9999@host;user=phone",
    "tel:+234.803.999.9999;phone-context=ng", "(0803) 999 9999", "<sip:+2348039999999@h>",
])
def test_number_forms_count_as_one_b_number(client: Client, form: str) -> None:
    client.decide(cid(), a_num(1), B, ts=50.0)
    assert client.decide(cid(), a_num(2), form, ts=50.1)["distinct"] == 2


def test_repeated_call_id_gets_the_same_reply_and_changes_nothing(client: Client, service) -> None:
    first = [client.decide(f"dup-{i}", a_num(i), B, ts=10 + i * 0.1) for i in range(5)]
    assert first[-1]["verdict"] == "drop"
    again = [client.decide(f"dup-{i}", a_num(i), B, ts=10 + i * 0.1) for i in range(5)]
    assert again == first
    # A retransmission with another timestamp is still the same call.
    assert client.decide("dup-2", a_num(2), B, ts=12.0) == first[2]
    assert client.decide(cid(), a_num(99), B, ts=10.5)["distinct"] == 6
    assert len(decisions(service.store_url)) == 6
    assert len(alert_records(service.store_url)) == 2  # open + the 6th caller's update


def test_whitelisted_b_is_allowed_and_not_counted(client: Client, service) -> None:
    conn = StoreConnection(service.store_url, timeout=2.0)
    try:
        store_config.whitelist_set(conn, B, 16, "bank IVR")
        replies = [client.decide(cid(), a_num(i), B, ts=100 + i * 0.1) for i in range(10)]
        assert all(r == {"verdict": "allow", "reason": "whitelisted", "distinct": 0}
                   for r in replies)
        store_config.whitelist_del(conn, B, 16)
    finally:
        conn.close()
    assert client.decide(cid(), a_num(50), B, ts=101.5)["distinct"] == 1


def test_window_slides_and_latest_ts_is_the_max(client: Client) -> None:
    t = 5000.0
    for i in range(4):
        client.decide(cid(), a_num(i), B, ts=t + i)  # 5000..5003
    # A late-arriving older call from caller 3 must not pull its latest ts back.
    assert client.decide(cid(), a_num(3), B, ts=t + 0.5)["distinct"] == 4
    # At 5005.5 callers 0 (5000) has left the 5 s window; 1..3 are in, plus caller 9.
    r = client.decide(cid(), a_num(9), B, ts=t + 5.5)
    assert r["distinct"] == 4 and r["verdict"] == "allow"
    # Exactly at the window's edge a caller still counts: ts - window <= latest.
    r = client.decide(cid(), a_num(10), B, ts=t + 6.0)
    assert r["distinct"] == 5 and r["verdict"] == "drop"


def test_one_alert_per_episode(client: Client, service) -> None:
    t = 20000.0
    ep1 = [client.decide(cid(), a_num(i), B, ts=t + i * 0.1) for i in range(6)]
    # A detection within the window of the previous one joins the episode...
    ep1 += [client.decide(cid(), a_num(10 + i), B, ts=t + 4 + i * 0.1) for i in range(3)]
    ids1 = {r["alert_id"] for r in ep1 if r["verdict"] == "drop"}
    assert len(ids1) == 1
    # ...a detection after a quiet spell longer than the window opens a new alert.
    t2 = t + 30
    ep2 = [client.decide(cid(), a_num(100 + i), B, ts=t2 + i * 0.1) for i in range(5)]
    ids2 = {r["alert_id"] for r in ep2 if r["verdict"] == "drop"}
    assert len(ids2) == 1 and ids2.isdisjoint(ids1)
    ops = [(a["al"], a["op"]) for a in alert_records(service.store_url)]
    assert [op for _, op in ops].count("open") == 2


def test_blocking_drops_every_caller_of_a_detection(service_factory) -> None:
    with service_factory(env={"ACM_BLOCK_TTL": "60"}) as (svc, client):
        t = 3000.0
        rs = [client.decide(cid(), a_num(i), B, ts=t + i * 0.1) for i in range(5)]
        assert rs[-1]["reason"] == "masking"
        alert_id = rs[-1]["alert_id"]
        # A blocked caller is dropped on any B-number and not counted there.
        other = "+2348051111111"
        r = client.decide(cid(), a_num(0), other, ts=t + 10)
        assert r == {"verdict": "drop", "reason": "blocked", "distinct": 0,
                     "alert_id": alert_id, "severity": "HIGH"}
        assert client.decide(cid(), a_num(77), other, ts=t + 10.1)["distinct"] == 1
        # The block runs out block_ttl seconds after the detecting call (in call time).
        r = client.decide(cid(), a_num(0), other, ts=t + 0.4 + 60.5)
        assert r["reason"] == "clean"
        conn = StoreConnection(svc.store_url, timeout=2.0)
        try:
            listed = {e["a_number"] for e in store_config.list_blocks(conn, 16)}
            assert listed == {a_num(i) for i in range(5)}
            assert store_config.unblock(conn, a_num(1), 16)
        finally:
            conn.close()
        assert client.decide(cid(), a_num(1), other, ts=t + 11)["reason"] == "clean"


def test_monitor_mode_detects_but_allows(service_factory) -> None:
    with service_factory(env={"ACM_MODE": "monitor"}) as (svc, client):
        rs = [client.decide(cid(), a_num(i), B, ts=700 + i * 0.1) for i in range(6)]
        assert all(r["verdict"] == "allow" for r in rs)
        assert [r["reason"] for r in rs][-2:] == ["masking", "masking"]
        assert rs[-1]["severity"] == "HIGH" and rs[-1]["alert_id"]
        assert len(alert_records(svc.store_url)) == 2


def test_threshold_and_window_from_env(service_factory) -> None:
    env = {"ACM_DETECTION_THRESHOLD": "3", "ACM_DETECTION_WINDOW_SECONDS": "2"}
    with service_factory(env=env) as (_svc, client):
        rs = [client.decide(cid(), a_num(i), B, ts=900 + i * 0.5) for i in range(3)]
        assert [r["verdict"] for r in rs] == ["allow", "allow", "drop"]
        assert rs[-1]["severity"] == "LOW"
        # At 902.6 the 2 s window starts at 900.6: only the caller of 901.0 is still in it.
        assert client.decide(cid(), a_num(9), B, ts=902.6)["distinct"] == 2


def test_service_time_is_used_when_ts_is_absent(client: Client) -> None:
    rs = [client.decide(cid(), a_num(i), B) for i in range(5)]
    assert [r["distinct"] for r in rs] == [1, 2, 3, 4, 5]
    assert rs[-1]["verdict"] == "drop"


def test_optional_fields_reach_the_stream(client: Client, service) -> None:
    client.decide("with-ip", a_num(1), B, ts=77.0, src_ip="192.0.2.7", trunk="IGW-1")
    (d,) = decisions(service.store_url)
    assert (d["id"], d["a"], d["b"], d["ts"], d["ip"], d["tr"]) == (
        "with-ip", a_num(1), B, "77000", "192.0.2.7", "IGW-1")
    assert (d["v"], d["r"], d["n"]) == ("allow", "clean", "1")


# -- bad input -------------------------------------------------------------------------------

BAD = [
    (b"\xc1", "bad_msgpack"),
    (b"\x83\xa7call_id", "bad_msgpack"),
    (msgpack.packb({"call_id": "x", "a": "1"}) + b"\x00", "bad_msgpack"),
    (msgpack.packb([1, 2, 3]), "not_a_map"),
    (msgpack.packb("hello"), "not_a_map"),
    (msgpack.packb({"call_id": "x", "a": "1"}), "missing_field"),
    (msgpack.packb({"call_id": 7, "a": "1", "b": "2"}), "bad_type"),
    (msgpack.packb({"call_id": "x", "a": 1, "b": "2"}), "bad_type"),
    (msgpack.packb({"call_id": "x", "a": "1", "b": "2", "ts": "now"}), "bad_type"),
    (msgpack.packb({"call_id": "x", "a": "1", "b": "2", "ts": float("nan")}), "bad_value"),
    (msgpack.packb({"call_id": "x", "a": "1", "b": "2", "ts": -5}), "bad_value"),
    (msgpack.packb({"call_id": "", "a": "1", "b": "2"}), "bad_value"),
    (msgpack.packb({"call_id": "x", "a": "1", "b": "2", "evil": 1}), "unknown_field"),
    (msgpack.packb({"call_id": "x", "a": "1", "b": "2", 5: 1}), "unknown_field"),
    (msgpack.packb({"call_id": "x", "a": "1", "b": "2", "trunk": {"x": [1]}}), "bad_type"),
    (msgpack.packb({"call_id": "x" * 300, "a": "1", "b": "2"}), "bad_value"),
    (msgpack.packb({"call_id": "x", "a": "1", "b": b"\xff\xfe"}), "bad_type"),
    (b"\x83\xa7call_id\xa1x\xa1a\xa11\xa1b\xa2\xff\xfe", "bad_value"),
    (b"\x91" * 100 + b"\xc0", "bad_msgpack"),
    (b"\xdd\xff\xff\xff\xff", "bad_msgpack"),
    (b"", "bad_msgpack"),
    (msgpack.packb({"call_id": "x", "a": "1" * 5000, "b": "2"}), "too_large"),
]


@pytest.mark.parametrize(("frame", "code"), BAD, ids=[c for _, c in BAD])
def test_bad_requests_get_a_clear_error(client: Client, frame: bytes, code: str) -> None:
    reply = msgpack.unpackb(client.request_raw(frame))
    assert reply["error"] == code
    assert isinstance(reply["message"], str) and reply["message"]
    assert set(reply) == {"error", "message"}


def test_multipart_request_is_refused_and_the_worker_lives_on(client: Client) -> None:
    reply = msgpack.unpackb(client.request_raw([b"\x80", b"\x80"]))
    assert reply["error"] == "bad_frame"
    assert client.decide(cid(), a_num(1), B, ts=1.0)["distinct"] == 1


def test_workers_survive_a_flood_of_garbage(client: Client, service) -> None:
    import random

    rng = random.Random(7)
    for _ in range(2000):
        frame = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        reply = msgpack.unpackb(client.request_raw(frame))
        assert "error" in reply or "verdict" in reply
    pids = service.worker_pids()
    assert len(pids) == 2
    assert client.decide(cid(), a_num(1), B, ts=2.0)["distinct"] == 1
    assert service.worker_pids() == pids  # nobody died and was respawned


# -- concurrency -----------------------------------------------------------------------------

def test_concurrent_clients_on_the_same_b_number(service, zctx) -> None:
    flush(service.store_url)
    n = 12
    results: list[dict] = [{}] * n
    barrier = threading.Barrier(n)

    def call(i: int) -> None:
        c = Client(service.endpoint, timeout=5.0, context=zctx)
        try:
            barrier.wait()
            results[i] = c.decide(f"conc-{i}", a_num(i), B, ts=4242.0)
        finally:
            c.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # The store serialises the scripts: the i-th caller sees i distinct callers, whatever the
    # worker, so exactly n - threshold + 1 calls are dropped, all under one alert.
    assert all("distinct" in r for r in results), results
    assert sorted(r["distinct"] for r in results) == list(range(1, n + 1))
    drops = [r for r in results if r["verdict"] == "drop"]
    assert len(drops) == n - 5 + 1
    assert len({r["alert_id"] for r in drops}) == 1
    assert len([a for a in alert_records(service.store_url) if a["op"] == "open"]) == 1
