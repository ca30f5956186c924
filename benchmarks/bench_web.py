"""The REST API's call-event throughput and its added cost over the ZeroMQ path, in one run.

    .venv/bin/python -m benchmarks.bench_web --seconds 5 --connections 16

Starts a redis-server and `acm serve` (its web process on a free loopback port), then measures,
one phase after the other on the same service:

1. the load tool's own ceiling: wrk (keep-alive) against a bare asyncio HTTP responder that
   answers a constant 200 without parsing anything;
2. the API floor: wrk against GET /api/v1/health (no auth, no pool);
3. events: wrk POSTing CallEventRequests (unique call ids, random numbers, mostly clean calls)
   to /api/v1/fraud/events over `--connections` keep-alive connections;
4. events over 1 connection (one in flight): latency;
5. the ZeroMQ path with 1 client and with `--connections` clients (benchmarks/loadtool.py:
   OpenSIPS-like REQ clients) on the same pool;

and the web process's CPU time per event in phase 3 (from /proc). Needs `wrk` (apt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.loadtool import _free_port, acm_service, drive, redis_server

TOKEN = "bench-token-0123456789abcdef"
# On a shared 2-vCPU VM the production 20 ms store timeout turns scheduling stalls into
# store_unavailable answers; both paths (HTTP and ZeroMQ) run with this one.
STORE_TIMEOUT_MS = "200"

_RESPONDER = textwrap.dedent("""
    import asyncio, sys
    REPLY = (b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\n"
             b"content-length: 15\\r\\n\\r\\n{\\"status\\":\\"ok\\"}")
    class P(asyncio.Protocol):
        def connection_made(self, t): self.t = t
        def data_received(self, d):
            for _ in range(d.count(b"\\r\\n\\r\\n")): self.t.write(REPLY)
    async def main():
        s = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
        await s.serve_forever()
    try:
        import uvloop; uvloop.run(main())
    except ImportError:
        asyncio.run(main())
""")

_EVENTS_LUA = textwrap.dedent("""
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    wrk.headers["Authorization"] = "Bearer %(token)s"
    local n = 0
    local tid = 0
    setup = function(thread) thread:set("tid", tid); tid = tid + 1 end
    request = function()
      n = n + 1
      local body = string.format(
        '{"call_id":"w%(run)s-%%s-%%d","a_number":"+23481%%08d","b_number":"+23480%%08d"}',
        tid, n, math.random(0, 99999999), math.random(0, 999999))
      return wrk.format(nil, nil, nil, body)
    end
""")


def wrk(url: str, seconds: float, connections: int, threads: int = 2,
        script: str | None = None) -> dict[str, Any]:
    """Run wrk; return requests/s, latency p50/p99 (µs), requests and non-2xx answers."""
    cmd = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections), "-d",
           f"{seconds:g}s", "--latency"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr or out.stdout}")
    text = out.stdout

    def lat(p: str) -> float:
        m = re.search(rf"^\s*{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            return 0.0
        return float(m.group(1)) * {"us": 1.0, "ms": 1e3, "s": 1e6}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errs = re.search(r"Socket errors:.*", text)
    return {"rate": float(rps.group(1)) if rps else 0.0, "p50": lat("50"), "p99": lat("99"),
            "requests": int(total.group(1)) if total else 0,
            "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errs.group(0) if errs else ""}


@contextlib.contextmanager
def responder() -> Iterator[int]:
    """Run the bare HTTP responder (the load tool's ceiling); yield its port."""
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-c", _RESPONDER, str(port)])
    try:
        _wait_port(port)
        yield port
    finally:
        p.terminate()
        p.wait(10)


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _child(parent: int, comm: str) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent and name == comm:
                return int(pid)
    raise RuntimeError(f"no {comm} process under {parent}")


def cpu_s(pid: int) -> float:
    """Return a process's user + system CPU seconds."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_web", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per phase")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench_web: needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    res: dict[str, Any] = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "load_average_start": os.getloadavg()[0],
                                    "cpus": os.cpu_count(), "python": sys.version.split()[0],
                                    "connections": args.connections,
                                    "seconds": args.seconds}}
    s, c = args.seconds, args.connections
    with responder() as port:
        res["tool_ceiling"] = wrk(f"http://127.0.0.1:{port}/", s, c)
    tmp = tempfile.mkdtemp(prefix="acm-bench-web-")
    try:
        web_port = _free_port()
        with redis_server(None) as (store, _), acm_service(
                store, args.workers, f"ipc://{tmp}/acm.sock",
                env={"ACM_WEB_HTTP": f"127.0.0.1:{web_port}", "ACM_API_TOKEN": TOKEN,
                     "ACM_STORE_TIMEOUT_MS": STORE_TIMEOUT_MS}) as svc:
            _wait_port(web_port)
            base = f"http://127.0.0.1:{web_port}"
            web_pid = _child(svc.pid, "acm-web")
            res["api_floor_health"] = wrk(f"{base}/api/v1/health", s, c)
            script = Path(tmp) / "events.lua"
            run = str(int(time.time()))
            script.write_text(_EVENTS_LUA % {"token": TOKEN, "run": run})
            url = f"{base}/api/v1/fraud/events"
            wrk(url, 1.0, c, script=str(script))  # warm-up (dedup: new ids follow)
            script.write_text(_EVENTS_LUA % {"token": TOKEN, "run": run + "m"})
            cpu0 = cpu_s(web_pid)
            ev = wrk(url, s, c, script=str(script))
            ev["web_cpu_us_per_event"] = (cpu_s(web_pid) - cpu0) * 1e6 / max(1, ev["requests"])
            res["events"] = ev
            script.write_text(_EVENTS_LUA % {"token": TOKEN, "run": run + "1"})
            res["events_1_connection"] = wrk(url, s, 1, threads=1, script=str(script))
            endpoint = f"ipc://{tmp}/acm.sock"
            for name, clients in (("zmq_1_client", 1), ("zmq_clients", c)):
                r = drive(endpoint, clients, s, kind="req", name=name)
                res[name] = {"rate": r.rate, "p50": r.p50, "p99": r.p99, "errors": r.errors}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one_http, one_zmq = res["events_1_connection"], res["zmq_1_client"]
    res["added_latency_p50_us"] = one_http["p50"] - one_zmq["p50"]
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def render(r: dict[str, Any]) -> str:
    """Format the figures as a Markdown table."""
    c = r["meta"]["connections"]
    rows = [("load tool ceiling: wrk -> bare asyncio responder", c, r["tool_ceiling"]),
            ("API floor: GET /api/v1/health", c, r["api_floor_health"]),
            ("**POST /api/v1/fraud/events**", c, r["events"]),
            ("POST /api/v1/fraud/events", 1, r["events_1_connection"]),
            ("ZeroMQ path (REQ clients, loadtool)", 1, r["zmq_1_client"]),
            ("ZeroMQ path (REQ clients, loadtool)", c, r["zmq_clients"])]
    out = ["| phase | connections | events/s | p50 µs | p99 µs | errors |",
           "|---|---|---|---|---|---|"]
    for name, n, x in rows:
        err = x.get("non_2xx", x.get("errors", 0))
        out.append(f"| {name} | {n} | {x['rate']:,.0f} | {x['p50']:,.0f} | {x['p99']:,.0f} | "
                   f"{err} |")
    ev = r["events"]
    out.append("")
    out.append(f"web process CPU per event: {ev['web_cpu_us_per_event']:.0f} µs; added p50 "
               f"latency over the ZeroMQ path (1 in flight): {r['added_latency_p50_us']:,.0f} "
               f"µs; load average at start {r['meta']['load_average_start']:.2f}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
