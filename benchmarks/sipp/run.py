#!/usr/bin/env python3
"""SIPp load through a real OpenSIPS, with and without the acm check.

Starts (all on 127.0.0.1, free ports picked at run time, everything in one temp dir):
  redis-server (--save '' --appendonly no), ``acm serve`` on an ipc:// socket,
  a SIPp UAS (uas.xml), and for every (rate, mode) an OpenSIPS running
  opensips_scripts/opensips.cfg adapted like /tmp/acmverify/mkcfg.sh did: only the module path,
  the script path, logging to stderr and the listening ports change; mode "off" additionally
  sets ``$var(acm_enabled) = 0`` (the cfg's own switch: route(acm_check) is skipped).
Then drives the SIPp UAC (uac.xml) at a fixed rate for SECONDS seconds and reports, per run:
  CPS achieved, successful/failed calls, INVITE->200 response time (SIPp -trace_rtt, ms),
  OpenSIPS CPU per call (utime+stime of every OpenSIPS process, /proc before/after),
  and for the "acm" mode the CPU of acm serve + redis and the verdict health
  (OpenSIPS log lines "no verdict"/"ACM: drop", redis DBSIZE growth = one dedup key per call).

Environment:
  OPENSIPS_BIN      (required) operator-provided opensips binary
  OPENSIPS_MODULES  module dir (default: <bin>/../lib64/opensips/modules or ../lib/...)
  RATES             call rates, space separated (default "100 300")
  SECONDS           seconds of load per run (default 20)
  MODES             default "acm off"
  ACM_BIN           default: `acm` next to this Python, else on PATH
  SIPP, REDIS_SERVER  binaries (default sipp, redis-server)
  OPENSIPS_MEM      "-m 1024 -M 64" by default
  GATEWAY_CPS=N     in "acm" runs, register SIPp's address as a carrier gateway limited to N
                    calls/s (docs/GATEWAY.md): calls above it get 503 with Retry-After
  KEEP=1            keep the temp dir (logs, stat files)
  JSON_OUT          also write the results as JSON here

Usage: OPENSIPS_BIN=/opt/opensips/sbin/opensips python3 benchmarks/sipp/run.py
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


def tree_cpu(root: int) -> tuple[float, int]:
    """utime+stime (s) of root and all its descendants (threads included), and their count."""
    stats = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rindex(")") + 2:].split()
        stats[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]))  # ppid, utime+stime
    members = {root} if root in stats else set()
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return sum(stats[p][1] for p in members) / TICK, len(members)


def make_cfg(dst: Path, modules: str, ports: dict, enabled: bool) -> Path:
    """The repo cfg with only paths/ports/logging substituted (mkcfg.sh logic), plus the switch."""
    shutil.copy(SCRIPT, dst / "acm_opensips.py")
    text = CFG.read_text()
    subs = [
        (r"/etc/opensips/acm_opensips\.py", str(dst / "acm_opensips.py")),
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
    for pat, rep in subs:
        text, n = re.subn(pat, lambda _m, r=rep: r, text)
        if n != 1:
            raise RuntimeError(f"cfg substitution {pat!r} matched {n} times (expected 1)")
    out = dst / f"opensips_{'acm' if enabled else 'off'}.cfg"
    out.write_text(text)
    return out


def publish_gateway(redis_port: int, cps: int) -> None:
    """Publish a registry with 127.0.0.1 as a rate-limited gateway (GATEWAY_CPS)."""
    from acm_module.gateway import registry
    from acm_module.store.conn import StoreConnection

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
    rates = [int(r) for r in os.environ.get("RATES", "100 300").split()]
    seconds = int(os.environ.get("SECONDS", "20"))
    modes = os.environ.get("MODES", "acm off").split()
    sipp = os.environ.get("SIPP", "sipp")
    redis_bin = os.environ.get("REDIS_SERVER", "redis-server")
    acm_bin = os.environ.get("ACM_BIN") or (
        str(Path(sys.executable).parent / "acm") if (Path(sys.executable).parent / "acm").exists()
        else shutil.which("acm") or "acm")
    mem = os.environ.get("OPENSIPS_MEM", "-m 1024 -M 64").split()
    gateway_cps = int(os.environ.get("GATEWAY_CPS", "0"))

    tmp = Path(tempfile.mkdtemp(prefix="acm-sipp-"))
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    log(f"work dir {tmp}")
    version = subprocess.run([bin_, "-V"], capture_output=True, text=True).stdout.splitlines()[0]
    log(f"{version}; modules {modules}")

    env = dict(os.environ, ACM_MI_HTTP="", ACM_MI_DATAGRAM="", ACM_METRICS_HTTP="", ACM_WEB_HTTP="",
               ACM_STATE_DIR=str(tmp / "state"))
    (tmp / "state").mkdir()

    # redis + acm serve
    rport = free_port()
    redis = start([redis_bin, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(tmp)], "redis")
    wait_for(lambda: redis_up(rport), "redis")
    sock = tmp / "acm.sock"
    acm = start([acm_bin, "serve", "--workers", "2", "--store", f"redis://127.0.0.1:{rport}/0",
                 "--endpoint", f"ipc://{sock}"], "acm", env=env)
    wait_for(lambda: sock.exists() or acm.poll() is not None, "acm serve socket", 30)
    if acm.poll() is not None:
        raise RuntimeError(f"acm serve exited; see {tmp}/acm.log")
    time.sleep(1.0)

    # SIPp UAS
    uas_port = free_port(udp_too=True)
    # scenarios are copied so that SIPp's trace files land in the temp dir, not in the repo
    for x in ("uac.xml", "uas.xml"):
        shutil.copy(HERE / x, tmp / x)
    start([sipp, "-sf", str(tmp / "uas.xml"), "-i", "127.0.0.1", "-p", str(uas_port),
           "-nostdin", "-max_socket", "2048"], "uas", cwd=tmp)
    wait_for(lambda: udp_listening(uas_port), "SIPp UAS")

    results = []
    offset = 0
    for rate in rates:
        for mode in modes:
            enabled = mode == "acm"
            run = tmp / f"r{rate}_{mode}"
            run.mkdir()
            ports = {"sip": free_port(udp_too=True), "http": free_port(),
                     "mi": free_port(udp_too=True), "ev": free_port(udp_too=True)}
            cfg = make_cfg(run, modules, ports, enabled)
            oenv = dict(os.environ, ACM_ENDPOINT=f"ipc://{sock}", ACM_OPENSIPS_CONFIG="")
            chk = subprocess.run([bin_, "-C", "-f", str(cfg), *mem], capture_output=True, text=True,
                                 env=oenv)
            if "config file ok" not in chk.stdout + chk.stderr:
                raise RuntimeError(f"cfg check failed:\n{chk.stderr[-2000:]}")
            osips = start([bin_, "-f", str(cfg), *mem, "-F"], f"opensips_r{rate}_{mode}",
                          env=oenv, cwd=run)
            sip_port = ports["sip"]
            wait_for(lambda p=osips, sp=sip_port: udp_listening(sp) or p.poll() is not None,
                     "opensips")
            if osips.poll() is not None:
                raise RuntimeError(f"opensips exited; see {tmp}/opensips_r{rate}_{mode}.log")
            time.sleep(1.0)

            calls = rate * seconds
            warm = 40
            inf = run / "numbers.csv"
            with open(inf, "w") as f:   # distinct A and distinct B on every call, every run
                f.write("SEQUENTIAL\n")
                for i in range(offset, offset + warm + calls + 10):
                    f.write(f"2348{i:09d};2349{i:09d}\n")
            offset += warm + calls + 10

            shutil.copy(HERE / "uac.xml", run / "uac.xml")
            base = [sipp, f"127.0.0.1:{uas_port}", "-rsa", f"127.0.0.1:{ports['sip']}",
                    "-sf", str(run / "uac.xml"), "-inf", str(inf), "-i", "127.0.0.1",
                    "-p", str(free_port(udp_too=True)), "-nostdin", "-max_socket", "2048"]
            # warm-up (not measured): every OpenSIPS worker opens its ZeroMQ socket
            subprocess.run([*base, "-m", str(warm), "-r", "20", "-timeout", "30",
                            "-timeout_error"], cwd=run, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            # idle baseline: CPU the processes burn with no calls (timers, polling)
            IDLE = float(os.environ.get("IDLE_SECONDS", "5"))
            i0 = (tree_cpu(osips.pid)[0], tree_cpu(acm.pid)[0], tree_cpu(redis.pid)[0])
            time.sleep(IDLE)
            i1 = (tree_cpu(osips.pid)[0], tree_cpu(acm.pid)[0], tree_cpu(redis.pid)[0])
            idle_rate = [(b - a) / IDLE for a, b in zip(i0, i1, strict=True)]
            if gateway_cps and mode == "acm":
                # SIPp's calls reach OpenSIPS from 127.0.0.1: register it as a carrier's
                # gateway with a rate limit (docs/GATEWAY.md); the workers pick it up in 50 ms.
                publish_gateway(rport, gateway_cps)
                time.sleep(0.5)
            dbsize0 = int(redis_cmd(rport, "DBSIZE").lstrip(":"))
            o0, nproc = tree_cpu(osips.pid)
            a0, _ = tree_cpu(acm.pid)
            r0, _ = tree_cpu(redis.pid)
            t0 = time.monotonic()
            uac = subprocess.run([*base, "-m", str(calls), "-r", str(rate),
                                         "-l", str(max(2 * rate, 100)),
                                         "-timeout", str(seconds + 40), "-timeout_error",
                                         "-trace_stat", "-stf", str(run / "stat.csv"), "-fd", "1",
                                         "-trace_rtt", "-rtt_freq", "1", "-trace_err"],
                                 cwd=run, capture_output=True, text=True)
            wall = time.monotonic() - t0
            o1, _ = tree_cpu(osips.pid)
            a1, _ = tree_cpu(acm.pid)
            r1, _ = tree_cpu(redis.pid)
            dbsize1 = int(redis_cmd(rport, "DBSIZE").lstrip(":"))
            time.sleep(0.5)
            stop(osips)
            olog = (tmp / f"opensips_r{rate}_{mode}.log").read_text(errors="replace")

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
            res = {
                "rate": rate, "mode": mode, "seconds": seconds, "sipp_rc": uac.returncode,
                **st, "wall_s": round(wall, 2),
                # rate of answered INVITEs: 200s received per second, first to last
                "cps_achieved": round((len(stamps) - 1) / span, 1) if span else 0,
                "rt_ms": {"n": len(rtts), "avg": round(sum(rtts) / len(rtts), 2) if rtts else None,
                          "p50": pct(rtts, .5), "p90": pct(rtts, .9), "p99": pct(rtts, .99),
                          "max": max(rtts) if rtts else None},
                "opensips_procs": nproc,
                "opensips_cpu_s": round(o1 - o0, 2),
                "idle_cpu_ms_per_s": [round(x * 1e3, 1) for x in idle_rate],  # opensips, acm, redis
                "opensips_cpu_us_per_call": round((o1 - o0) / max(st["outgoing"], 1) * 1e6, 1),
                "opensips_net_cpu_us_per_call": round(
                    (o1 - o0 - idle_rate[0] * wall) / max(st["outgoing"], 1) * 1e6, 1),
                "acm_cpu_us_per_call": round((a1 - a0) / max(st["outgoing"], 1) * 1e6, 1),
                "acm_net_cpu_us_per_call": round(
                    (a1 - a0 - idle_rate[1] * wall) / max(st["outgoing"], 1) * 1e6, 1),
                "redis_cpu_us_per_call": round((r1 - r0) / max(st["outgoing"], 1) * 1e6, 1),
                "redis_keys_added": dbsize1 - dbsize0,
                "log_no_verdict": olog.count("no verdict"),
                "log_acm_drop": olog.count("ACM: drop"),
                "log_rate_limited": olog.count("reason=rate_limited"),
                "gateway_cps": gateway_cps if mode == "acm" else 0,
                "log_errors": len(re.findall(r"ERROR|Traceback", olog)),
            }
            results.append(res)
            log(json.dumps(res))

    # summary table
    print()
    print("| rate | acm check | calls | CPS achieved | successful | failed | retrans | "
          "INVITE→200 ms avg / p50 / p90 / p99 / max | OpenSIPS CPU µs/call (minus idle) | "
          "acm serve CPU µs/call (minus idle) | redis CPU µs/call | no-verdict / drop log lines |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rt = r["rt_ms"]
        print(f"| {r['rate']} | {'on' if r['mode'] == 'acm' else 'off'} | {r['outgoing']} | "
              f"{r['cps_achieved']} | {r['successful']} | {r['failed']} | {r['retransmissions']} | "
              f"{rt['avg']} / {rt['p50']:g} / {rt['p90']:g} / {rt['p99']:g} / {rt['max']:g} | "
              f"{r['opensips_cpu_us_per_call']:,.0f} ({r['opensips_net_cpu_us_per_call']:,.0f}) | "
              f"{r['acm_cpu_us_per_call']:,.0f} ({r['acm_net_cpu_us_per_call']:,.0f}) | "
              f"{r['redis_cpu_us_per_call']:,.0f} | {r['log_no_verdict']} / {r['log_acm_drop']} |")
    print(f"\n{version}")
    if os.environ.get("JSON_OUT"):
        Path(os.environ["JSON_OUT"]).write_text(json.dumps(
            {"opensips": version, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    finally:
        cleanup()
    sys.exit(rc)
