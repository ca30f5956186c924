"""Real servers for the suite: reuse one given by URL, or start a temporary one.

Under CI=true a server that cannot be started is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from acm_module.decide.client import CurveKeys
from acm_module.decide.store.conn import StoreConnection

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parents[2]


def unavailable(what: str) -> None:
    """Fail under CI, skip elsewhere: a server the suite needs is missing."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: a missing server is a failure)")
    pytest.skip(what)


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> bool:
    """Wait until something accepts on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


class RedisServer:
    """A temporary redis-server (stand-in for DragonflyDB) that tests may stop and restart."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.password = password  # requirepass, and in the URL
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            unavailable("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="acm-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.binary
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--databases", "16", *auth],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port):
            self.stop()
            unavailable(f"redis-server did not start on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_url_from_env() -> str | None:
    """Return a store URL the caller gave (ACM_TEST_REDIS_URL), if any."""
    return os.environ.get("ACM_TEST_REDIS_URL") or None


def flush(url: str) -> None:
    """Empty the database of a store URL."""
    c = StoreConnection(url, timeout=2.0)
    try:
        c.call("FLUSHDB")
    finally:
        c.close()


class Service:
    """`acm serve` run as a real subprocess, the way an operator runs it."""

    def __init__(self, store_url: str, workers: int = 2, extra_env: dict[str, str] | None = None,
                 args: list[str] | None = None, bind: str | None = None,
                 curve: CurveKeys | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="acm-svc-")
        # bind: a tcp:// endpoint to bind instead of the ipc one (0.0.0.0 is reached through
        # 127.0.0.1); curve: the keys the readiness probe uses.
        self.bind = bind
        self.endpoint = (bind or f"ipc://{self.dir}/acm.sock").replace(
            "0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
        self.curve = curve
        self.store_url = store_url
        self.workers = workers
        # Every service gets its own ports and state dir, so services of different tests never
        # share a port or a persisted MI override.
        self.mi_http = f"127.0.0.1:{free_port()}"
        self.mi_datagram = f"127.0.0.1:{free_port()}"
        self.metrics_http = f"127.0.0.1:{free_port()}"
        self.env = {**os.environ, "ACM_MI_HTTP": self.mi_http,
                    "ACM_MI_DATAGRAM": self.mi_datagram, "ACM_METRICS_HTTP": self.metrics_http,
                    # The REST API process is off unless a test turns it on (tests/web): it
                    # costs a second of CPU to start and holds connections to the pool.
                    "ACM_WEB_HTTP": "",
                    "ACM_STATE_DIR": f"{self.dir}/state",
                    # A loaded CI machine can stall a store round trip past the production 40 ms;
                    # tests that exercise the timeout set their own.
                    "ACM_STORE_TIMEOUT_MS": "1000", **(extra_env or {})}
        self.web_http = self.env["ACM_WEB_HTTP"]
        self.args = args or []
        self.pre_args: list[str] = []  # before `serve`: --config FILE
        self.proc: subprocess.Popen | None = None
        self.log = Path(self.dir) / "serve.log"

    def start(self, wait: bool = True) -> Service:
        # workers=0: no --workers flag, so a config file's value applies (and reloads).
        workers = ["--workers", str(self.workers)] if self.workers else []
        cmd = [sys.executable, "-m", "acm_module.cli", *self.pre_args, "serve", *workers,
               "--store", self.store_url, "--endpoint", self.bind or self.endpoint, *self.args]
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._logf, stderr=self._logf,
                                     cwd=REPO)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        from acm_module.decide.client import Client, ServiceTimeout

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"acm serve exited {self.proc.returncode}:\n{self.read_log()}")
            if not self.endpoint.startswith("ipc://") or os.path.exists(self.endpoint[6:]):
                c = Client(self.endpoint, timeout=0.5, curve=self.curve)
                try:
                    r = c.request({"call_id": "ready-probe", "a": "x", "b": "y"})
                    if r.get("reason") == "invalid_b":
                        self._wait_mi(deadline)
                        return
                except ServiceTimeout:
                    pass
                finally:
                    c.close()
            time.sleep(0.05)
        raise RuntimeError(f"acm serve not ready in {timeout}s:\n{self.read_log()}")

    def _wait_mi(self, deadline: float) -> None:
        """Wait until the MI HTTP endpoint accepts, when it is on loopback (tests drive it)."""
        mi = self.env.get("ACM_MI_HTTP", "")
        host, _, port = mi.rpartition(":")
        if host in ("127.0.0.1", "localhost") and port.isdigit():
            wait_port(int(port), max(0.1, deadline - time.monotonic()))

    def wait_for(self, cond: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
        """Wait until cond() holds; raise with the log if the service exits or time is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"acm serve exited {self.proc.returncode}:\n{self.read_log()}")
            time.sleep(0.05)
        raise RuntimeError(f"{what or 'condition'} not met within {timeout}s:\n{self.read_log()}")

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        """Wait until the service's log holds text."""
        self.wait_for(lambda: text in self.read_log(), timeout, f"{text!r} in the log")

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        pids = []
        for x in out.stdout.split():
            try:
                with open(f"/proc/{x}/comm") as f:
                    if f.read().startswith("acm-worker"):
                        pids.append(int(x))
            except OSError:
                continue
        return sorted(pids)

    def child_pid(self, comm: str) -> int:
        """Return the pid of the supervisor's child named `comm` (e.g. "acm-control")."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True)
        for x in out.stdout.split():
            with contextlib.suppress(OSError), open(f"/proc/{x}/comm") as f:
                if f.read().strip() == comm:
                    return int(x)
        raise AssertionError(f"no {comm} process under the supervisor")

    def read_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        self._logf.close()
        return code

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_service(store_url: str, **kw: object) -> Iterator[Service]:
    """Start `acm serve`, yield it, always stop it."""
    svc = Service(store_url, **kw)  # type: ignore[arg-type]
    try:
        svc.start()
        yield svc
    finally:
        svc.cleanup()


def proc_usage(pid: int) -> dict[str, int]:
    """Return a process's threads, RSS (kB) and open descriptors, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"threads": int(status["Threads"]), "rss_kb": int(status["VmRSS"].split()[0]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class DelayProxy:
    """A TCP proxy in front of a server that can delay or black-hole traffic (fault injection)."""

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.delay = 0.0
        self.blackhole = False
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(64)
        self.port = self._lsock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        import threading

        self._lsock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                c, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), 2)
            except OSError:
                c.close()
                continue
            self._conns += [c, u]
            for src, dst in ((c, u), (u, c)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if self.blackhole:
                continue
            if self.delay:
                time.sleep(self.delay)
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._lsock.close()
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(1)


def publish_registry(url: str, doc: dict, workers: int = 2, timeout: float = 15.0) -> int:
    """Publish a carrier registry and wait until every worker reports it in use."""
    from acm_module.core import registry
    from acm_module.core import stats as stats_mod

    conn = StoreConnection(url, timeout=2.0)
    try:
        ver = registry.publish(conn, doc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snaps = stats_mod.read_all(conn)
            if len(snaps) >= workers and all(s.get("registry_version") == ver for s in snaps):
                return ver
            time.sleep(0.1)
    finally:
        conn.close()
    raise AssertionError(f"workers did not apply registry version {ver} in {timeout}s")


def free_cluster_ports(n: int) -> list[int]:
    """Return n free loopback ports below 55,536 whose cluster bus port (+10,000) is free too."""
    import random

    out: list[int] = []
    rng = random.Random()
    while len(out) < n:
        p = rng.randrange(20000, 55000)
        if p in out or p + 10000 in out:
            continue
        ok = True
        for q in (p, p + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
                    break
        if ok:
            out.append(p)
    return out


class RedisCluster:
    """A temporary Redis Cluster on loopback: `masters` masters, each with `replicas` replicas.

    Each node is Debian's redis-server with --cluster-enabled yes; the cluster is formed by
    `redis-cli --cluster create`. A low cluster-node-timeout makes a failover take about a
    second. cleanup() stops every node, also after a failed test.
    """

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.binary = shutil.which("redis-server")
        self.cli = shutil.which("redis-cli")
        if self.binary is None or self.cli is None:
            unavailable("redis-server/redis-cli are not installed (apt-get install redis-server)")
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = free_cluster_ports(masters * (1 + replicas))
        self.dir = tempfile.mkdtemp(prefix="acm-cluster-")
        self.procs: dict[int, subprocess.Popen] = {}
        self.stopped: set[int] = set()  # SIGSTOPped: alive but not answering

    def _live(self) -> list[int]:
        return [p for p, pr in self.procs.items() if pr.poll() is None and p not in self.stopped]

    def url(self, i: int = 0) -> str:
        """Return the URL of node i (any node is a valid seed)."""
        return f"redis://127.0.0.1:{self.ports[i]}/0"

    @property
    def seeds_url(self) -> str:
        """Return a URL naming every node as a seed."""
        return "redis://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + "/0"

    def start_node(self, port: int) -> None:
        assert self.binary
        d = Path(self.dir) / str(port)
        d.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(d), "--cluster-enabled", "yes",
             "--cluster-config-file", f"{d}/nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             "--cluster-replica-validity-factor", "0", "--cluster-require-full-coverage", "no",
             "--cluster-allow-reads-when-down", "no", "--repl-diskless-sync-delay", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> RedisCluster:
        try:
            for p in self.ports:
                self.start_node(p)
            for p in self.ports:
                if not wait_port(p):
                    unavailable(f"redis-server (cluster node) did not start on port {p}")
            assert self.cli
            if self.masters == 1 and self.replicas == 0:
                # redis-cli --cluster create wants 3 masters: one node takes every slot itself.
                self.redis(self.ports[0], "CLUSTER", "ADDSLOTSRANGE", "0", "16383")
                self.wait_ok()
                return self
            r = subprocess.run(
                [self.cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                unavailable(f"redis-cli --cluster create failed: {r.stdout}{r.stderr}")
            self.wait_ok()
        except BaseException:
            self.cleanup()
            raise
        return self

    def redis(self, port: int, *args: str, timeout: float = 5.0) -> str:
        """Run one redis-cli command against a node; return its output."""
        assert self.cli
        r = subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True,
                           timeout=timeout)
        return r.stdout

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node says cluster_state:ok and agrees on the masters."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = self._live()
            if all("cluster_state:ok" in self.redis(p, "CLUSTER", "INFO") for p in live) \
                    and len({self._masters_seen(p) for p in live}) == 1 \
                    and all(self._in_sync(p) for p in live):
                return
            time.sleep(0.1)
        raise AssertionError(f"cluster not ok within {timeout}s")

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Wait until every replica has every write its master has (replication is async)."""
        import re

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = True
            for p in self.master_ports():
                info = self.redis(p, "INFO", "replication")
                m = re.search(r"master_repl_offset:(\d+)", info)
                offs = [int(x) for x in re.findall(r"slave\d+:.*offset=(\d+)", info)]
                if m is None or not offs or min(offs) < int(m.group(1)):
                    done = False
            if done:
                return
            time.sleep(0.05)
        raise AssertionError(f"replicas did not catch up within {timeout}s")

    def _in_sync(self, port: int) -> bool:
        """Say whether a node is a master or a replica whose initial sync is done."""
        info = self.redis(port, "INFO", "replication")
        return "role:master" in info or "master_link_status:up" in info

    def _masters_seen(self, port: int) -> str:
        lines = self.redis(port, "CLUSTER", "NODES").splitlines()
        return ",".join(sorted(ln.split()[1].split("@")[0] for ln in lines
                               if "master" in ln.split()[2] and "fail" not in ln.split()[2]))

    def master_ports(self) -> list[int]:
        """Return the ports of the current masters (as the first live node sees them)."""
        live = self._live()[0]
        return sorted(int(m.rsplit(":", 1)[1]) for m in self._masters_seen(live).split(","))

    def stop_node(self, port: int, sig: int = signal.SIGKILL) -> None:
        pr = self.procs.get(port)
        if pr is not None and pr.poll() is None:
            pr.send_signal(sig)
            if sig == signal.SIGSTOP:
                self.stopped.add(port)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                pr.wait(5)

    def restore(self) -> None:
        """Restart every node a test stopped (it rejoins, as a replica) and wait until ok."""
        for port, pr in list(self.procs.items()):
            if pr.poll() is None and port not in self.stopped:
                continue
            if pr.poll() is None:
                pr.kill()
                pr.wait(5)
            self.stopped.discard(port)
            self.start_node(port)
            if not wait_port(port):
                raise AssertionError(f"cluster node {port} did not restart")
        self.wait_ok()

    def cleanup(self) -> None:
        for pr in self.procs.values():
            if pr.poll() is None:
                pr.send_signal(signal.SIGCONT)
                pr.kill()
                pr.wait(5)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
