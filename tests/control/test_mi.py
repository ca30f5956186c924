"""The MI endpoint driven by the `opensips` package's own client, over HTTP and datagrams."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opensips.mi import OpenSIPSMI, OpenSIPSMIException

from acm_module.control import jsonrpc, overrides
from acm_module.decide.store.cluster import StoreClient
from tests.support.mi_helpers import free_udp_port, mi_error, wait_in_sync
from tests.support.numbers import a_num, cid
from tests.support.servers import REPO, RedisServer, Service, free_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

TOKEN = "test-admin-token-0123456789abcdef"
B = "+2348039999999"


def wait_for(pred, timeout: float = 3.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_both_transports_read_and_change_the_config(mi_factory) -> None:  # type: ignore[no-untyped-def]
    with mi_factory() as (mi, _):
        http, dgram = mi.http(), mi.datagram()
        cfg = http.execute("acm_get_config")
        assert cfg["live"]["threshold"] == 5 and cfg["repository"] == "store"
        assert cfg["settings"]["mi_token"] == ""
        r = http.execute("acm_set", {"threshold": 7})
        assert r["changed"] == {"threshold": {"old": 5, "new": 7}}
        assert r["generation"] > cfg["generation"] and r["persisted"] is True
        assert dgram.execute("acm_get_config")["live"]["threshold"] == 7
        r = dgram.execute("acm_set", {"window": "2.5", "mode": "monitor"})
        assert set(r["changed"]) == {"window", "mode"}
        wait_in_sync(mi, r["generation"])
        assert "acm_set" in dgram.execute("which")


def test_errors_are_json_rpc_errors_and_keep_the_old_config(mi_factory) -> None:  # type: ignore[no-untyped-def]
    with mi_factory() as (mi, _):
        http = mi.http()
        gen = mi.generation()
        bad = [
            ("nope", {}, jsonrpc.METHOD_NOT_FOUND, "unknown method"),
            ("acm_set", {"threshold": 1}, jsonrpc.INVALID_PARAMS, "between 2 and 1000"),
            ("acm_set", {"threshold": "x"}, jsonrpc.INVALID_PARAMS, "threshold"),
            ("acm_set", {"mode": "drop-all"}, jsonrpc.INVALID_PARAMS, "block, monitor"),
            ("acm_set", {"window": 100}, jsonrpc.INVALID_PARAMS, "dedup_ttl"),
            ("acm_set", {"workers": 8}, jsonrpc.INVALID_PARAMS, "at runtime"),
            ("acm_set", {"bogus": 1}, jsonrpc.INVALID_PARAMS, "unknown setting"),
            ("acm_set", {}, jsonrpc.INVALID_PARAMS, "at least one"),
            ("acm_whitelist_add", {"number": "anonymous", "reason": "x"},
             jsonrpc.INVALID_PARAMS, "not a phone number"),
            ("acm_whitelist_add", {"number": B}, jsonrpc.INVALID_PARAMS, "reason"),
            ("acm_alert_list", {"colour": "red"}, jsonrpc.INVALID_PARAMS, "unknown parameter"),
            ("acm_unblock", {"number": B}, jsonrpc.NOT_FOUND, "not blocked"),
        ]
        for method, params, code, text in bad:
            with pytest.raises(OpenSIPSMIException) as e:
                http.execute(method, params)
            got_code, msg = mi_error(e.value)
            assert got_code == code and text in msg, (method, params, got_code, msg)
        assert mi.generation() == gen
        assert mi.live()["threshold"] == 5
        # Malformed and invalid requests, on both transports.
        assert mi.post(b"{not json")["error"]["code"] == jsonrpc.PARSE_ERROR
        assert mi.post(b'{"id": 1, "method": "which"}')["error"]["code"] == \
            jsonrpc.INVALID_REQUEST
        r = mi.send_datagram(b"{not json")
        assert r is not None and r["error"]["code"] == jsonrpc.PARSE_ERROR
        r = mi.send_datagram(b'{"jsonrpc":"2.0","id":3,"method":"nope"}')
        assert r is not None and r["error"]["code"] == jsonrpc.METHOD_NOT_FOUND and r["id"] == 3


def test_change_is_in_the_audit_trail(mi_factory) -> None:  # type: ignore[no-untyped-def]
    with mi_factory() as (mi, _):
        http = mi.http()
        http.execute("acm_set", {"threshold": 8, "actor": "alice"})
        recs = http.execute("acm_audit_list", {"action": "acm_set"})["records"]
        assert len(recs) == 1
        rec = recs[0]
        assert rec["actor"] == "alice" and rec["via"].startswith("http:127.0.0.1:")
        assert rec["target"] == "config"
        assert rec["old"] == {"threshold": 5} and rec["new"] == {"threshold": 8}
        assert abs(rec["ts_ms"] / 1000 - time.time()) < 30 and rec["at"].endswith("Z")
        # A rejected change leaves no record.
        with pytest.raises(OpenSIPSMIException):
            http.execute("acm_set", {"threshold": 0})
        assert http.execute("acm_audit_list")["count"] == 1


def test_a_value_already_in_force_is_neither_pinned_nor_audited(mi_factory) -> None:  # type: ignore[no-untyped-def]
    with mi_factory() as (mi, _):
        http = mi.http()
        gen = mi.generation()
        r = http.execute("acm_set", {"threshold": 5, "mode": "block"})  # the defaults
        assert (r["changed"], r["persisted"], r["generation"]) == ({}, False, gen)
        assert http.execute("acm_get_config")["overrides"] == {}
        assert _store_get(mi.svc.store_url, overrides.OVERRIDES_KEY) is None
        assert http.execute("acm_audit_list")["count"] == 0
        # Only what changes is pinned and audited.
        r = http.execute("acm_set", {"threshold": 6, "mode": "block"})
        assert r["changed"] == {"threshold": {"old": 5, "new": 6}}
        assert http.execute("acm_get_config")["overrides"] == {"threshold": 6}
        recs = http.execute("acm_audit_list")["records"]
        assert [(x["old"], x["new"]) for x in recs] == [({"threshold": 5}, {"threshold": 6})]


def test_monitor_mode_switched_by_mi_detects_but_allows(mi_factory) -> None:  # type: ignore[no-untyped-def]
    with mi_factory() as (mi, client):
        r = mi.datagram().execute("acm_set", {"mode": "monitor"})
        wait_in_sync(mi, r["generation"])
        t0 = 1_800_000_000.0
        replies = [client.decide(cid(), a_num(i), B, ts=t0 + i * 0.3) for i in range(7)]
        assert [x["verdict"] for x in replies] == ["allow"] * 7
        assert [x["reason"] for x in replies] == ["clean"] * 4 + ["masking"] * 3
        assert replies[-1]["severity"] == "CRITICAL" and replies[-1]["alert_id"]
        alerts = mi.http().execute("acm_alert_list", {"number": B})["alerts"]
        assert [a["alert_id"] for a in alerts] == [replies[-1]["alert_id"]]
        assert alerts[0]["severity"] == "CRITICAL" and alerts[0]["a_number_count"] == 7
        # Back to block: the same pattern is dropped again.
        r = mi.http().execute("acm_set", {"mode": "block"})
        wait_in_sync(mi, r["generation"])
        replies = [client.decide(cid(), a_num(100 + i), "+2348038888888", ts=t0 + i * 0.3)
                   for i in range(5)]
        assert replies[-1]["verdict"] == "drop"


def test_whitelist_add_list_remove(mi_factory) -> None:  # type: ignore[no-untyped-def]
    with mi_factory() as (mi, client):
        http = mi.http()
        e = http.execute("acm_whitelist_add", {"number": "0803 999 9999", "reason": "bank IVR",
                                               "created_by": "noc", "ttl": 600})
        assert e["b_number"] == B and e["created_by"] == "noc" and e["expires_at"]
        listed = http.execute("acm_whitelist_list")["entries"]
        assert [x["b_number"] for x in listed] == [B]
        t0 = 1_800_000_000.0
        replies = [client.decide(cid(), a_num(i), B, ts=t0 + i * 0.1) for i in range(6)]
        assert {x["reason"] for x in replies} == {"whitelisted"}
        assert http.execute("acm_whitelist_remove", {"number": B}) == {"removed": B}
        assert http.execute("acm_whitelist_list")["count"] == 0
        assert client.decide(cid(), a_num(50), B, ts=t0 + 1)["reason"] == "clean"
        actions = [r["action"] for r in http.execute("acm_audit_list", {"target": B})["records"]]
        assert actions == ["acm_whitelist_remove", "acm_whitelist_add"]
        with pytest.raises(OpenSIPSMIException) as ex:
            http.execute("acm_whitelist_remove", {"number": B})
        assert mi_error(ex.value)[0] == jsonrpc.NOT_FOUND
        with pytest.raises(OpenSIPSMIException) as ex:
            http.execute("acm_whitelist_add", {"number": B, "reason": "x",
                                               "expires_at": "2020-01-01T00:00:00Z"})
        assert "in the past" in mi_error(ex.value)[1]


def test_a_whitelist_expiry_past_year_9999_is_refused_and_nothing_kept(mi_factory) -> None:  # type: ignore[no-untyped-def]
    # Found by the MI fuzz: a ttl of a phone number's size (seconds) was stored, then every
    # whitelist list, add and remove answered -32603 because the expiry had no date.
    with mi_factory() as (mi, _):
        http = mi.http()
        for params in ({"ttl": 2348031234567}, {"expires_at": 253_402_300_800}):
            with pytest.raises(OpenSIPSMIException) as ex:
                http.execute("acm_whitelist_add", {"number": B, "reason": "x", **params})
            assert mi_error(ex.value)[0] == jsonrpc.INVALID_PARAMS, params
        assert http.execute("acm_whitelist_list")["count"] == 0
        e = http.execute("acm_whitelist_add", {"number": B, "reason": "x",
                                               "expires_at": "9999-12-31T00:00:00Z"})
        assert e["expires_at"].startswith("9999-12-31")
        assert http.execute("acm_whitelist_list")["count"] == 1


def test_block_list_and_unblock(mi_factory) -> None:  # type: ignore[no-untyped-def]
    with mi_factory() as (mi, client):
        http = mi.http()
        r = http.execute("acm_set", {"block_ttl": 600})
        wait_in_sync(mi, r["generation"])
        now = time.time()
        for i in range(5):
            client.decide(cid(), a_num(i), B, ts=now + i * 0.01)
        blocks = http.execute("acm_block_list")["blocks"]
        assert {b["a_number"] for b in blocks} == {a_num(i) for i in range(5)}
        assert all(not b["expired"] for b in blocks)
        assert client.decide(cid(), a_num(0), "+2348037777777", ts=now + 1)["reason"] == "blocked"
        assert http.execute("acm_unblock", {"number": a_num(0)}) == {"unblocked": a_num(0)}
        assert http.execute("acm_block_list", {"number": a_num(0)})["count"] == 0
        assert client.decide(cid(), a_num(0), "+2348037777777", ts=now + 2)["reason"] == "clean"


def test_opensips_event_reload_over_datagram(mi_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "acm.toml"
    cfg.write_text("[detection]\nthreshold = 6\n")
    with mi_factory(env={"ACM_CONFIG": str(cfg)}) as (mi, _):
        assert mi.live()["threshold"] == 6
        # Exactly what event_datagram sends for
        #   opensips-cli -x mi raise_event E_ACM_RELOAD '{"threshold": 7, "window": "2.5"}'
        # (a JSON-RPC notification: no id, so no reply).
        ev = {"jsonrpc": "2.0", "method": "E_ACM_RELOAD",
              "params": {"threshold": 7, "window": "2.5"}}
        assert mi.send_datagram(json.dumps(ev).encode(), wait=0.3) is None
        wait_for(lambda: mi.live()["threshold"] == 7, what="event applied")
        assert mi.live()["window"] == 2.5
        rec = mi.http().execute("acm_audit_list", {"action": "E_ACM_RELOAD"})["records"][0]
        assert rec["via"].startswith("datagram:127.0.0.1:")
        # What plain `opensips-cli -x mi raise_event E_ACM_RELOAD '{"threshold": 8}'` delivers:
        # the JSON object as one unnamed string parameter (seen from OpenSIPS 3.6).
        cli_form = {"jsonrpc": "2.0", "method": "E_ACM_RELOAD",
                    "params": {"": json.dumps({"threshold": 8})}}
        mi.send_datagram(json.dumps(cli_form).encode(), wait=0.3)
        wait_for(lambda: mi.live()["threshold"] == 8, what="opensips-cli form applied")
        mi.http().execute("acm_set", {"threshold": 7})
        # An invalid event changes nothing.
        bad = {"jsonrpc": "2.0", "method": "E_ACM_RELOAD", "params": {"threshold": 0}}
        assert mi.send_datagram(json.dumps(bad).encode(), wait=0.3) is None
        # Without params it is a reload: the file is re-read, the MI overrides stay on top.
        cfg.write_text("[detection]\nthreshold = 9\nblock_ttl = 30\n")
        gen = mi.generation()
        mi.send_datagram(b'{"jsonrpc":"2.0","method":"E_ACM_RELOAD"}', wait=0.3)
        wait_for(lambda: mi.generation() > gen, what="reload")
        live = mi.live()
        assert (live["threshold"], live["window"], live["block_ttl"]) == (7, 2.5, 30.0)
        # reset=true drops the overrides: the file rules again.
        r = mi.http().execute("acm_reload", {"reset": True})
        assert r["overrides"] == {} and r["reset"] is True
        assert mi.live()["threshold"] == 9 and mi.live()["window"] == 5.0
        # A broken file keeps the old config.
        cfg.write_text("threshold = [")
        with pytest.raises(OpenSIPSMIException) as e:
            mi.http().execute("acm_reload")
        assert mi_error(e.value)[0] == jsonrpc.CONFIG_INVALID
        assert mi.live()["threshold"] == 9


def test_the_mi_starts_before_the_store_and_answers_store_unavailable(tmp_path: Path) -> None:
    """The store is down when acm serve starts: the MI answers store_unavailable (-32000) at
    once, and the same control plane changes the live config once the store is up."""
    store = RedisServer()  # not started yet
    svc = Service(store.url, workers=1, extra_env={"ACM_STATE_DIR": str(tmp_path / "state")})
    try:
        svc.start(wait=False)
        http = OpenSIPSMI(conn="http", url=f"http://{svc.mi_http}/mi")
        deadline = time.monotonic() + 15
        while True:  # until the MI answers (with a JSON-RPC error)
            t0 = time.monotonic()
            with pytest.raises(OpenSIPSMIException) as e:
                http.execute("acm_set", {"threshold": 7})
            if hasattr(e.value.__cause__, "code"):
                break
            assert time.monotonic() < deadline, f"the MI did not start: {e.value}"
            time.sleep(0.1)
        code, msg = mi_error(e.value)
        assert code == jsonrpc.STORE_UNAVAILABLE and "detection store unavailable" in msg
        assert time.monotonic() - t0 < 3.0  # refused at once; the store timeout is 1 s
        store.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                assert http.execute("acm_set", {"threshold": 7})["persisted"]
                break
            except OpenSIPSMIException:
                assert time.monotonic() < deadline, "the MI did not reach the store"
                time.sleep(0.2)
        # The supervisor publishes its boot config once it reaches the store too; the saved
        # change is then published again (reconcile_overrides): live within seconds.
        while http.execute("acm_get_config")["live"]["threshold"] != 7:
            assert time.monotonic() < deadline, "the MI change did not become live"
            time.sleep(0.2)
    finally:
        svc.cleanup()
        store.cleanup()


def test_non_loopback_bind_requires_a_token(store_url: str, tmp_path: Path) -> None:
    http_port, dgram_port = free_port(), free_udp_port()
    env = {"ACM_MI_HTTP": f"0.0.0.0:{http_port}", "ACM_MI_DATAGRAM": f"127.0.0.1:{dgram_port}",
           "ACM_STATE_DIR": str(tmp_path / "state"), "ACM_MI_TOKEN": ""}
    svc = Service(store_url, workers=1, extra_env=env)
    try:
        svc.start(wait=False)
        assert svc.proc is not None
        # The supervisor stops (boot-failure exit code) instead of serving without MI auth.
        assert svc.proc.wait(20) == 3
        assert "requires mi_token" in svc.read_log()
    finally:
        svc.cleanup()


def test_token_enforced_on_exposed_binds(mi_factory) -> None:  # type: ignore[no-untyped-def]
    env = {"ACM_MI_TOKEN": TOKEN}
    with mi_factory(env=env, http_host="0.0.0.0", dgram_host="0.0.0.0") as (mi, _):
        http, dgram = mi.http(), mi.datagram()
        # Read-only commands need no admin rights over HTTP; over exposed datagrams every
        # command needs the token (forged sources, issue 12 item 3).
        assert http.execute("acm_get_config")["settings"]["mi_token"] == "***"
        assert dgram.execute("acm_stats", {"token": TOKEN})["total"]["workers"] >= 0
        for params in ({"threshold": 7}, {"threshold": 7, "token": "wrong-token"}):
            with pytest.raises(OpenSIPSMIException) as e:
                http.execute("acm_set", params)
            assert mi_error(e.value)[0] == jsonrpc.UNAUTHORIZED
            # over a datagram: "unauthorized", or no reply when the request is shorter
            body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "acm_set",
                               "params": params}).encode()
            r = mi.send_datagram(body, wait=0.5)
            assert r is None or r["error"]["code"] == jsonrpc.UNAUTHORIZED
        assert mi.live()["threshold"] == 5
        assert http.execute("acm_set", {"threshold": 7, "token": TOKEN})["generation"]
        assert dgram.execute("acm_set", {"threshold": 6, "token": TOKEN})["generation"]
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "acm_set",
                           "params": {"threshold": 8}}).encode()
        r = mi.post(body, {"Authorization": f"Bearer {TOKEN}"})
        assert r["result"]["changed"] == {"threshold": {"old": 6, "new": 8}}
        r = mi.post(body, {"Authorization": "Bearer nope"})
        assert r["error"]["code"] == jsonrpc.UNAUTHORIZED
        # An event without the token is refused on an exposed datagram bind.
        mi.send_datagram(b'{"jsonrpc":"2.0","method":"E_ACM_RELOAD","params":{"threshold":3}}',
                         wait=0.3)
        time.sleep(0.2)
        assert mi.live()["threshold"] == 8
        log = mi.svc.read_log()
        assert TOKEN not in log and "wrong-token" not in log


def test_changes_survive_a_restart(mi_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "keep"
    with mi_factory(state_dir=state) as (mi, _):
        mi.http().execute("acm_set", {"threshold": 3, "mode": "monitor"})
    saved = json.loads(_store_get(mi.svc.store_url, overrides.OVERRIDES_KEY))
    assert saved["values"] == {"threshold": 3, "mode": "monitor"}
    with mi_factory(state_dir=state) as (mi, client):
        wait_for(lambda: (mi.live()["threshold"], mi.live()["mode"]) == (3, "monitor"),
                 timeout=10, what="overrides live after restart")
        wait_in_sync(mi)
        t0 = 1_800_000_000.0
        replies = [client.decide(cid(), a_num(i), B, ts=t0 + i * 0.1) for i in range(3)]
        assert [x["reason"] for x in replies] == ["clean", "clean", "masking"]
        assert replies[-1]["verdict"] == "allow"  # monitor
        assert mi.http().execute("acm_get_config")["overrides"] == {"threshold": 3,
                                                                     "mode": "monitor"}


def test_acm_mi_command_line(mi_factory) -> None:  # type: ignore[no-untyped-def]
    with mi_factory() as (mi, _):
        env = {**os.environ, "ACM_MI_HTTP": f"127.0.0.1:{mi.http_port}",
               "ACM_MI_DATAGRAM": f"127.0.0.1:{mi.dgram_port}"}

        def acm_mi(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "acm_module.cli", "mi", *args],
                                  env=env, cwd=REPO, capture_output=True, text=True, timeout=30)

        r = acm_mi("acm_set", "threshold=7")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["changed"]["threshold"]["new"] == 7
        r = acm_mi("acm_set", "threshold=0")
        assert r.returncode == 1 and "-32602" in r.stderr
        r = acm_mi("--datagram", f"127.0.0.1:{mi.dgram_port}", "acm_get_config")
        assert r.returncode == 0 and json.loads(r.stdout)["live"]["threshold"] == 7
        rec = mi.http().execute("acm_audit_list")["records"][0]
        assert rec["actor"] != "anonymous"  # acm mi sends the login name


def _store_get(url: str, key: str) -> bytes | None:
    c = StoreClient(url, timeout=2.0)
    try:
        return c.call("GET", key)  # type: ignore[return-value]
    finally:
        c.close()


def test_acm_mi_carries_the_token_over_both_transports(mi_factory) -> None:  # type: ignore[no-untyped-def]
    # Exposed binds: an admin command needs the token, so only a token that arrives works.
    with mi_factory(env={"ACM_MI_TOKEN": TOKEN}, http_host="0.0.0.0",
                    dgram_host="0.0.0.0") as (mi, _):
        env = {**os.environ, "ACM_MI_HTTP": f"0.0.0.0:{mi.http_port}",
               "ACM_MI_DATAGRAM": f"0.0.0.0:{mi.dgram_port}", "ACM_MI_TOKEN": TOKEN}
        dgram = ("--datagram", f"127.0.0.1:{mi.dgram_port}")

        def acm_mi(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
            e = {k: v for k, v in env.items() if k != "ACM_MI_TOKEN" or token == TOKEN}
            extra = ("--token", token) if token not in (None, TOKEN) else ()
            return subprocess.run([sys.executable, "-m", "acm_module.cli", "mi", *extra, *args],
                                  env=e, cwd=REPO, capture_output=True, text=True, timeout=30)

        for via in ((), dgram):
            for token in (None, "wrong-token-0123456789"):
                r = acm_mi(*via, "acm_set", "threshold=9", token=token)
                assert r.returncode == 1, (via, token, r.stdout, r.stderr)
                assert f"error {jsonrpc.UNAUTHORIZED}" in r.stderr, (via, token, r.stderr)
        assert mi.live()["threshold"] == 5
        r = acm_mi("acm_set", "threshold=7")  # the token of the settings, as a bearer header
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["changed"]["threshold"] == {"old": 5, "new": 7}
        r = acm_mi(*dgram, "--json", "acm_set", "threshold=6")  # as the token parameter
        assert r.returncode == 0, r.stderr
        whole = json.loads(r.stdout)
        assert whole["jsonrpc"] == "2.0" and "id" in whole
        assert whole["result"]["changed"]["threshold"] == {"old": 7, "new": 6}
        r = acm_mi("--json", "acm_set", "threshold=0")
        assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == jsonrpc.INVALID_PARAMS
        recs = mi.http().execute("acm_audit_list", {"token": TOKEN})["records"]
        assert [rec["via"].split(":")[0] for rec in recs[:2]] == ["datagram", "http"]
        assert TOKEN not in mi.svc.read_log()


def test_acm_mi_says_when_the_endpoint_does_not_answer() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never answers
        port = silent.getsockname()[1]
        closed = free_port()
        for args, why in ((("--datagram", f"127.0.0.1:{port}", "--timeout", "0.3"),
                           "no reply in 0.3s"),
                          (("--url", f"http://127.0.0.1:{closed}/mi"), "refused"),
                          (("--datagram", "nowhere"), "expected host:port")):
            r = subprocess.run([sys.executable, "-m", "acm_module.cli", "mi", *args,
                                "acm_stats"], cwd=REPO, capture_output=True, text=True,
                               timeout=30)
            assert r.returncode == 2, (args, r.stderr)
            assert "acm mi: cannot reach the MI endpoint" in r.stderr and why in r.stderr, (
                args, r.stderr)
