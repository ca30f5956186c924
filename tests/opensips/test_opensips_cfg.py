"""opensips_scripts/opensips.cfg: what can be checked without running OpenSIPS, and the
config check of a real OpenSIPS when one is installed (/opt/opensips or on PATH)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

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
    from servers import free_port

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
    import signal
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
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()
        ua.close()
        sink.close()
    text = (tmp_path / "opensips.log").read_text(errors="replace")
    policy = [x for x in text.splitlines() if "allowed by fail policy" in x]
    # One line per UDP worker and interval (2 workers here), not one per call.
    assert 1 <= len(policy) <= 2, "\n".join(policy[:10])
