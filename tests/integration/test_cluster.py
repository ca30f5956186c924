"""acm on a real Redis Cluster (3 masters, 3 replicas on loopback, tests/servers.py)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from acm_module.decide.client import Client
from tests.integration.test_replay_reference import make_events
from tests.support.reference import Reference, mismatches
from tests.support.servers import RedisCluster, Service

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]


def test_two_nodes_with_different_seeds_decide_as_one(empty_cluster: RedisCluster,
                                                      zctx: zmq.Context) -> None:
    """Two `acm serve` nodes, one seeded with a master and one with a replica, answer one
    interleaved stream: every verdict, distinct count and alert grouping is the single-node
    reference's, and every master holds keys."""
    cl = empty_cluster
    replica = next(p for p in cl.ports if p not in cl.master_ports())
    events = make_events(3, 1500)
    ref = Reference()
    nodes = [Service(cl.url(0)), Service(f"redis://127.0.0.1:{replica}/0")]
    clients: list[Client] = []
    try:
        for n in nodes:
            n.start()
            clients.append(Client(n.endpoint, timeout=10.0, context=zctx))
        bad = mismatches(ref, events, lambda k, call_id, a, b, ts:
                         clients[k % 2].decide(call_id, a, b, ts=ts))
    finally:
        for c in clients:
            c.close()
        for n in nodes:
            n.cleanup()
    assert bad[:5] == []
    assert len(ref.alerts) >= 10
    sizes = {p: int(cl.redis(p, "DBSIZE").strip()) for p in cl.master_ports()}
    assert all(v > 0 for v in sizes.values()), sizes


def _b(i: int) -> str:
    return f"+2348{i:09d}"


def _a(i: int) -> str:
    return f"+2347{i:09d}"


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_failover_under_load(empty_cluster: RedisCluster, zctx: zmq.Context, how: str) -> None:
    """A master dies (SIGKILL) or hangs (SIGSTOP) under load; its replica takes over. Every
    request is answered within the store timeout (a verdict or store_unavailable), service
    resumes after the switch, and what was decided before it is still counted after it."""
    cl = empty_cluster
    victim = cl.master_ports()[1]
    seed = next(p for p in cl.master_ports() if p != victim)
    timeout_ms = 200
    node = Service(f"redis://127.0.0.1:{seed}/0",
                   extra_env={"ACM_STORE_TIMEOUT_MS": str(timeout_ms), "ACM_THRESHOLD": "50",
                              # State lives 2 windows: long enough for a slow failover.
                              "ACM_WINDOW": "60"})
    c = None
    try:
        node.start()
        c = Client(node.endpoint, timeout=5.0, context=zctx)
        bs = 64  # B-numbers over every partition, so every master holds some
        ts = 1_800_000_000.0
        for i in range(bs):
            for j in range(3):
                assert c.decide(f"pre{i}.{j}", _a(i * 10 + j), _b(i), ts=ts)["distinct"] == j + 1
        # Replication is asynchronous: the contract covers what reached the replica.
        cl.wait_replicated()
        slowest = 0.0
        codes: list[tuple[float, str]] = []
        t0 = time.monotonic()
        killed_at = 0.0
        k = 0
        while True:
            now = time.monotonic() - t0
            if not killed_at and now > 0.5:
                cl.stop_node(victim, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
                killed_at = now
            if killed_at and now > 2.0 and victim not in cl.master_ports() \
                    and len(codes) > 20 and all(x == "ok" for _, x in codes[-20:]):
                break
            assert now < 30, "no recovery within 30 s"
            s = time.monotonic()
            r = c.decide(f"load{k}", _a(100000 + k), _b(1000 + k % 97), ts=ts + 1 + k * 1e-3)
            slowest = max(slowest, time.monotonic() - s)
            codes.append((now, "ok" if "verdict" in r else r.get("error", "?")))
            k += 1
        print(f"failover {how}: {len(codes)} requests in {codes[-1][0] - killed_at:.2f}s "
              f"after the {how}, slowest {slowest:.3f}s, "
              f"store_unavailable {sum(x != 'ok' for _, x in codes)}")
        assert {x for _, x in codes} <= {"ok", "store_unavailable"}
        assert any(x == "store_unavailable" for _, x in codes)  # the switch was seen
        # Nothing waits beyond the store timeout (plus reconnect work and a loaded machine).
        assert slowest < timeout_ms / 1000.0 * 3 + 0.5, slowest
        # What was decided before the switch is still there: a 4th caller is the 4th.
        for i in range(bs):
            r = c.decide(f"post{i}", _a(i * 10 + 9), _b(i), ts=ts + 2)
            assert r.get("distinct") == 4, (i, r)
    finally:
        if c is not None:
            c.close()
        node.cleanup()
        cl.restore()


def _mi(svc: Service, cmd: str, params: dict | None = None) -> dict:
    from opensips.mi import OpenSIPSMI

    return OpenSIPSMI(conn="http", url=f"http://{svc.mi_http}/mi").execute(cmd, params or {})


def _wait(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_one_live_config_for_the_deployment(empty_cluster: RedisCluster) -> None:
    """An MI change on one node is the live config of every node; a node that joins later (on
    another host's state_dir) applies it instead of its own file; acm_stats says per node
    whether it applies the current generation."""
    cl = empty_cluster
    a = Service(cl.url(0))
    b = Service(cl.url(1))
    c = Service(cl.url(2))
    try:
        a.start()
        b.start()
        r = _mi(a, "acm_set", {"threshold": 3, "mode": "monitor"})
        assert r["changed"] and r["persisted"]
        got = _mi(b, "acm_get_config")
        assert (got["live"]["threshold"], got["live"]["mode"]) == (3, "monitor")
        assert got["overrides"] == {"threshold": 3, "mode": "monitor"}
        # A change through the other node is the deployment's too.
        _mi(b, "acm_set", {"threshold": 4})
        assert _mi(a, "acm_get_config")["overrides"] == {"threshold": 4, "mode": "monitor"}
        c.start()  # joins with its own (default) settings and an empty state_dir
        for svc in (a, b, c):
            _wait(lambda s=svc: (lambda g: (g["live"]["threshold"], g["live"]["mode"])
                                 == (4, "monitor"))(_mi(s, "acm_get_config")),
                  "the joining node did not keep the deployment's config")
        def all_in_sync() -> bool:
            st = _mi(c, "acm_stats")
            return len(st["nodes"]) == 3 and all(n["in_sync"] for n in st["nodes"])
        _wait(all_in_sync, "not every node applies the live generation")
        st = _mi(a, "acm_stats")
        assert {n["workers"] for n in st["nodes"]} == {2}
    finally:
        for svc in (a, b, c):
            svc.cleanup()


def test_the_mi_changes_the_live_config_while_a_seed_is_down(
        empty_cluster: RedisCluster) -> None:
    """The first seed of the store URL is down: the node starts, and its MI changes and reads
    the deployment's live config through the seeds that answer."""
    cl = empty_cluster
    down = next(p for p in cl.ports if p not in cl.master_ports())  # a replica: no failover
    seeds = [down, *(p for p in cl.ports if p != down)]
    cl.stop_node(down)
    a = Service("redis://" + ",".join(f"127.0.0.1:{p}" for p in seeds) + "/0")
    try:
        a.start()
        r = _mi(a, "acm_set", {"threshold": 3})
        assert r["changed"] and r["persisted"]
        got = _mi(a, "acm_get_config")
        assert got["live"]["threshold"] == 3 and got["overrides"] == {"threshold": 3}
    finally:
        a.cleanup()


def test_the_mi_answers_store_unavailable_while_the_cluster_is_down(
        empty_cluster: RedisCluster) -> None:
    """Every node down: the MI answers store_unavailable (-32000) within its store timeout,
    not an internal error; once the nodes are back, the next change is live."""
    from opensips.mi import OpenSIPSMIException

    from acm_module.control import jsonrpc

    cl = empty_cluster
    a = Service(cl.seeds_url)
    try:
        a.start()
        assert _mi(a, "acm_set", {"threshold": 3})["changed"]
        for p in cl.ports:
            cl.stop_node(p)
        t0 = time.monotonic()
        with pytest.raises(OpenSIPSMIException) as e:
            _mi(a, "acm_set", {"threshold": 4})
        took = time.monotonic() - t0
        cause = e.value.__cause__
        assert getattr(cause, "code", None) == jsonrpc.STORE_UNAVAILABLE, e.value
        assert "detection store unavailable" in str(getattr(cause, "message", "")), e.value
        assert took < 5.0, took  # the control plane's store timeout is 1 s, a few tries
        cl.restore()
        _wait(lambda: _ok(lambda: _mi(a, "acm_set", {"threshold": 5})),
              "the MI did not reach the cluster again", timeout=20.0)
        assert _mi(a, "acm_get_config")["live"]["threshold"] == 5
    finally:
        a.cleanup()


def _ok(f: Callable[[], object]) -> bool:
    from opensips.mi import OpenSIPSMIException

    try:
        f()
    except OpenSIPSMIException:
        return False
    return True


def _slot_owner(cl: RedisCluster, slot: int) -> int:
    from acm_module.decide.store.cluster import StoreClient

    s = StoreClient(cl.seeds_url, timeout=2.0)
    try:
        s.connect()
        return s.master_of_slot(slot)[1]
    finally:
        s.close()


def _migrate_slot(cl: RedisCluster, slot: int, src: int, dst: int, done: list[int]) -> None:
    """Move one slot from master src to master dst the way redis-cli --cluster reshard does:
    IMPORTING/MIGRATING, MIGRATE the keys a few at a time, then SETSLOT NODE everywhere."""
    def node_id(p: int) -> str:
        return cl.redis(p, "CLUSTER", "MYID").strip()

    sid, did = node_id(src), node_id(dst)
    cl.redis(dst, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", sid)
    cl.redis(src, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", did)
    while True:
        keys = cl.redis(src, "CLUSTER", "GETKEYSINSLOT", str(slot), "10").split()
        if not keys:
            break
        cl.redis(src, "MIGRATE", "127.0.0.1", str(dst), "", "0", "5000", "KEYS", *keys)
        done[0] += len(keys)
        time.sleep(0.01)  # keep the slot half-moved for a while: requests meet ASK
    # The importing node first (as redis-cli does): else the source sends MOVED to a node that
    # still imports the slot and sends MOVED back.
    for p in [dst, src, *(p for p in cl.master_ports() if p not in (src, dst))]:
        cl.redis(p, "CLUSTER", "SETSLOT", str(slot), "NODE", did)


def test_slot_migration_under_load(empty_cluster: RedisCluster, zctx: zmq.Context) -> None:
    """A partition's slot moves to another master while calls keep coming: ASK and MOVED are
    followed and every verdict is still the single-node reference's. While the partition's
    keys are on both sides its scripts may get TRYAGAIN (retried within the store timeout,
    else answered store_error, which decides nothing)."""
    import threading

    from acm_module.decide.engine import hotpath
    from acm_module.decide.store.cluster import key_slot

    cl = empty_cluster
    events = make_events(4, 2500)
    ref = Reference()
    node = Service(cl.seeds_url)
    c = None
    try:
        node.start()
        c = Client(node.endpoint, timeout=10.0, context=zctx)
        # The busiest partition's slot, moved once a fifth of the traffic has built state.
        parts = [hotpath.partition_of(b, 16) for _, _, b, _ in events if b.startswith("+")]
        busiest = max(set(parts), key=parts.count)
        slot = key_slot(b"{acm.%d}" % busiest)
        owner = _slot_owner(cl, slot)
        dst = next(p for p in cl.master_ports() if p != owner)
        moved = [0]
        mover = threading.Thread(target=_migrate_slot, args=(cl, slot, owner, dst, moved))

        def decide(k: int, call_id: str, a: str, b: str, ts: float) -> dict:
            if k == len(events) // 5:
                mover.start()
            return c.decide(call_id, a, b, ts=ts)  # type: ignore[union-attr]
        tryagain = []

        def undecided(r: dict) -> bool:
            if r.get("error") == "store_error" and "TRYAGAIN" in r.get("message", ""):
                tryagain.append(r)
                return True
            return False
        bad = mismatches(ref, events, decide, undecided)
        mover.join(30)
        assert not mover.is_alive()
    finally:
        if c is not None:
            c.close()
        node.cleanup()
    assert bad[:3] == [], [(x[0], x[5], x[6]) for x in bad[:3]]
    assert moved[0] > 0 and _slot_owner(cl, slot) == dst
    assert len(tryagain) < len(events) // 10, len(tryagain)


def test_twins_fuzzed_against_each_other_on_a_cluster(empty_cluster: RedisCluster) -> None:
    """The same fuzzed batches, decided by the compiled hot path and by its pure-Python twin,
    each from an empty cluster through the cluster client: the same replies, batch by batch."""
    import random

    from acm_module import _hotpath as cy
    from acm_module.decide.engine import hotpath_py as py
    from acm_module.decide.store.cluster import StoreClient
    from acm_module.decide.store.conn import load_script
    from tests.unit.test_twins import NOW, _frames, _good_frame

    rnd = random.Random(14)
    gen = _frames(rnd)
    batches = [[(_good_frame(rnd) if rnd.random() < 0.85 else next(gen)[0])
                for _ in range(rnd.randint(1, 16))] for _ in range(200)]
    outs = []
    for mod in (cy, py):
        s = StoreClient(empty_cluster.seeds_url, timeout=5.0)
        try:
            s.connect()
            s.on_each_master("FLUSHALL")
            sha = s.script_load(load_script("decide"))
            d = mod.Decider(decide_sha=sha, alert_prefix="0123abcd-0000-4000-8000",
                            threshold=3)
            got = []
            for k, frames in enumerate(batches):
                d.begin(frames, NOW + k * 50, (NOW + k * 50) * 1000)
                payload, n = d.pipeline()
                got.append(d.finish(s.round_trip(payload, n) if n else []))
            outs.append((got, dict(d.counts)))
        finally:
            s.close()
    assert outs[0] == outs[1]
    counts = outs[0][1]
    assert counts.get("drop:masking", 0) > 0 and counts.get("allow:clean", 0) > 100


def test_tls_and_an_acl_user(tmp_path: Path, zctx: zmq.Context) -> None:
    """`rediss://user:password@host:port/0?ssl_ca_certs=...` (a managed Redis): acm serve logs
    in over TLS as an ACL user and decides; a store whose certificate it cannot verify is not
    used (store_unavailable)."""
    import shutil
    import subprocess

    from acm_module.decide.store.cluster import StoreClient
    from tests.support.servers import free_port, unavailable, wait_port

    if shutil.which("openssl") is None:
        unavailable("openssl is not installed (needed to make a test certificate)")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"), "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    srv = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file",
         str(tmp_path / "key.pem"), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes: list[Service] = []
    c = None
    try:
        assert wait_port(port)
        ca = f"ssl_ca_certs={tmp_path / 'cert.pem'}"
        admin = StoreClient(f"rediss://127.0.0.1:{port}/0?{ca}", timeout=2.0)
        admin.call("ACL", "SETUSER", "acm", "on", ">s3cr#t", "~*", "&*", "+@all")
        admin.call("ACL", "SETUSER", "default", "off")
        admin.close()
        good = Service(f"rediss://acm:s3cr%23t@127.0.0.1:{port}/0?{ca}")
        nodes.append(good)
        good.start()
        c = Client(good.endpoint, timeout=5.0, context=zctx)
        ts = 1_800_000_000.0
        got = [c.decide(f"t{i}", _a(i), _b(1), ts=ts + i * 0.1)["distinct"] for i in range(3)]
        assert got == [1, 2, 3]
        assert "s3cr" not in good.read_log()
        c.close()
        # Without the CA the certificate does not verify: no decision, store_unavailable.
        bad = Service(f"rediss://acm:s3cr%23t@127.0.0.1:{port}/0")
        nodes.append(bad)
        bad.start(wait=False)
        c = Client(bad.endpoint, timeout=5.0, context=zctx)
        _wait(lambda: Path(bad.endpoint[6:]).exists(), "no endpoint")
        r = c.decide("t-bad", _a(9), _b(1), ts=ts + 1)
        assert r.get("error") == "store_unavailable", r
        assert "CERTIFICATE_VERIFY_FAILED" in bad.read_log()
    finally:
        if c is not None:
            c.close()
        for n in nodes:
            n.cleanup()
        srv.kill()
        srv.wait(5)
