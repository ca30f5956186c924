"""PostgreSQL and QuestDB for the writer tests: reuse one given by URL, or start a temporary one
that a test may stop and restart (data kept) to play a sink outage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from acm_module.core import keys
from acm_module.decide.engine import hotpath
from acm_module.decide.store.cluster import StoreClient as StoreConnection
from acm_module.write.questdb import QuestDB
from acm_module.write.store import StreamStore
from acm_module.write.writer import GROUP_PREFIX, group_positions
from tests.support.numbers import a_num, b_num
from tests.support.servers import REPO, free_port, unavailable, wait_port

PG_BIN = Path(os.environ.get("ACM_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
ALL_SINKS = ["pg", "questdb", "clickhouse"]
TAP_GROUP = "test.tap"  # a group that never acks: keeps every record for the assertions
QUESTDB_JAR = Path(os.environ.get("ACM_TEST_QUESTDB_JAR", REPO / ".cache/questdb/questdb.jar"))


def _as_postgres() -> list[str]:
    """Return the command prefix that runs a PostgreSQL binary (root may not run postgres)."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        unavailable("running as root and runuser is missing: cannot start PostgreSQL")
    return [runuser, "-u", "postgres", "--"]


class PostgresServer:
    """A temporary PostgreSQL cluster (initdb + pg_ctl) on a free loopback port."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            unavailable(f"PostgreSQL server binaries not found in {PG_BIN} "
                        "(apt-get install postgresql-15)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="acm-pg-"))
        self.data = self.dir / "data"
        self.prefix = _as_postgres()
        if self.prefix:
            shutil.chown(self.dir, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        r = subprocess.run([*self.prefix, *args], capture_output=True, text=True,
                           timeout=timeout, cwd=self.dir)
        if r.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {r.stdout}\n{r.stderr}")

    def init(self) -> PostgresServer:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        return self

    def start(self) -> PostgresServer:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1"
                f" -c unix_socket_directories={self.dir} -c fsync=off"
                " -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                  "-o", opts, "-w", "-t", "30", "start")
        if not wait_port(self.port, 15):
            unavailable(f"PostgreSQL did not start on port {self.port}")
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30",
                      "stop")

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


SERVER_CONF = """\
http.net.bind.to=127.0.0.1:{http}
http.min.enabled=false
pg.net.bind.to=127.0.0.1:{pg}
line.tcp.enabled=false
line.udp.enabled=false
telemetry.enabled=false
shared.worker.count=2
"""


class QuestDBServer:
    """A temporary QuestDB (the Maven Central jar) on free loopback ports."""

    def __init__(self, jar: Path = QUESTDB_JAR) -> None:
        java = shutil.which("java")
        if java is None:
            unavailable("java is not installed (QuestDB needs Java 17+)")
        if not jar.exists():
            unavailable(f"QuestDB jar missing at {jar}: run scripts/fetch-questdb.sh")
        self.java = java
        self.jar = jar.resolve()
        self.dir = Path(tempfile.mkdtemp(prefix="acm-qdb-"))
        self.http_port = free_port()
        self.pg_port = free_port()
        (self.dir / "conf").mkdir()
        (self.dir / "conf" / "server.conf").write_text(
            SERVER_CONF.format(http=self.http_port, pg=self.pg_port))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> QuestDBServer:
        log = open(self.dir / "questdb.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [self.java, "-Xms128m", "-Xmx1g", "-XX:+UseParallelGC",
             "-p", str(self.jar), "-m", "io.questdb/io.questdb.ServerMain", "-d", str(self.dir)],
            stdout=log, stderr=log, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(
                        self.url + "/exec?" + urllib.parse.urlencode({"query": "SELECT 1"}),
                        timeout=1) as r:
                    json.load(r)
                    return self
            except OSError:
                time.sleep(0.2)
        tail = (self.dir / "questdb.log").read_text(errors="replace")[-2000:]
        self.stop()
        print(tail, file=sys.stderr)
        unavailable(f"QuestDB did not start within {timeout}s")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class WriterProcess:
    """`acm writer` as a subprocess (the way an operator runs it)."""

    def __init__(self, store_url: str, env: dict[str, str], args: list[str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="acm-writer-")
        self.log = Path(self.dir) / "writer.log"
        self.cmd = [sys.executable, "-m", "acm_module.cli", "writer", "--store", store_url,
                    *args]
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen | None = None

    def start(self) -> WriterProcess:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=f, stderr=f, cwd=REPO,
                                         start_new_session=True)
        return self

    def read_log(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:  # a crash: the writer and its per-sink children at once
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        code = self.proc.returncode
        self.proc = None
        return code


def add_tap(store_url: str, partitions: int = 16) -> None:
    """Create the never-acking tap group on every stream (so nothing is trimmed away)."""
    c = StoreConnection(store_url, timeout=5.0)
    try:
        for s in keys.streams(partitions):
            try:
                c.call("XGROUP", "CREATE", s, TAP_GROUP, "0", "MKSTREAM")
            except Exception as e:
                if "BUSYGROUP" not in str(e):
                    raise
    finally:
        c.close()


def stream_records(store_url: str, partitions: int = 16) -> list[tuple[str, str, dict[str, str]]]:
    """Return (stream, id, fields) of every record still in the partition streams."""
    c = StreamStore(store_url, timeout=30.0)
    out = []
    try:
        for s in keys.streams(partitions):
            out += [(s, eid, f) for eid, f in c.call("XRANGE", s, "-", "+")]
    finally:
        c.close()
    return out


def wait_drained(store_url: str, sinks: list[str], timeout: float = 60.0,
                 partitions: int = 16, writer: WriterProcess | None = None) -> None:
    """Wait until every sink's group has been delivered every record and acked it."""
    c = StreamStore(store_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done = True
            for s in keys.streams(partitions):
                with c.errors():
                    info = c.client.xinfo_stream(s)
                last_id = info["last-generated-id"]
                groups = group_positions(c, s)
                for sink in sinks:
                    g = groups.get(GROUP_PREFIX + sink)
                    if info["length"] and (g is None or g["pending"] or _lt(g["last_delivered"],
                                                                          last_id)):
                        done = False
            if done:
                return
            if writer is not None and not writer.alive():
                raise AssertionError(f"writer exited:\n{writer.read_log()[-3000:]}")
            if time.monotonic() > deadline:
                log = writer.read_log()[-3000:] if writer else ""
                raise AssertionError(f"sinks {sinks} not drained in {timeout}s\n{log}")
            time.sleep(0.1)
    finally:
        c.close()


def _lt(a: str, b: str) -> bool:
    pa, pb = a.split("-"), b.split("-")
    return (int(pa[0]), int(pa[1])) < (int(pb[0]), int(pb[1]))


def ch_query(chdb_path: str, sql: str) -> list[dict[str, Any]]:
    """Run one query on a chdb data directory in a child process (chdb keeps global state)."""
    code = ("import sys, chdb.session as s; x = s.Session(sys.argv[1]); "
            "r = x.query(sys.argv[2], 'JSONEachRow'); sys.stdout.write(r.bytes().decode()); "
            "x.close()")
    out = subprocess.run([sys.executable, "-c", code, chdb_path, sql], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def writer_env(database_url: str, questdb_url: str, chdb_path: str, **extra: str
               ) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "QUESTDB_URL": questdb_url,
            "ACM_CHDB_PATH": chdb_path, "ACM_WRITER_LATENCY_WAIT_MS": "1500",
            "ACM_WHITELIST_SYNC_INTERVAL": "0.5", **extra}


def synthetic(store_url: str, n: int, seed: int = 0) -> None:
    """Append n decision records and an alert change every 10 decisions, the decide.lua way:
    each alert (open, update, update) lives in its B-number's partition stream."""
    c = StoreConnection(store_url, timeout=5.0)
    try:
        cmds: list[bytes] = []
        alert: tuple[str, int, str] = ("", 0, "")
        for i in range(n):
            b = b_num(i % 97)
            ts = 1_800_200_000_000 + seed * 10_000_000 + i
            cmds.append(hotpath.encode_command(
                "XADD", keys.stream(hotpath.partition_of(b, 16)), "*", "k", "d",
                "id", f"s{seed}-{i}", "a", a_num(i % 1000), "b", b, "ts", ts, "v", "allow",
                "r", "clean", "n", "1", "al", "", "sv", "", "ip", "10.1.1.1", "tr", "t",
                "rx", ts * 1000, "md", "block"))
            if i % 10 == 9:
                if i % 30 == 9:
                    alert = (str(uuid.UUID(int=(seed << 64) + i)), 0, b)
                aid, ver, ab = alert[0], alert[1] + 1, alert[2]
                alert = (aid, ver, ab)
                cmds.append(hotpath.encode_command(
                    "XADD", keys.stream(hotpath.partition_of(ab, 16)), "*", "k", "a", "al", aid,
                    "op", "open" if ver == 1 else "update", "b", ab,
                    "sv", ["HIGH", "HIGH", "CRITICAL"][ver - 1], "n", 4 + ver,
                    "an", ",".join(a_num(j) for j in range(4 + ver)), "t0", ts - 100, "t1", ts,
                    "ver", ver, "wms", 5000, "blk", 0))
            if len(cmds) >= 1000:
                c.round_trip(b"".join(cmds), len(cmds), 10.0)
                cmds = []
        if cmds:
            c.round_trip(b"".join(cmds), len(cmds), 10.0)
    finally:
        c.close()


def qdb_count(questdb_url: str) -> int:
    q = QuestDB(questdb_url)
    try:
        return int(q.rows("SELECT count() FROM call_events")[0][0])
    except Exception:
        return 0
