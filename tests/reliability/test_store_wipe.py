"""The store loses its data under a running service: FLUSHALL, or a restart without persistence.

What must hold (issue 12, items 4 and 5): the next MI change reaches every worker (a
generation is never handed out twice, and workers compare content), the control plane puts
the live config back, MI overrides included, and `acm_stats` says `in_sync` only when every
worker runs the store's config. Checked through the decisions a real pool makes against a real
redis-server.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from acm_module.decide.client import Client
from acm_module.decide.store.conn import StoreConnection
from tests.support.servers import RedisServer, Service, wait_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

_n = itertools.count()


def mi(svc: Service, method: str, params: dict[str, Any] | None = None) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}})
    req = urllib.request.Request(f"http://{svc.mi_http}/mi", body.encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        rep = json.loads(r.read())
    assert "result" in rep, (method, params, rep)
    return rep["result"]


def wait_until(pred: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except OSError as e:  # the MI answers again once the store is back
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def in_sync(svc: Service) -> dict[str, Any] | None:
    st = mi(svc, "acm_stats")
    ok = st["in_sync"] and len(st["workers"]) == svc.workers and st["generation"] > 0
    return st if ok else None


def callers_to_one_b(client: Client, n: int) -> list[str]:
    """n distinct callers to one fresh B within a second; return the verdicts."""
    run = next(_n)
    b = f"+23480{run:03d}{time.monotonic_ns() % 100000:05d}"
    t0 = time.time()
    return [client.decide(f"wipe-{run}-{i}-{time.monotonic_ns()}", f"+2348031{run:03d}{i:03d}",
                          b, ts=t0 + i * 0.1)["verdict"] for i in range(n)]


@pytest.fixture
def served() -> Iterator[tuple[RedisServer, Service, Client]]:
    srv = RedisServer().start()
    svc = Service(srv.url, workers=2)
    client = None
    try:
        svc.start()
        wait_until(lambda: in_sync(svc), "a pool in sync")
        client = Client(svc.endpoint, timeout=5.0)
        yield srv, svc, client
    finally:
        if client is not None:
            client.close()
        svc.cleanup()
        srv.cleanup()


def test_after_flushall_the_next_change_reaches_every_worker(served) -> None:  # type: ignore[no-untyped-def]
    srv, svc, client = served
    assert callers_to_one_b(client, 3) == ["allow"] * 3  # threshold 5
    assert callers_to_one_b(client, 2) == ["allow"] * 2  # an episode under way
    conn = StoreConnection(srv.url, timeout=2.0)
    try:
        conn.call("FLUSHALL")
    finally:
        conn.close()
    r = mi(svc, "acm_set", {"threshold": 3})
    assert r["changed"] == {"threshold": {"old": 5, "new": 3}}
    st = wait_until(lambda: in_sync(svc), "in_sync after the change")
    assert st["generation"] >= r["generation"]
    cfg = mi(svc, "acm_get_config")
    assert cfg["live"]["threshold"] == 3 and cfg["generation"] > 0
    # in_sync said so: every worker drops the third distinct caller now.
    for _ in range(4):  # connections spread over both workers
        with Client(svc.endpoint, timeout=5.0) as c:
            assert callers_to_one_b(c, 3) == ["allow", "allow", "drop"]


def test_after_flushall_the_control_plane_restores_the_live_config(served) -> None:  # type: ignore[no-untyped-def]
    srv, svc, client = served
    r = mi(svc, "acm_set", {"threshold": 3, "mode": "block"})
    assert r["changed"] == {"threshold": {"old": 5, "new": 3}}  # mode was block already
    wait_until(lambda: in_sync(svc), "in_sync")
    conn = StoreConnection(srv.url, timeout=2.0)
    try:
        conn.call("FLUSHALL")
        flushed = time.monotonic()
        # The workers keep deciding with what they hold, and acm_stats does not claim
        # they run the (absent) store config.
        assert callers_to_one_b(client, 3) == ["allow", "allow", "drop"]
        restored = wait_until(lambda: mi(svc, "acm_get_config")["live"], "restored config", 5)
        print(f"store wipe: FLUSHALL -> live config restored (threshold 3 override) in "
              f"{(time.monotonic() - flushed) * 1e3:.0f} ms; workers kept dropping the 3rd "
              f"caller meanwhile")
        assert restored["threshold"] == 3 and restored["mode"] == "block"
        assert mi(svc, "acm_get_config")["overrides"] == {"threshold": 3}
        wait_until(lambda: in_sync(svc), "in_sync after the restore")
        assert callers_to_one_b(client, 3) == ["allow", "allow", "drop"]
    finally:
        conn.close()


def test_overrides_survive_an_empty_restart_of_the_store(served) -> None:  # type: ignore[no-untyped-def]
    srv, svc, client = served
    gen0 = mi(svc, "acm_stats")["generation"]
    r = mi(svc, "acm_set", {"threshold": 3})
    wait_until(lambda: in_sync(svc), "in_sync")
    srv.stop()
    srv.start()  # no persistence: it comes back empty
    back = time.monotonic()
    assert wait_port(srv.port)

    def restored() -> bool:
        cfg = mi(svc, "acm_get_config")
        return bool(cfg["live"]) and cfg["live"]["threshold"] == 3
    wait_until(restored, "the override back in the store")
    print(f"store wipe: empty restart -> live config with the override restored "
          f"{(time.monotonic() - back) * 1e3:.0f} ms after the store's start")
    st = wait_until(lambda: in_sync(svc), "in_sync after the restart")
    # Generations never repeat: the restored one is newer than any handed out before.
    assert st["generation"] > r["generation"] > gen0
    # ... and it stays: nothing republishes the boot config over it.
    time.sleep(2.5)
    cfg = mi(svc, "acm_get_config")
    assert cfg["live"]["threshold"] == 3 and cfg["overrides"] == {"threshold": 3}
    wait_until(lambda: callers_to_one_b(client, 3) == ["allow", "allow", "drop"],
               "the pool deciding with threshold 3 again")
    # The next change after the restart reaches the workers too.
    r = mi(svc, "acm_set", {"threshold": 4})
    wait_until(lambda: (s := in_sync(svc)) and s["generation"] >= r["generation"],
               "in_sync with threshold 4")
    assert callers_to_one_b(client, 4) == ["allow"] * 3 + ["drop"]
    assert "Traceback" not in svc.read_log()


def test_a_worker_respawned_into_the_wiped_store_does_not_undo_the_overrides(served) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    srv, svc, _ = served
    r = mi(svc, "acm_set", {"threshold": 3})
    wait_until(lambda: (s := in_sync(svc)) and s["generation"] >= r["generation"], "in_sync")
    conn = StoreConnection(srv.url, timeout=2.0)
    try:
        conn.call("FLUSHALL")
        # Its replacement boots at once, into the empty store, before the control process's
        # check: it publishes its start-up settings (threshold 5).
        os.kill(svc.worker_pids()[0], signal.SIGKILL)
    finally:
        conn.close()

    def settled() -> bool:
        cfg = mi(svc, "acm_get_config")
        return bool(cfg["live"]) and cfg["live"]["threshold"] == 3 and bool(in_sync(svc))
    try:
        wait_until(settled, "the override back after the respawn", 10)
    except AssertionError:
        c = StoreConnection(srv.url, timeout=2.0)
        print(c.call("HGETALL", "{acm.cfg}:detect"), svc.read_log()[-3000:])
        c.close()
        raise
    time.sleep(1.5)  # and it stays
    assert mi(svc, "acm_get_config")["live"]["threshold"] == 3
    for _ in range(4):
        with Client(svc.endpoint, timeout=5.0) as c:
            assert callers_to_one_b(c, 3) == ["allow", "allow", "drop"]
