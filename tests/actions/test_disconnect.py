"""A real attack through a real `acm serve` and store; `acm actions` ends the attack's calls that
are up through an MI endpoint that speaks OpenSIPS 3.6's JSON-RPC, notifies, records, and does
nothing twice after a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from acm_module.actions.disconnect import Disconnector, opensips_mi, reason_header
from acm_module.actions.notify import verify
from acm_module.control.audit import AuditRecord
from acm_module.control.repository import StoreRepository
from acm_module.core.errors import MIReplyError, MIUnavailable
from acm_module.decide.store.conn import StoreConnection
from tests.support.fakes import FakeOpenSIPS, WebhookReceiver
from tests.support.numbers import a_num
from tests.support.servers import REPO

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

SECRET = "s3cret-for-the-webhook-tests"
B = "+2348039900001"
B_OTHER = "+2348039900002"


class ActionsProcess:
    """`acm actions` as an operator runs it."""

    def __init__(self, store_url: str, env: dict[str, str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="acm-actions-")
        self.log = Path(self.dir) / "actions.log"
        self.cmd = [sys.executable, "-m", "acm_module.cli", "actions", "--store", store_url]
        self.env = {**os.environ, "ACM_ACTIONS_CONSUMER": "test-runner", **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ActionsProcess:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=f, stderr=f, cwd=REPO)
        return self

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def read_log(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def actions(store_url: str) -> Iterator[Callable[[dict[str, str]], ActionsProcess]]:
    started: list[ActionsProcess] = []

    def start(env: dict[str, str]) -> ActionsProcess:
        p = ActionsProcess(store_url, env).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def audit(store_url: str, action: str | None = None) -> list[AuditRecord]:
    c = StoreConnection(store_url, timeout=2.0)
    try:
        return StoreRepository(c, 16).audit_list(limit=1000, action=action)
    finally:
        c.close()


def wait_for(cond: Callable[[], Any], timeout: float, what: str,
             proc: ActionsProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"acm actions exited:\n{proc.read_log()[-3000:]}")
        time.sleep(0.1)
    log = proc.read_log()[-3000:] if proc is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{log}")


def attack(client: Any, fake: FakeOpenSIPS, now: float, callers: int = 7,
           dialogs: bool = True) -> tuple[str, list[str]]:
    """7 distinct callers to B within the window; a dialog for every allowed call.

    Returns (alert id, the Call-IDs allowed as clean).
    """
    allowed: list[str] = []
    alert_id = ""
    for i in range(callers):
        cid = f"atk-{i}-{now}"
        r = client.decide(cid, a_num(i), B, ts=now + i * 0.1)
        if i < 4:
            assert (r["verdict"], r["reason"]) == ("allow", "clean"), r
            allowed.append(cid)
            if dialogs:
                fake.add_dialog(cid)
        else:
            assert (r["verdict"], r["reason"]) == ("drop", "masking"), r
            alert_id = alert_id or r["alert_id"]
            assert r["alert_id"] == alert_id
    return alert_id, allowed


def test_attack_calls_are_ended_through_opensips_mi_once(
        service_factory: Any, store_url: str, opensips: FakeOpenSIPS,
        actions: Callable[[dict[str, str]], ActionsProcess]) -> None:
    hook = WebhookReceiver(fail_first=1, fail_status=503)
    try:
        with service_factory() as (_svc, client):
            now = time.time()
            # A call from an attacker a minute earlier (outside the window) and an unrelated
            # call: both up, neither may be ended.
            assert client.decide("old-0", a_num(0), B, ts=now - 60)["reason"] == "clean"
            opensips.add_dialog("old-0")
            assert client.decide("other-1", a_num(50), B_OTHER, ts=now)["reason"] == "clean"
            opensips.add_dialog("other-1")
            alert_id, allowed = attack(client, opensips, now)

            env = {"ACM_OPENSIPS_MI_URL": opensips.http_url, "ACM_WEBHOOK_URL": hook.url,
                   "ACM_WEBHOOK_SECRET": SECRET, "ACM_DISCONNECT_CAUSE": "21"}
            runner = actions(env)
            wait_for(lambda: len(audit(store_url, "action.notify")) >= 2, 30,
                     "notify of the open alert and of its escalation", runner)

            # Exactly the four allowed attack calls, each once, with the Reason header.
            hdr = reason_header(alert_id, 21)
            assert opensips.ended == [(cid, hdr) for cid in allowed]
            assert len(opensips.calls) == 4
            assert opensips.dialogs == {"old-0", "other-1"}
            assert hdr == f'Reason: Q.850;cause=21;text="acm masking alert {alert_id}"\r\n'

            (disc,) = audit(store_url, "action.disconnect")
            assert disc.target == alert_id and disc.actor == "acm-actions"
            assert disc.new["outcome"] == "ok"
            assert disc.new["ended"] == allowed and disc.new["calls"] == 4
            assert disc.new["not_found"] == [] and disc.new["failed"] == {}
            notes = sorted(audit(store_url, "action.notify"), key=lambda r: r.ts_ms)
            assert [n.new["trigger"] for n in notes] == ["open", "escalate:CRITICAL"]
            assert all(n.new["outcome"] == "ok" for n in notes)
            assert notes[0].new["attempts"] == 2  # the receiver failed the first delivery

            # The webhook: every request signed over its own timestamp; the retry carries the
            # same event id and body.
            reqs = hook.requests
            assert len(reqs) == 3
            for r in reqs:
                h = {k.lower(): v for k, v in r["headers"].items()}
                assert verify(SECRET, r["body"], h["x-acm-timestamp"], h["x-acm-signature"])
                assert not verify("wrong-secret", r["body"], h["x-acm-timestamp"],
                                  h["x-acm-signature"])
            assert reqs[0]["body"] == reqs[1]["body"]
            first = json.loads(reqs[1]["body"])
            assert first["event"] == "alert.opened"
            assert first["event_id"] == f"{alert_id}:open"
            assert first["alert"]["alert_id"] == alert_id
            assert first["alert"]["b_number"] == B
            assert first["alert"]["a_numbers"] == [a_num(i) for i in range(5)]
            esc = json.loads(reqs[2]["body"])
            assert esc["event"] == "alert.escalated"
            assert esc["alert"]["severity"] == "CRITICAL"
            assert esc["alert"]["a_numbers"] == [a_num(i) for i in range(7)]

            # Restarted, the runner re-reads what it had not acknowledged and does nothing again.
            before = (len(opensips.calls), len(hook.requests), len(audit(store_url)))
            assert runner.stop() == 0
            runner2 = actions(env)
            time.sleep(3)
            assert runner2.proc is not None and runner2.proc.poll() is None
            assert (len(opensips.calls), len(hook.requests), len(audit(store_url))) == before
            assert "opened alert=" in runner.read_log() or "alert.opened" in runner.read_log()
    finally:
        hook.close()


def test_disconnect_over_mi_datagram_reports_calls_already_gone(
        service_factory: Any, store_url: str, opensips: FakeOpenSIPS,
        actions: Callable[[dict[str, str]], ActionsProcess]) -> None:
    with service_factory() as (_svc, client):
        alert_id, allowed = attack(client, opensips, time.time(), callers=5, dialogs=False)
        for cid in allowed[:3]:
            opensips.add_dialog(cid)  # the 4th caller has hung up already
        runner = actions({"ACM_OPENSIPS_MI_URL": opensips.udp_url})
        (disc,) = wait_for(lambda: audit(store_url, "action.disconnect"), 30, "disconnect",
                           runner)
        assert disc.new["outcome"] == "ok"
        assert disc.new["ended"] == allowed[:3]
        assert disc.new["not_found"] == allowed[3:]
        assert [c for c, _ in opensips.ended] == allowed[:3]
        assert all(h == reason_header(alert_id) for _, h in opensips.ended)


def test_monitor_mode_does_not_disconnect(
        service_factory: Any, store_url: str, opensips: FakeOpenSIPS,
        actions: Callable[[dict[str, str]], ActionsProcess]) -> None:
    with service_factory(env={"ACM_MODE": "monitor"}) as (_svc, client):
        now = time.time()
        for i in range(5):
            r = client.decide(f"mon-{i}", a_num(i), B, ts=now + i * 0.1)
            assert r["verdict"] == "allow"
            opensips.add_dialog(f"mon-{i}")
        runner = actions({"ACM_OPENSIPS_MI_URL": opensips.http_url})
        (disc,) = wait_for(lambda: audit(store_url, "action.disconnect"), 30, "disconnect",
                           runner)
        assert disc.new["outcome"] == "skipped" and "monitor" in disc.new["reason"]
        assert opensips.calls == []


# -- the MI client against OpenSIPS's replies -------------------------------------------------
def test_mi_client_maps_opensips_replies(opensips: FakeOpenSIPS) -> None:
    for url in (opensips.http_url, opensips.udp_url):
        mi = opensips_mi(url, timeout=2.0)
        opensips.add_dialog("c-1")
        assert mi.execute("dlg_end_dlg", {"dialog_id": "c-1"}) == "OK"
        with pytest.raises(MIReplyError) as e:
            mi.execute("dlg_end_dlg", {"dialog_id": "c-1"})
        assert (e.value.code, e.value.message) == (404, "Requested Dialog not found")
        with pytest.raises(MIReplyError) as e:
            mi.execute("dlg_end_dlg", {"callid": "c-1"})
        assert e.value.code == -32602 and e.value.data == "Named parameters do not match"
        with pytest.raises(MIReplyError) as e:
            mi.execute("dlg_end_dlgs", {"dialog_id": "c-1"})
        assert e.value.code == -32601

    opensips.fail_with = 500
    res = Disconnector(opensips_mi(opensips.http_url)).end_calls("al-1", ["x", "y"])
    assert res.outcome == "failed" and set(res.failed) == {"x", "y"}
    assert res.failed["x"] == "500 Operation failed"


def test_unreachable_opensips_is_retried_then_failed() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))  # bound, never answers
        port = s.getsockname()[1]
        mi = opensips_mi(f"udp:127.0.0.1:{port}", timeout=0.2)
        with pytest.raises(MIUnavailable):
            mi.execute("dlg_end_dlg", {"dialog_id": "x"})
        d = Disconnector(mi, attempts=2, retry_wait_s=0.01)
        t0 = time.monotonic()
        res = d.end_calls("al-1", ["x"])
        assert res.outcome == "failed" and "no reply" in res.failed["x"]
        assert time.monotonic() - t0 >= 0.4  # two attempts of 0.2 s


def test_a_fanout_alert_is_notified_but_never_disconnects(
        service_factory: Any, store_url: str, opensips: FakeOpenSIPS,
        actions: Callable[[dict[str, str]], ActionsProcess]) -> None:
    env = {"ACM_FANOUT_THRESHOLD": "3"}
    with service_factory(env=env) as (_svc, client):
        now = time.time()
        sim = a_num(77)
        bs = [f"+23480388{i:05d}" for i in range(3)]
        for i, b in enumerate(bs):
            r = client.decide(f"fan-{i}", sim, b, ts=now + i * 0.1)
            assert (r["verdict"], r["reason"]) == ("allow", "clean")
            opensips.add_dialog(f"fan-{i}")
        runner = actions({"ACM_OPENSIPS_MI_URL": opensips.http_url})
        (disc,) = wait_for(lambda: audit(store_url, "action.disconnect"), 30, "disconnect",
                           runner)
        assert disc.new["outcome"] == "skipped" and "fanout" in disc.new["reason"]
        (note,) = wait_for(lambda: audit(store_url, "action.notify"), 30, "notify", runner)
        assert note.new["outcome"] == "ok"
        assert "MULTICALL_FANOUT" in runner.read_log()
        assert opensips.calls == []
