#!/usr/bin/env python3
"""SIPp load through a real OpenSIPS, with and without the acm check, in one command.

Starts (all on 127.0.0.1, free ports picked at run time, everything in one temp dir):
  redis-server (--save '' --appendonly no), ``acm serve`` on an ipc:// socket, a SIPp UAS
  (uas.xml), and one OpenSIPS per mode, all up for the whole run, running
  opensips_scripts/opensips.cfg with only the module path, the script path, logging to stderr
  and the listening ports changed; mode "off" additionally sets ``$var(acm_enabled) = 0`` (the
  cfg's own switch: route(acm_check) is skipped); mode "acm-libzmq" (any "acm-<transport>")
  is the check on with ACM_TRANSPORT=<transport> in OpenSIPS's environment.
Then, for every rate, REPEAT runs per mode, the modes alternating (on/off/on/off... under the
same background load of a shared machine), each driving the SIPp UAC (uac.xml) at a fixed rate
for SECONDS seconds. Per run:
  * calls, failed calls (and how many were SIPp aborting on a 180 that arrived after the 200),
    CPS achieved;
  * INVITE -> final response p50/p90/p99 from kernel timestamps of the UAC's packets on `lo`
    (WireTimer; SIPp's own -trace_rtt is kept but moves in 4 ms steps on this kind of VM);
  * per process tree (OpenSIPS, acm serve, redis, SIPp UAS): CPU (utime+stime) per call,
    wake-ups (voluntary context switches, all threads) per call, the busiest processes;
  * the load tool's own CPU (SIPp UAC + this driver) per call and its share of one core;
  * requests served by each acm worker (its stats hash in redis), and the connections moved
    between them (rebalance);
  * calls let through unchecked ("ACM: no verdict" cfg lines), errors in the OpenSIPS log.
RAMP steps every mode up through the given rates until it fails calls: the highest rate with
0 failed calls per mode and their ratio. PERF=1 adds one run per mode under `perf record -g`
and `perf stat --per-thread` on every OpenSIPS process (not counted in the figures).

Environment:
  OPENSIPS_BIN      (required) operator-provided opensips binary
  OPENSIPS_MODULES  module dir (default: <bin>/../lib64/opensips/modules or ../lib/...)
  RATES             call rates of the main runs, space separated (default "300")
  SECONDS           seconds of load per main run (default 20)
  REPEAT            main runs per rate and mode (default 2)
  MODES             default "acm off"; e.g. "acm off acm-libzmq"; "acm_main=DIR" (a label
                    starting with "acm" or "off", "=", a directory): the check on (off) with
                    opensips.cfg and the *.py of DIR instead of opensips_scripts/, e.g. another
                    commit's copy of this repo's opensips_scripts/ (`git show REV:PATH` per
                    file); "acm_X" is compared with "off_X" when there is one;
                    "acm_echo": the check on, answered by an echo pool (the service's ZMTP
                    workers without the decision and the store: benchmarks/loadtool.py) instead
                    of acm serve: what any synchronous round trip costs OpenSIPS; its CPU is
                    reported in the acm column
                    "acm_storefloor": as acm_echo, and each of the pool's batches is one
                    round trip to acm's redis-server of one EVALSHA per request of a script
                    that touches nothing (decide.lua's 8 keys and 17 arguments): the floor of
                    any check that asks the store once per call
                    "acm_noio": the check on with the script's round trip replaced by a canned
                    allow (what the shim and the cfg cost without the I/O)
  RAMP              rates of the ramp, ascending (default: none), RAMP_SECONDS per step (10)
  PERF=1            perf record/stat runs (needs linux-perf)
  WIRE=0            no packet capture (it needs root: AF_PACKET)
  ACM_*             passed to acm serve and to every OpenSIPS (e.g. ACM_STORE_TIMEOUT_MS)
  ACM_BIN           default: `acm` next to this Python, else on PATH
  SIPP, REDIS_SERVER  binaries (default sipp, redis-server)
  OPENSIPS_MEM      "-m 1024 -M 64" by default
  OPENSIPS_WORKERS  udp_workers of every OpenSIPS (default: the cfg's 4); each process opens
                    its own connection to acm serve
  ACM_WORKERS       acm serve --workers (default 2)
  ACM_LISTEN        ipc (default) or tcp: acm serve's endpoint, ipc://<tmp>/acm.sock or
                    tcp://127.0.0.1:<free port>
  STORE_UNIX=1      acm serve reaches redis over a unix socket (unix://) instead of loopback TCP
  ACM_CPUS, REDIS_CPUS, OPENSIPS_CPUS  CPU lists (taskset -c) for acm serve, redis-server and
                    every OpenSIPS (default: no pinning)
  ONE_B=1           every call to one B-number (a distinct A each): past acm's threshold
                    of distinct A-numbers the calls are dropped (603 with X-ACM-Reason)
  GATEWAY_CPS=N     register SIPp's address as a carrier gateway limited to N calls/s
                    (docs/GATEWAY.md): calls above it get 503 with Retry-After
  IDLE_SECONDS      idle measurement before the runs (default 5)
  KEEP=1            keep the temp dir (logs, stat files, perf data)
  JSON_OUT          also write the results as JSON here

Usage: OPENSIPS_BIN=/opt/opensips/sbin/opensips python3 benchmarks/sipp/run.py
"""
from __future__ import annotations

import csv
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CFG = REPO / "opensips_scripts" / "opensips.cfg"
SCRIPT = REPO / "opensips_scripts" / "acm_opensips.py"
TICK = os.sysconf("SC_CLK_TCK")

procs: list[subprocess.Popen] = []
tmp: Path | None = None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port(udp_too: bool = False) -> int:
    for _ in range(100):
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        try:
            if udp_too:
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                finally:
                    u.close()
            return port
        finally:
            t.close()
    raise RuntimeError("no free port")


def pinned(name: str) -> list[str]:
    """`taskset -c <cpus>` when <name>_CPUS is set, else nothing."""
    cpus = os.environ.get(f"{name}_CPUS", "")
    return ["taskset", "-c", cpus] if cpus else []


def start(cmd: list[str], name: str, **kw) -> subprocess.Popen:
    assert tmp is not None
    out = open(tmp / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child for its life
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, **kw)
    procs.append(p)
    return p


def stop(p: subprocess.Popen, timeout: float = 10) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)   # its own session: only what we started
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
    if p in procs:
        procs.remove(p)


def cleanup(*_a) -> None:
    for p in reversed(list(procs)):
        stop(p, 5)
    if tmp is not None and os.environ.get("KEEP") != "1":
        shutil.rmtree(tmp, ignore_errors=True)


def on_signal(signum, _frame):
    cleanup()
    sys.exit(128 + signum)


def wait_for(pred, what: str, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def redis_cmd(port: int, *args: str) -> str:
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        req = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        s.sendall(req.encode())
        return s.recv(4096).decode(errors="replace").strip()
    finally:
        s.close()


def redis_up(port: int) -> bool:
    try:
        return redis_cmd(port, "PING") == "+PONG"
    except OSError:
        return False


def udp_listening(port: int) -> bool:
    hexport = f":{port:04X}"
    with open("/proc/net/udp") as f:
        return any(line.split()[1].endswith(hexport) for line in f.readlines()[1:])


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime ticks) of every process (a thread group counts once)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rindex(")") + 2:].split()
        out[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    return out


def tree_members(table: dict[int, tuple[int, int]], root: int) -> set[int]:
    """root and all its descendants."""
    members = {root} if root in table else set()
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return members


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over the threads of pid.

    A voluntary switch is a thread going to sleep to wait (and being woken again): the
    wake-ups a call costs.
    """
    vol = invol = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                invol += int(line.split()[1])
    return vol, invol


def snapshot(roots: dict[str, int]) -> dict[str, dict]:
    """CPU seconds, context switches and per-process CPU of each named process tree."""
    table = proc_table()
    out = {}
    for name, root in roots.items():
        members = tree_members(table, root)
        per = {p: table[p][1] / TICK for p in members}
        sw = [switches(p) for p in members]
        out[name] = {"cpu": sum(per.values()), "vcs": sum(v for v, _ in sw),
                     "ivcs": sum(i for _, i in sw), "procs": len(members), "per_pid": per}
    return out


def snapshot_delta(a: dict, b: dict, calls: int) -> dict:
    """Per tree: CPU µs per call, wake-ups (voluntary switches) per call, busiest processes."""
    out = {}
    n = max(calls, 1)
    for name in b:
        x, y = a[name], b[name]
        per = sorted(((round((y["per_pid"][p] - x["per_pid"].get(p, 0.0)) / n * 1e6, 1), p)
                      for p in y["per_pid"]), reverse=True)
        out[name] = {"cpu_us_per_call": round((y["cpu"] - x["cpu"]) / n * 1e6, 1),
                     "wakeups_per_call": round((y["vcs"] - x["vcs"]) / n, 2),
                     "preempted_per_call": round((y["ivcs"] - x["ivcs"]) / n, 2),
                     "procs": y["procs"],
                     "top_procs_us_per_call": [[p, us] for us, p in per[:6] if us > 0]}
    return out


def worker_requests(redis_port: int, field: str = "requests") -> dict[int, int]:
    """A counter of each acm worker so far (index -> count; requests served by default, or
    e.g. handoffs_received), from the stats hash."""
    s = socket.create_connection(("127.0.0.1", redis_port), timeout=2)
    try:
        key = b"{acm.stats}:w"   # acm_module/core/stats.py STATS_KEY
        s.sendall(b"*2\r\n$7\r\nHGETALL\r\n$%d\r\n%s\r\n" % (len(key), key))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"*") and _resp_complete(data):
                break
    finally:
        s.close()
    out: dict[int, int] = {}
    pattern = rb'\{"index":(\d+),"pid":\d+,[^\r]*?"%s":(\d+)' % field.encode()
    for m in re.finditer(pattern, data):
        out[int(m.group(1))] = out.get(int(m.group(1)), 0) + int(m.group(2))
    return out


def _resp_complete(data: bytes) -> bool:
    """Whether a RESP array of bulk strings is complete."""
    lines = data.split(b"\r\n")
    try:
        n = int(lines[0][1:])
    except ValueError:
        return False
    pos = len(lines[0]) + 2
    for _ in range(max(n, 0)):
        end = data.find(b"\r\n", pos)
        if end < 0:
            return False
        size = int(data[pos + 1:end])
        pos = end + 2 + size + 2
        if pos > len(data):
            return False
    return True


class WireTimer:
    """INVITE -> final response as the UAC's socket sees them, from kernel timestamps.

    SIPp's -trace_rtt moves in its scheduler's steps (4 ms on this kind of VM), too coarse for
    a p99 compared in fractions of a millisecond. This reads the UAC's UDP packets on `lo`
    with an AF_PACKET socket (a BPF filter keeps only the UAC's port, incoming copies only)
    and pairs each call's first INVITE with its first final response by Call-ID.
    """

    def __init__(self, port: int) -> None:
        import ctypes

        self.port = port
        insns = [(0x30, 0, 0, 9), (0x15, 0, 10, 17), (0x28, 0, 0, 6), (0x45, 8, 0, 0x1FFF),
                 (0xB1, 0, 0, 0), (0x48, 0, 0, 0), (0x15, 2, 0, port), (0x48, 0, 0, 2),
                 (0x15, 0, 3, port), (0x20, 0, 0, 0xFFFFF004), (0x15, 1, 0, 4),
                 (0x06, 0, 0, 0x40000), (0x06, 0, 0, 0)]
        self._prog = ctypes.create_string_buffer(
            b"".join(struct.pack("HBBI", *i) for i in insns))
        fprog = struct.pack("HL", len(insns), ctypes.addressof(self._prog))
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        self.sock.setsockopt(socket.SOL_SOCKET, 26, fprog)  # SO_ATTACH_FILTER
        self.sock.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
        self.sock.bind(("lo", 0x0800))
        self.sock.settimeout(0.2)
        self.sent: dict[bytes, float] = {}
        self.rtt_ms: list[float] = []
        self.packets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cid = re.compile(rb"\r\n(?:Call-ID|i)\s*:\s*(\S+)", re.IGNORECASE)
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(65535, 64)
            except TimeoutError:
                continue
            except OSError:
                return
            ts = next((struct.unpack("ll", d[:16]) for lvl, typ, d in anc
                       if lvl == socket.SOL_SOCKET and typ == 35), None)
            if ts is None:
                continue
            self.packets += 1
            t = ts[0] + ts[1] / 1e9
            body = data[(data[0] & 0x0F) * 4 + 8:]
            m = cid.search(body)
            if m is None:
                continue
            if body.startswith(b"INVITE "):
                self.sent.setdefault(m.group(1), t)
            elif body.startswith(b"SIP/2.0 ") and body[8:11] >= b"200" and b" INVITE" in (
                    body[body.find(b"CSeq:"):body.find(b"\r\n", body.find(b"CSeq:"))]):
                t0 = self.sent.pop(m.group(1), None)
                if t0 is not None:
                    self.rtt_ms.append((t - t0) * 1e3)

    def stop(self) -> list[float]:
        """Stop capturing; return the INVITE -> final response times in ms."""
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        return self.rtt_ms


# mode acm_noio: the script as shipped, its round trip replaced by a canned reply
NOIO_SHIM = """import msgpack
import acm_opensips

_REPLY = msgpack.packb({"verdict": "allow", "reason": "clean", "distinct": 1})


def mod_init():
    m = acm_opensips.mod_init()
    m.client._roundtrip = lambda payload, start: _REPLY
    return m
"""


def make_cfg(dst: Path, modules: str, ports: dict, enabled: bool,
             src: Path | None = None, workers: int = 0) -> Path:
    """The repo cfg (or the one in `src`, with its *.py) with only paths/ports/logging
    substituted, plus the switch."""
    if src is None:
        shutil.copy(SCRIPT, dst / "acm_opensips.py")
    else:
        for py in src.glob("*.py"):
            shutil.copy(py, dst / py.name)
    text = (CFG if src is None else src / "opensips.cfg").read_text()
    script = dst / "acm_opensips.py"
    if dst.name == "opensips_acm_noio":
        script = dst / "acm_noio.py"
        script.write_text(NOIO_SHIM)
    subs = [
        (r"/etc/opensips/acm_opensips\.py", str(script)),
        (r"(?m)^stderror_enabled=no", "stderror_enabled=yes"),
        (r"(?m)^syslog_enabled=yes", "syslog_enabled=no"),
        (r'(?m)^mpath="/usr/lib/x86_64-linux-gnu/opensips/modules/".*$', f'mpath="{modules}/"'),
        (r"(?m)^socket=udp:127\.0\.0\.1:5060", f"socket=udp:127.0.0.1:{ports['sip']}"),
        (r"(?m)^socket=tcp:127\.0\.0\.1:5060", f"socket=tcp:127.0.0.1:{ports['sip']}"),
        (r'modparam\("httpd", "port", 8888\)', f'modparam("httpd", "port", {ports["http"]})'),
        (r'"udp:127\.0\.0\.1:8080"', f'"udp:127.0.0.1:{ports["mi"]}"'),
        (r'"udp:127\.0\.0\.1:8898"', f'"udp:127.0.0.1:{ports["ev"]}"'),
    ]
    if not enabled:
        subs.append((r"\$var\(acm_enabled\) = 1;", "$var(acm_enabled) = 0;"))
    if workers:
        subs.append((r"(?m)^udp_workers=\d+", f"udp_workers={workers}"))
    for pat, rep in subs:
        text, n = re.subn(pat, lambda _m, r=rep: r, text)
        if n != 1:
            raise RuntimeError(f"cfg substitution {pat!r} matched {n} times (expected 1)")
    out = dst / "opensips.cfg"
    out.write_text(text)
    return out


def publish_gateway(redis_port: int, cps: int) -> None:
    """Publish a registry with 127.0.0.1 as a rate-limited gateway (GATEWAY_CPS)."""
    from acm_module.core import registry
    from acm_module.decide.store.conn import StoreConnection

    c = StoreConnection(f"redis://127.0.0.1:{redis_port}/0", timeout=2.0)
    try:
        registry.publish(c, registry.validate({
            "carriers": [{"id": "sipp", "name": "SIPp load", "licence": "other"}],
            "gateways": [{"id": "sipp-uac", "carrier_id": "sipp", "addresses": ["127.0.0.1"],
                          "rate_limit_cps": cps, "rate_window_s": 1.0}],
            "routes": []}))
    finally:
        c.close()


def parse_stat(path: Path) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    hdr, last = rows[0], rows[-1]
    d = dict(zip(hdr, last, strict=False))

    def epoch(v: str) -> float:  # "YYYY-MM-DD\tHH:MM:SS.us\t<epoch>"
        return float(v.split("\t")[-1])

    return {
        "elapsed_s": round(epoch(d["CurrentTime"]) - epoch(d["StartTime"]), 3),
        "outgoing": int(d["OutgoingCall(C)"]),
        "successful": int(d["SuccessfulCall(C)"]),
        "failed": int(d["FailedCall(C)"]),
        "call_rate_c": float(d["CallRate(C)"]),
        "retransmissions": int(d["Retransmissions(C)"]),
        "rt1_avg_ms_sipp": d.get("ResponseTime1(C)"),
    }


def pct(vals: list[float], q: float) -> float:
    if not vals:
        return float("nan")
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(q * len(vals)))]


def start_opensips(bin_: str, modules: str, mem: list[str], mode: str, endpoint: str,
                   extra_env: dict[str, str], src: Path | None = None,
                   workers: int = 0) -> tuple[subprocess.Popen, dict]:
    """Start one OpenSIPS with the repo cfg, or the one in `src` (check on or off); return it
    and its ports."""
    assert tmp is not None
    run = tmp / f"opensips_{mode}"
    run.mkdir()
    ports = {"sip": free_port(udp_too=True), "http": free_port(),
             "mi": free_port(udp_too=True), "ev": free_port(udp_too=True)}
    cfg = make_cfg(run, modules, ports, mode.startswith("acm"), src, workers)
    oenv = dict(os.environ, **extra_env, ACM_ENDPOINT=endpoint, ACM_OPENSIPS_CONFIG="")
    # e.g. acm-libzmq: the check on, with that client transport
    if mode.startswith("acm-") and src is None:
        oenv["ACM_TRANSPORT"] = mode[4:]
    chk = subprocess.run([bin_, "-C", "-f", str(cfg), *mem], capture_output=True, text=True,
                         env=oenv)
    if "config file ok" not in chk.stdout + chk.stderr:
        raise RuntimeError(f"cfg check failed:\n{chk.stderr[-2000:]}")
    osips = start([*pinned("OPENSIPS"), bin_, "-f", str(cfg), *mem, "-F"], f"opensips_{mode}",
                  env=oenv, cwd=run)
    wait_for(lambda: udp_listening(ports["sip"]) or osips.poll() is not None, "opensips")
    if osips.poll() is not None:
        raise RuntimeError(f"opensips exited; see {tmp}/opensips_{mode}.log")
    return osips, ports


def main() -> int:
    global tmp
    bin_ = os.environ.get("OPENSIPS_BIN")
    if not bin_ or not os.access(bin_, os.X_OK):
        print("set OPENSIPS_BIN to an opensips binary", file=sys.stderr)
        return 2
    modules = os.environ.get("OPENSIPS_MODULES")
    if not modules:
        base = Path(bin_).resolve().parent.parent
        for c in ("lib64/opensips/modules", "lib/opensips/modules",
                  "lib/x86_64-linux-gnu/opensips/modules"):
            if (base / c / "python.so").exists():
                modules = str(base / c)
                break
    if not modules or not Path(modules, "python.so").exists():
        print("set OPENSIPS_MODULES to the directory holding python.so", file=sys.stderr)
        return 2
    rates = [int(r) for r in os.environ.get("RATES", "300").split()]
    seconds = int(os.environ.get("SECONDS", "20"))
    repeat = int(os.environ.get("REPEAT", "2"))
    ramp = [int(r) for r in os.environ.get("RAMP", "").split()]
    ramp_seconds = int(os.environ.get("RAMP_SECONDS", "10"))
    modes, srcs = [], {}
    for m in os.environ.get("MODES", "acm off").split():
        label, sep, src = m.partition("=")
        if sep:
            if not label.startswith(("acm", "off")) or not Path(src, "opensips.cfg").exists():
                print(f"mode {m!r}: want acm<label>=DIR or off<label>=DIR with "
                      "DIR/opensips.cfg", file=sys.stderr)
                return 2
            srcs[label] = Path(src).resolve()
        modes.append(label)
    sipp = os.environ.get("SIPP", "sipp")
    redis_bin = os.environ.get("REDIS_SERVER", "redis-server")
    acm_bin = os.environ.get("ACM_BIN") or (
        str(Path(sys.executable).parent / "acm") if (Path(sys.executable).parent / "acm").exists()
        else shutil.which("acm") or "acm")
    mem = os.environ.get("OPENSIPS_MEM", "-m 1024 -M 64").split()
    gateway_cps = int(os.environ.get("GATEWAY_CPS", "0"))
    one_b = os.environ.get("ONE_B") == "1"
    perf = os.environ.get("PERF") == "1"
    wire = os.environ.get("WIRE", "1") == "1"
    osips_workers = int(os.environ.get("OPENSIPS_WORKERS", "0"))
    acm_workers = int(os.environ.get("ACM_WORKERS", "2"))
    listen = os.environ.get("ACM_LISTEN", "ipc")
    store_unix = os.environ.get("STORE_UNIX") == "1"
    if listen not in ("ipc", "tcp"):
        print("ACM_LISTEN: ipc or tcp", file=sys.stderr)
        return 2
    client_env = {k: v for k, v in os.environ.items()
                  if k.startswith("ACM_") and k not in ("ACM_ENDPOINT", "ACM_OPENSIPS_CONFIG")}

    tmp = Path(tempfile.mkdtemp(prefix="acm-sipp-"))
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    log(f"work dir {tmp}")
    version = subprocess.run([bin_, "-V"], capture_output=True, text=True).stdout.splitlines()[0]
    machine = {"opensips": version, "nproc": os.cpu_count(), "kernel": os.uname().release,
               "loadavg_start": os.getloadavg(),
               "cpu": next((ln.split(":", 1)[1].strip() for ln in
                            Path("/proc/cpuinfo").read_text().splitlines()
                            if ln.startswith("model name")), "?")}
    machine.update(opensips_workers=osips_workers or "cfg", acm_workers=acm_workers,
                   acm_listen=listen, store="unix" if store_unix else "tcp",
                   cpus={n: os.environ.get(f"{n}_CPUS", "") for n in ("ACM", "REDIS", "OPENSIPS")})
    log(f"{version}; modules {modules}; {machine['cpu']} x{machine['nproc']}; "
        f"loadavg {machine['loadavg_start']}")

    env = dict(os.environ, ACM_MI_HTTP="", ACM_MI_DATAGRAM="", ACM_METRICS_HTTP="", ACM_WEB_HTTP="",
               ACM_STATE_DIR=str(tmp / "state"))
    (tmp / "state").mkdir()

    # redis + acm serve
    rport = free_port()
    rsock = tmp / "redis.sock"
    redis = start([*pinned("REDIS"), redis_bin, "--port", str(rport), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(tmp),
                   "--unixsocket", str(rsock), "--unixsocketperm", "700"], "redis")
    wait_for(lambda: redis_up(rport), "redis")
    store = f"unix://{rsock}" if store_unix else f"redis://127.0.0.1:{rport}/0"
    sock = tmp / "acm.sock"
    if listen == "tcp":
        aport = free_port()
        endpoint = f"tcp://127.0.0.1:{aport}"

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", aport)) == 0
    else:
        endpoint = f"ipc://{sock}"

        def listening() -> bool:
            return sock.exists()
    acm = start([*pinned("ACM"), acm_bin, "serve", "--workers", str(acm_workers), "--store", store,
                 "--endpoint", endpoint], "acm", env=env)
    wait_for(lambda: listening() or acm.poll() is not None, "acm serve endpoint", 30)
    if acm.poll() is not None:
        raise RuntimeError(f"acm serve exited; see {tmp}/acm.log")
    time.sleep(1.0)

    # SIPp UAS
    uas_port = free_port(udp_too=True)
    # scenarios are copied so that SIPp's trace files land in the temp dir, not in the repo
    for x in ("uac.xml", "uas.xml"):
        shutil.copy(HERE / x, tmp / x)
    uas = start([sipp, "-sf", str(tmp / "uas.xml"), "-i", "127.0.0.1", "-p", str(uas_port),
                 "-nostdin", "-max_socket", "2048"], "uas", cwd=tmp)
    wait_for(lambda: udp_listening(uas_port), "SIPp UAS")

    # One OpenSIPS per mode for the whole run, both up at once, so that the modes alternate
    # run by run under the same background load of this shared machine.
    pools: dict[str, subprocess.Popen] = {}   # mode -> its stand-in pool
    pool_eps: dict[str, str] = {}
    for m, kind in (("acm_echo", "echo"), ("acm_storefloor", "store")):
        if m not in modes:
            continue
        sock_path = tmp / f"{kind}.sock"
        pool_eps[m] = f"ipc://{sock_path}"
        pools[m] = start([sys.executable, str(Path(__file__).resolve()), "--echo-pool",
                          pool_eps[m], str(acm_workers), kind, store], kind, cwd=REPO)
        pool = pools[m]
        wait_for(lambda p=sock_path, q=pool: p.exists() or q.poll() is not None, f"{kind} pool")
    instances = {m: start_opensips(bin_, modules, mem, m, pool_eps.get(m, endpoint),
                                   client_env, srcs.get(m), osips_workers)
                 for m in modes}
    time.sleep(1.0)
    offset = 0

    def numbers(run: Path, n: int) -> Path:
        nonlocal offset
        inf = run / "numbers.csv"
        with open(inf, "w") as f:   # distinct A and distinct B on every call, every run
            f.write("SEQUENTIAL\n")
            for i in range(offset, offset + n + 10):
                f.write(f"2348{i:09d};{'2349000000000' if one_b else f'2349{i:09d}'}\n")
        offset += n + 10
        return inf

    def uac_cmd(run: Path, mode: str, calls: int, rate: int, port: int) -> list[str]:
        shutil.copy(HERE / "uac.xml", run / "uac.xml")
        return [sipp, f"127.0.0.1:{uas_port}", "-rsa",
                f"127.0.0.1:{instances[mode][1]['sip']}", "-sf", str(run / "uac.xml"),
                "-inf", str(numbers(run, calls)), "-i", "127.0.0.1", "-p", str(port),
                "-nostdin", "-max_socket", "2048", "-m", str(calls), "-r", str(rate)]

    # warm-up (not measured): every OpenSIPS worker opens its connection to acm
    for mode in modes:
        run = tmp / f"warm_{mode}"
        run.mkdir()
        subprocess.run([*uac_cmd(run, mode, 80, 40, free_port(udp_too=True)), "-timeout", "30",
                        "-timeout_error"], cwd=run, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    # idle baseline: CPU the processes burn with no calls (timers, polling)
    idle_s = float(os.environ.get("IDLE_SECONDS", "5"))
    roots = {"opensips_" + m: instances[m][0].pid for m in modes}
    roots.update(acm=acm.pid, redis=redis.pid, sipp_uas=uas.pid)
    for m, pool in pools.items():
        roots[m] = pool.pid
    i0 = snapshot(roots)
    time.sleep(idle_s)
    i1 = snapshot(roots)
    idle_ms_per_s = {k: round((i1[k]["cpu"] - i0[k]["cpu"]) / idle_s * 1e3, 1) for k in roots}
    log(f"idle CPU ms/s: {idle_ms_per_s}")
    if gateway_cps and "acm" in modes:
        # SIPp's calls reach OpenSIPS from 127.0.0.1: register it as a carrier's
        # gateway with a rate limit (docs/GATEWAY.md); the workers pick it up in 50 ms.
        publish_gateway(rport, gateway_cps)
        time.sleep(0.5)

    def one_run(kind: str, rate: int, mode: str, secs: int, n: int,
                with_perf: bool = False) -> dict:
        run = tmp / f"{kind}_r{rate}_{mode}_{n}"
        run.mkdir()
        calls = rate * secs
        port = free_port(udp_too=True)
        cmd = [*uac_cmd(run, mode, calls, rate, port), "-l", str(max(2 * rate, 100)),
               "-timeout", str(secs + 40), "-timeout_error", "-trace_stat", "-stf",
               str(run / "stat.csv"), "-fd", "1", "-trace_rtt", "-rtt_freq", "1", "-trace_err"]
        osips = instances[mode][0]
        olog_path = tmp / f"opensips_{mode}.log"
        log_at = olog_path.stat().st_size
        timer = None
        if wire:
            try:
                timer = WireTimer(port)
            except PermissionError:
                log("no packet capture (AF_PACKET needs root): INVITE->final from SIPp only")
        dbsize0 = int(redis_cmd(rport, "DBSIZE").lstrip(":"))
        w0 = worker_requests(rport)
        h0 = worker_requests(rport, "handoffs_received")
        load0 = os.getloadavg()
        perf_procs: list[subprocess.Popen] = []
        if with_perf:
            pids = sorted(tree_members(proc_table(), osips.pid))
            perf_procs.append(subprocess.Popen(
                ["perf", "record", "-F", "999", "-g", "-o", str(run / "perf.data"), "-p",
                 ",".join(map(str, pids))], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            perf_procs.append(subprocess.Popen(
                ["perf", "stat", "-e", "task-clock,context-switches,cpu-migrations,page-faults",
                 "--per-thread", "-o", str(run / "perf_stat.txt"), "-p",
                 ",".join(map(str, pids))], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        s0 = snapshot(roots)
        u0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        uac = subprocess.run(cmd, cwd=run, capture_output=True, text=True)
        wall = time.monotonic() - t0
        u1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        s1 = snapshot(roots)
        for p in perf_procs:
            p.send_signal(signal.SIGINT)
            p.wait(30)
        rtts_wire = timer.stop() if timer else []
        time.sleep(1.2)   # the workers publish their counters once a second
        w1 = worker_requests(rport)
        h1 = worker_requests(rport, "handoffs_received")
        dbsize1 = int(redis_cmd(rport, "DBSIZE").lstrip(":"))
        with open(olog_path, "rb") as f:
            f.seek(log_at)
            olog = f.read().decode(errors="replace")
        st = parse_stat(run / "stat.csv")
        rtts, stamps = [], []
        for p in run.glob("*_rtt.csv"):
            with open(p) as f:
                next(f, None)
                for line in f:
                    if line.count(";") >= 2:
                        stamps.append(float(line.split(";")[0]))
                        rtts.append(float(line.split(";")[1]))
        span = (max(stamps) - min(stamps)) / 1000 if len(stamps) > 1 else 0
        breakdown = snapshot_delta(s0, s1, st["outgoing"])
        final = rtts_wire or rtts   # SIPp's 200s only, in its coarse steps, without capture
        errs = "".join(p.read_text(errors="replace") for p in run.glob("*_errors.log"))
        # the load tool: the UAC SIPp (a waited-for child) plus this driver (the wire timer)
        tool_s = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime
                     for a, b in zip(u0, u1, strict=True))
        mine = {"cpu_us_per_call": round(tool_s / max(st["outgoing"], 1) * 1e6, 1),
                "cpu_share_of_one_core": round(tool_s / wall, 2)}
        name = "opensips_" + mode
        res = {
            "kind": kind, "rate": rate, "mode": mode, "seconds": secs, "sipp_rc": uac.returncode,
            **st, "wall_s": round(wall, 2), "loadavg": [round(x, 2) for x in load0],
            # rate of answered INVITEs: 200s received per second, first to last
            "cps_achieved": round((len(stamps) - 1) / span, 1) if span else 0,
            "rt_ms_sipp": {"n": len(rtts), "avg": round(sum(rtts) / len(rtts), 2) if rtts else None,
                           "p50": pct(rtts, .5), "p99": pct(rtts, .99),
                           "max": max(rtts) if rtts else None},
            "invite_final_ms": {"n": len(final), "source": "wire" if rtts_wire else "sipp",
                                "p50": round(pct(final, .5), 3),
                                "p90": round(pct(final, .9), 3),
                                "p99": round(pct(final, .99), 3),
                                "max": round(max(final), 3) if final else None},
            "opensips": breakdown[name],
            "acm": breakdown[mode if mode in pools else "acm"],
            "redis": breakdown["redis"],
            "sipp_uas": breakdown["sipp_uas"], "load_tool_uac_and_driver": mine,
            "all_us_per_call": round(breakdown[name]["cpu_us_per_call"]
                                     + breakdown[mode if mode in pools else "acm"]
                                     ["cpu_us_per_call"]
                                     + breakdown["redis"]["cpu_us_per_call"], 1),
            "worker_requests": {str(k): w1.get(k, 0) - w0.get(k, 0) for k in sorted(w1)},
            # connections moved between acm workers during the run (rebalance)
            "worker_handoffs": sum(h1.values()) - sum(h0.values()),
            "redis_keys_added": dbsize1 - dbsize0,
            # calls SIPp aborted because the UAS's 180 arrived after its 200 (two OpenSIPS
            # workers relayed them), with or without the check (RESULTS.md §6b)
            "failed_late_180": len(re.findall(r"while pausing.*\n?.*180 Ringing|"
                                              r"received 'SIP/2.0 180", errs)),
            # calls let through unchecked (timeout, service error, open breaker): one cfg line each
            "log_no_verdict": olog.count("ACM: no verdict for"),
            "log_acm_drop": olog.count("ACM: drop"),
            "log_rate_limited": olog.count("reason=rate_limited"),
            "log_errors": len(re.findall(r"ERROR|Traceback", olog)),
            "gateway_cps": gateway_cps if mode.startswith("acm") else 0,
        }
        if with_perf:
            rep = subprocess.run(["perf", "report", "-i", str(run / "perf.data"), "--stdio",
                                  "--no-children", "--sort", "dso,sym", "--percent-limit",
                                  "0.7", "-g", "none"], capture_output=True, text=True)
            (run / "perf_report.txt").write_text(rep.stdout)
            res["perf_dir"] = str(run)
        log(json.dumps(res))
        return res

    results = []
    for rate in rates:
        for n in range(repeat):
            for mode in (modes if n % 2 == 0 else modes[::-1]):
                results.append(one_run("main", rate, mode, seconds, n))
    # highest rate with 0 failed calls: both modes step up together until each fails
    alive = list(modes)
    for rate in ramp:
        for mode in list(alive):
            r = one_run("ramp", rate, mode, ramp_seconds, 0)
            results.append(r)
            if not _sustained(r):
                alive.remove(mode)
        if not alive:
            break
    if perf and rates:
        for mode in modes:
            results.append(one_run("perf", rates[0], mode, min(seconds, 10), 0, with_perf=True))

    summary = summarize(results, modes)
    print_tables(results, summary, machine, idle_ms_per_s)
    if os.environ.get("JSON_OUT"):
        Path(os.environ["JSON_OUT"]).write_text(json.dumps(
            {"machine": machine, "idle_cpu_ms_per_s": idle_ms_per_s, "results": results,
             "summary": summary}, indent=2))
    return 0


def _failed(r: dict) -> int:
    """Failed calls, not counting SIPp's late-180 aborts (the 200 was received)."""
    return r["failed"] - r["failed_late_180"]


def _sustained(r: dict) -> bool:
    """Whether a run held its rate: no failed call and at least 97 % of the calls per second."""
    return not _failed(r) and r["cps_achieved"] >= 0.97 * r["rate"]


def summarize(results: list[dict], modes: list[str]) -> dict:
    """Ratios on/off per rate (medians over the repeats) and the highest 0-failure rates."""
    out: dict = {"highest_rate_0_failed": {}}
    for mode in modes:
        ok = 0
        for r in sorted((r for r in results if r["mode"] == mode and r["kind"] != "perf"),
                        key=lambda r: r["rate"]):
            if not _sustained(r):
                break
            ok = r["rate"]
        out["highest_rate_0_failed"][mode] = ok
    hi = out["highest_rate_0_failed"]
    for on_mode in (m for m in modes if m.startswith("acm")):
        off_mode = "off" + on_mode[3:] if "off" + on_mode[3:] in modes else "off"
        if off_mode not in modes:
            break
        key = f"{on_mode}_vs_{off_mode}"
        out[key] = {"highest_rate_ratio": (round(hi[on_mode] / hi[off_mode], 2)
                                           if hi[off_mode] else None)}
        for rate in sorted({r["rate"] for r in results if r["kind"] == "main"}):
            on = [r for r in results if r["kind"] == "main" and r["rate"] == rate
                  and r["mode"] == on_mode]
            off = [r for r in results if r["kind"] == "main" and r["rate"] == rate
                   and r["mode"] == off_mode]
            if not on or not off:
                continue
            o_on = _median(on, lambda r: r["opensips"]["cpu_us_per_call"])
            o_off = _median(off, lambda r: r["opensips"]["cpu_us_per_call"])
            out[key][f"rate_{rate}"] = {
                "opensips_cpu_ratio": round(o_on / o_off, 2) if o_off else None,
                "opensips_cpu_ratio_per_pair": [
                    round(a["opensips"]["cpu_us_per_call"] / b["opensips"]["cpu_us_per_call"], 2)
                    for a, b in zip(on, off, strict=False)],
                "all_added_us_per_call": round(_median(on, lambda r: r["all_us_per_call"])
                                               - _median(off, lambda r: r["all_us_per_call"]), 1),
                "p99_invite_final_added_ms": round(
                    _median(on, lambda r: r["invite_final_ms"]["p99"])
                    - _median(off, lambda r: r["invite_final_ms"]["p99"]), 3),
                "wakeups_added_per_call": round(
                    _median(on, _wakeups) - _median(off, _wakeups), 2),
                "unchecked_calls": [r["log_no_verdict"] for r in on],
            }
    return out


def _median(rs: list[dict], f) -> float:
    v = sorted(f(r) for r in rs)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _wakeups(r: dict) -> float:
    return sum(r[k]["wakeups_per_call"] for k in ("opensips", "acm", "redis"))


def print_tables(results: list[dict], summary: dict, machine: dict, idle: dict) -> None:
    print()
    print("| run | rate | mode | calls | CPS achieved | failed (late 180) | "
          "INVITE→final ms p50 / p99 (wire) | SIPp rtt p99 | "
          "CPU µs/call OpenSIPS / acm serve / redis = all | "
          "wake-ups/call OpenSIPS / acm / redis | SIPp UAC+driver / UAS µs/call | "
          "requests per acm worker | loadavg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        w = r["invite_final_ms"]
        print(f"| {r['kind']} | {r['rate']} | {r['mode']} | "
              f"{r['outgoing']} | {r['cps_achieved']} | {r['failed']} ({r['failed_late_180']}) | "
              f"{w['p50']:.2f} / {w['p99']:.2f} | {r['rt_ms_sipp']['p99']:g} | "
              f"{r['opensips']['cpu_us_per_call']:,.0f} / {r['acm']['cpu_us_per_call']:,.0f} / "
              f"{r['redis']['cpu_us_per_call']:,.0f} = {r['all_us_per_call']:,.0f} | "
              f"{r['opensips']['wakeups_per_call']:.1f} / {r['acm']['wakeups_per_call']:.1f} / "
              f"{r['redis']['wakeups_per_call']:.1f} | "
              f"{r['load_tool_uac_and_driver']['cpu_us_per_call']:,.0f} / "
              f"{r['sipp_uas']['cpu_us_per_call']:,.0f} | "
              f"{'/'.join(map(str, r['worker_requests'].values()))} "
              f"({r['worker_handoffs']} moved) | {r['loadavg'][0]} |")
    print(f"\nidle CPU ms/s: {idle}")
    print(f"summary: {json.dumps(summary)}")
    print(f"\n{machine}")


def echo_pool(endpoint: str, workers: int, kind: str = "echo", store: str = "") -> int:
    """Serve an echo or store-floor pool on endpoint until SIGTERM (acm_echo, acm_storefloor)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.loadtool import zmtp_pool

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with zmtp_pool(endpoint, workers, kind, store or None):
        stopped.wait()
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--echo-pool"]:
    sys.exit(echo_pool(sys.argv[2], int(sys.argv[3]), *sys.argv[4:6]))
if __name__ == "__main__":
    try:
        rc = main()
    finally:
        cleanup()
    sys.exit(rc)
