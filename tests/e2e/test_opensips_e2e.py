"""The decision path end to end through the exact code OpenSIPS runs.

opensips_scripts/acm_opensips.py is loaded the way OpenSIPS's python module loads it: the file is
imported and `mod_init()` runs in the parent *before* fork(); each forked OpenSIPS process calls
`child_init(rank)` and then `acm_check(msg)` per INVITE, with a message object offering the same
methods as the C one (tests/support/fake_msg.py). The service on the other side is a real
`acm serve` pool on a real Redis-protocol store.
"""

from __future__ import annotations

import json
import os
from types import ModuleType

import pytest

from tests.support.fake_msg import FakeMsg
from tests.support.opensips_script import load_acm_opensips

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

B = "08039999999"


def load_script(monkeypatch: pytest.MonkeyPatch, endpoint: str, **env: str) -> ModuleType:
    monkeypatch.setenv("ACM_ENDPOINT", endpoint)
    monkeypatch.setenv("ACM_TIMEOUT_MS", env.pop("timeout_ms", "1000"))
    monkeypatch.setenv("ACM_OPENSIPS_CONFIG", "/nonexistent/acm_opensips.conf")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return load_acm_opensips("acm_opensips_e2e", monkeypatch)


def invite(call_id: str, a: str, b: str = B, si: str = "192.0.2.10") -> FakeMsg:
    return FakeMsg({"$ci": call_id, "$fU": a, "$fu": f"sip:{a}@{si}", "$rU": b,
                    "$ru": f"sip:{b}@10.0.0.2", "$si": si})


def test_seed_scenario_through_acm_opensips(service, monkeypatch) -> None:
    from tests.support.servers import flush

    flush(service.store_url)
    mod = load_script(monkeypatch, service.endpoint)
    handler = mod.mod_init()  # before fork, as OpenSIPS does: no socket may exist yet
    assert handler.child_init(1) == 0
    codes, msgs = [], []
    for i in range(7):
        m = invite(f"seed-{i}@carrier", f"+23480310{i:05d}")
        codes.append(handler.acm_check(m, "IGW-1"))
        msgs.append(m)
    assert codes == [1, 1, 1, 1, -1, -1, -1]
    assert [m.vars["acm_verdict"] for m in msgs] == ["allow"] * 4 + ["drop"] * 3
    assert [m.vars["acm_reason"] for m in msgs] == ["clean"] * 4 + ["masking"] * 3
    assert [m.vars["acm_distinct"] for m in msgs] == ["1", "2", "3", "4", "5", "6", "7"]
    assert len({m.vars["acm_alert_id"] for m in msgs[4:]}) == 1
    assert msgs[-1].vars["acm_severity"] == "CRITICAL"
    # An INVITE retransmission gets the same verdict without counting again.
    again = invite("seed-6@carrier", "+2348031000006")
    assert handler.acm_check(again, "IGW-1") == -1
    assert again.vars["acm_distinct"] == "7"


def test_seed_scenario_through_the_packed_call_of_opensips_cfg(service, monkeypatch) -> None:
    """What opensips.cfg calls: python_exec("acm_check_fields", FIELDS) and $var(acm)."""
    from tests.support.servers import flush

    flush(service.store_url)
    mod = load_script(monkeypatch, service.endpoint)
    handler = mod.mod_init()
    assert handler.child_init(1) == 0
    out = []
    for i in range(7):
        m = invite(f"packed-{i}@carrier", f"+23480310{i:05d}")
        rc = handler.acm_check_fields(m, m.fields("IGW-1"))
        out.append((rc, *m.vars["acm"].split("|")))
    assert [x[:3] for x in out] == [(1, "allow", "clean")] * 4 + [(-1, "drop", "masking")] * 3
    assert [x[5] for x in out] == ["1", "2", "3", "4", "5", "6", "7"]
    assert len({x[3] for x in out[4:]}) == 1 and out[4][3]
    assert out[-1][4] == "CRITICAL"
    assert [x[6:] for x in out] == [("", "")] * 7  # no fail-policy call


def test_forked_opensips_processes_each_get_their_own_socket(service, monkeypatch) -> None:
    from tests.support.servers import flush

    flush(service.store_url)
    mod = load_script(monkeypatch, service.endpoint)
    handler = mod.mod_init()
    children = []
    for rank in (1, 2, 3):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # an OpenSIPS worker process
            os.close(r)
            out = []
            try:
                handler.child_init(rank)
                for i in range(3):
                    m = invite(f"fork-{rank}-{i}", f"+2348032{rank}{i:05d}")
                    out.append((handler.acm_check(m), m.vars.get("acm_reason")))
            finally:
                os.write(w, json.dumps(out).encode())
                os._exit(0)
        os.close(w)
        children.append((pid, r))
    results = []
    for pid, r in children:
        with os.fdopen(r) as f:
            results += json.loads(f.read())
        os.waitpid(pid, 0)
    # 9 distinct callers to one B from 3 processes: the 5th to 9th in store order are drops.
    assert len(results) == 9
    assert sorted(code for code, _ in results) == [-1] * 5 + [1] * 4
    assert {reason for _, reason in results} == {"clean", "masking"}


def test_service_down_gives_the_policy_verdict_and_opens_the_breaker(monkeypatch, tmp_path
                                                                      ) -> None:
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    mod = load_script(monkeypatch, endpoint, timeout_ms="30", ACM_FAIL_POLICY="open")
    handler = mod.mod_init()
    handler.child_init(1)
    codes = []
    for i in range(6):
        m = invite(f"down-{i}", "+2348031000001")
        codes.append(handler.acm_check(m))
        assert m.vars["acm_verdict"] == "allow"
    assert codes == [2] * 6  # allowed by policy, never dropped, never 0
    stats = handler.client.stats
    assert stats.breaker_opened >= 1
    assert stats.short_circuits >= 2  # after 3 failures no socket I/O is attempted


def test_fail_closed_drops_when_the_service_is_down(monkeypatch, tmp_path) -> None:
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    mod = load_script(monkeypatch, endpoint, timeout_ms="20", ACM_FAIL_POLICY="closed")
    handler = mod.mod_init()
    handler.child_init(1)
    m = invite("closed-1", "+2348031000001")
    assert handler.acm_check(m) == -2
    assert (m.vars["acm_verdict"], m.vars["acm_reason"]) == ("drop", "service_unavailable")
