"""opensips_scripts/opensips.cfg: what can be checked without running OpenSIPS, and the
config check of a real OpenSIPS when one is installed (/opt/opensips or on PATH)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.opensips_script import load_acm_opensips

CFG = Path(__file__).resolve().parents[2] / "opensips_scripts" / "opensips.cfg"
SCRIPT = CFG.with_name("acm_opensips.py")

pytestmark = pytest.mark.timeout(60)


def test_fail_policy_lines_are_logged_only_when_the_client_says_so() -> None:
    """Each xlog of a fail-policy call sits under `if (... $var(acm_log) == "1")`: at most
    one line per interval in an outage (acm_opensips.py decides, see $var(acm_log))."""
    lines = CFG.read_text().splitlines()
    found = 0
    for i, line in enumerate(lines):
        if "xlog(" in line and "fail policy" in line:
            found += 1
            guard = lines[i - 1]
            assert re.search(r'\bif\b.*\$var\(acm_log\) == "1"', guard), (i + 1, guard)
    assert found == 2  # allowed by fail policy, dropped by fail policy


def _opensips() -> str | None:
    for p in ("/opt/opensips/sbin/opensips", shutil.which("opensips")):
        if p and Path(p).exists():
            return p
    return None


def _real_cfg(tmp_path: Path, binary: str) -> tuple[Path, int]:
    """Copy the cfg for a test run: modules of that install, this checkout's script, free
    loopback ports, logs on stderr. Return (cfg path, SIP UDP port)."""
    from tests.support.servers import free_port

    root = Path(binary).resolve().parents[1]
    modules = next((p for p in (root / "lib64/opensips/modules", root / "lib/opensips/modules")
                    if p.is_dir()), root / "lib64/opensips/modules")
    sip = free_port()
    text = CFG.read_text().replace("/etc/opensips/acm_opensips.py", str(SCRIPT))
    text = re.sub(r'^mpath=.*$', "", text, flags=re.M)
    text = text.replace("####### Modules Section ########",
                        f'####### Modules Section ########\nmpath="{modules}/"', 1)
    text = (text.replace("udp:127.0.0.1:5060", f"udp:127.0.0.1:{sip}")
            .replace("tcp:127.0.0.1:5060", f"tcp:127.0.0.1:{free_port()}")
            .replace('"port", 8888', f'"port", {free_port()}')
            .replace("udp:127.0.0.1:8080", f"udp:127.0.0.1:{free_port()}")
            .replace("stderror_enabled=no", "stderror_enabled=yes")
            .replace("syslog_enabled=yes", "syslog_enabled=no")
            .replace("udp_workers=4", "udp_workers=2"))
    cfg = tmp_path / "opensips.cfg"
    cfg.write_text(text)
    return cfg, sip


def test_a_real_opensips_accepts_the_config(tmp_path: Path) -> None:
    binary = _opensips()
    if binary is None:
        pytest.skip("no OpenSIPS installed (optional: the cfg's syntax check)")
    cfg, _ = _real_cfg(tmp_path, binary)
    r = subprocess.run([binary, "-C", "-f", str(cfg), "-m", "128", "-M", "16"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "config file ok" in r.stderr, r.stderr[-3000:]


def _stop(proc: subprocess.Popen) -> None:
    """Stop an OpenSIPS started in its own session, with all its processes."""
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _invite(i: int, port: int, sink: int) -> bytes:
    return (f"INVITE sip:+23480399{i:05d}@127.0.0.1:{sink} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-acm-{i}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:+23480310{i:05d}@127.0.0.1>;tag=t{i}\r\n"
            f"To: <sip:+23480399{i:05d}@127.0.0.1>\r\n"
            f"Call-ID: outage-{i}@test\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:a@127.0.0.1:{port}>\r\nContent-Length: 0\r\n\r\n").encode()


def test_a_real_opensips_logs_an_outage_once_per_interval_not_per_call(tmp_path: Path) -> None:
    import os
    import socket
    import time

    binary = _opensips()
    if binary is None:
        pytest.skip("no OpenSIPS installed")
    cfg, sip = _real_cfg(tmp_path, binary)
    env = {**os.environ, "ACM_ENDPOINT": f"ipc://{tmp_path}/nobody.sock", "ACM_TIMEOUT_MS": "5",
           "ACM_OPENSIPS_CONFIG": str(tmp_path / "none.conf"), "ACM_FAIL_POLICY": "open"}
    log = open(tmp_path / "opensips.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, "-F", "-f", str(cfg), "-m", "128", "-M", "16"],
                            stdout=log, stderr=log, env=env, cwd=tmp_path,
                            start_new_session=True)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the next hop: never answers
    sink.bind(("127.0.0.1", 0))
    ua = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ua.bind(("127.0.0.1", 0))
    ua.settimeout(0.2)
    try:
        port = ua.getsockname()[1]
        deadline = time.monotonic() + 20
        answered = False
        while not answered and time.monotonic() < deadline and proc.poll() is None:
            ua.sendto(_invite(99_999, port, sink.getsockname()[1]), ("127.0.0.1", sip))
            try:
                answered = ua.recv(4096).startswith(b"SIP/2.0")
            except TimeoutError:
                pass
        assert answered, (tmp_path / "opensips.log").read_text(errors="replace")[-3000:]
        for i in range(300):  # a second of calls at 300 CPS, every one by the fail policy
            ua.sendto(_invite(i, port, sink.getsockname()[1]), ("127.0.0.1", sip))
            time.sleep(1 / 300)
        time.sleep(1.0)
    finally:
        _stop(proc)
        log.close()
        ua.close()
        sink.close()
    text = (tmp_path / "opensips.log").read_text(errors="replace")
    policy = [x for x in text.splitlines() if "allowed by fail policy" in x]
    # One line per UDP worker and interval (2 workers here), not one per call.
    assert 1 <= len(policy) <= 2, "\n".join(policy[:10])


def test_the_cfg_passes_the_scripts_field_format_verbatim(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """route[acm_check] and acm_opensips.FIELDS_FORMAT must stay in step."""
    mod = load_acm_opensips("acm_opensips_fmt", monkeypatch)
    assert f'python_exec("acm_check_fields", "{mod.FIELDS_FORMAT}");' in CFG.read_text()


def _request(body: str, port: int, sink: int, *, call_id: bytes, from_user: bytes,
             to_user: str, branch: str) -> bytes:
    head = (f"INVITE sip:{to_user}@127.0.0.1:{sink} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{branch}\r\n"
            "Max-Forwards: 70\r\n").encode()
    return (head + b"From: <sip:" + from_user + (b"@" if from_user else b"")
            + b"127.0.0.1>;tag=" + branch.encode() + b"\r\n"
            + f"To: <sip:{to_user}@127.0.0.1>\r\n".encode()
            + b"Call-ID: " + call_id + b"\r\n"
            + f"CSeq: 1 INVITE\r\nContact: <sip:a@127.0.0.1:{port}>\r\n"
              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())


def test_a_real_opensips_sends_every_field_and_acts_on_the_packed_verdict(
        tmp_path: Path) -> None:
    """The cfg's packed argument rendered by OpenSIPS itself, and $var(acm) split by it:
    the service sees each field (octets that are not UTF-8 and a '|' included, an empty From
    user replaced by the From URI, a long Call-ID cut to 256 bytes); an allowed call is
    relayed, a dropped one answered 603 with X-ACM-Reason, a rate-limited one 503."""
    import os
    import socket
    import threading
    import time

    import msgpack
    import zmq

    binary = _opensips()
    if binary is None:
        pytest.skip("no OpenSIPS installed")
    cfg, sip = _real_cfg(tmp_path, binary)
    endpoint = f"ipc://{tmp_path}/acm.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    received: list[dict] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not router.poll(20):
                continue
            ident, _, body = router.recv_multipart()
            req = msgpack.unpackb(body, raw=False)
            received.append(req)
            if "666" in req["b"]:
                rep = {"verdict": "drop", "reason": "masking", "distinct": 7,
                       "alert_id": "al-42", "severity": "CRITICAL"}
            elif "503" in req["b"]:
                rep = {"verdict": "drop", "reason": "rate_limited", "distinct": 0}
            else:
                rep = {"verdict": "allow", "reason": "clean", "distinct": 1}
            router.send_multipart([ident, b"", msgpack.packb(rep)])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    env = {**os.environ, "ACM_ENDPOINT": endpoint, "ACM_TIMEOUT_MS": "3000",
           "ACM_OPENSIPS_CONFIG": str(tmp_path / "none.conf")}
    log = open(tmp_path / "opensips.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, "-F", "-f", str(cfg), "-m", "128", "-M", "16"],
                            stdout=log, stderr=log, env=env, cwd=tmp_path,
                            start_new_session=True)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the next hop
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(0.2)
    ua = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ua.bind(("127.0.0.1", 0))
    ua.settimeout(0.2)
    port, sink_port = ua.getsockname()[1], sink.getsockname()[1]

    def call(n: int, *, call_id: bytes, from_user: bytes, to_user: str) -> tuple[bytes, bytes]:
        """Send one INVITE until OpenSIPS answers or relays it: (final reply, relayed)."""
        data = _request("", port, sink_port, call_id=call_id, from_user=from_user,
                        to_user=to_user, branch=f"b{n}")
        reply = relayed = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            ua.sendto(data, ("127.0.0.1", sip))
            end = time.monotonic() + 0.5
            mine = b"\r\nCall-ID: " + call_id[:200]  # tm retransmits earlier calls' INVITEs
            while time.monotonic() < end and not (relayed or reply[8:9] in (b"5", b"6")):
                try:
                    got = ua.recv(65535)
                    if mine in got and not got.startswith(b"SIP/2.0 100"):
                        reply = got
                except TimeoutError:
                    pass
                try:
                    got = sink.recv(65535)
                    if mine in got:
                        relayed = got
                except TimeoutError:
                    pass
            if relayed or reply:
                return reply, relayed
        raise AssertionError((tmp_path / "opensips.log").read_text(errors="replace")[-3000:])

    try:
        _, relayed = call(1, call_id=b"ok-1@t", from_user=b"2348031000001",
                          to_user="2348099000001")
        assert relayed.startswith(b"INVITE ")
        reply, relayed = call(2, call_id=b"drop-1@t", from_user=b"2348031000002",
                              to_user="2348099666002")
        assert reply.startswith(b"SIP/2.0 603 Decline") and not relayed
        assert b"X-ACM-Reason: masking; alert=al-42\r\n" in reply
        reply, _ = call(3, call_id=b"rl-1@t", from_user=b"2348031000003",
                        to_user="2348099503003")
        assert reply.startswith(b"SIP/2.0 503 Rate Limited") and b"Retry-After: 1" in reply
        _, relayed = call(4, call_id=b"odd|1@t", from_user=b"23480\xff\xfe31",
                          to_user="2348099000004")
        assert relayed.startswith(b"INVITE ")
        _, relayed = call(5, call_id=b"x" * 1000, from_user=b"", to_user="2348099000005")
        assert relayed.startswith(b"INVITE ")
    finally:
        _stop(proc)
        log.close()
        stop.set()
        server.join(2)
        router.close(linger=0)
        ctx.term()
        ua.close()
        sink.close()
    by_call = {r["call_id"]: r for r in received}
    assert by_call["ok-1@t"] == {"call_id": "ok-1@t", "a": "2348031000001",
                                 "b": "2348099000001", "src_ip": "127.0.0.1",
                                 "trunk": "lo_trunk"}
    assert by_call["odd|1@t"]["a"] == "23480\ufffd\ufffd31"
    assert by_call["x" * 256]["a"] == "sip:127.0.0.1"
    text = (tmp_path / "opensips.log").read_text(errors="replace")
    assert "ACM: drop drop-1@t" in text and "alert=al-42 severity=CRITICAL distinct=7" in text
    assert "python_exec failed" not in text and "Traceback" not in text
