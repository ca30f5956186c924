"""Writer throughput: pre-fill the partition streams with N synthetic records (decisions, plus an
alert change every 10th), then time how fast the writer drains them into each sink alone and
into all of them together.

    python benchmarks/bench_writer.py [--n 200000] [--runs pg,questdb,clickhouse,all]

Servers: redis-server, PostgreSQL 15 and QuestDB are started here (temporary, loopback) unless
ACM_TEST_REDIS_URL / ACM_TEST_DATABASE_URL / ACM_TEST_QUESTDB_URL name existing ones; ClickHouse
is chdb in a temporary directory. QuestDB needs scripts/fetch-questdb.sh first.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from acm_module.core import keys  # noqa: E402
from acm_module.decide.engine import hotpath  # noqa: E402
from acm_module.decide.store.conn import StoreConnection  # noqa: E402
from acm_module.write.clickhouse import ClickHouseSink  # noqa: E402
from acm_module.write.migrate import migrate  # noqa: E402
from acm_module.write.pg import PostgresSink  # noqa: E402
from acm_module.write.questdb import QuestDB, QuestDBSink  # noqa: E402
from acm_module.write.writer import GROUP_PREFIX, Writer, WriterConfig  # noqa: E402
from tests.support.pgqdb import PostgresServer, QuestDBServer  # noqa: E402
from tests.support.servers import RedisServer, flush  # noqa: E402

PARTITIONS = 16


def prefill(store_url: str, n: int) -> tuple[int, int]:
    """Append n decisions and n/10 alert changes; return (decisions, alert changes)."""
    c = StoreConnection(store_url, timeout=30.0)
    cmds: list[bytes] = []
    alerts = 0
    base = 1_800_000_000_000
    aid = ""
    ver = 0
    for i in range(n):
        b = f"+23480399{i % 9973:05d}"
        p = hotpath.partition_of(b, PARTITIONS)
        ts = base + i
        cmds.append(hotpath.encode_command(
            "XADD", keys.stream(p), "*", "k", "d", "id", f"bench-{i}", "a", f"+23480310{i:05d}",
            "b", b, "ts", ts, "v", "allow", "r", "clean", "n", "1", "al", "", "sv", "",
            "ip", "10.0.0.1", "tr", "trunk1", "rx", ts * 1000, "md", "block"))
        if i % 10 == 9:
            if ver == 0 or ver == 3:
                aid, ver = str(uuid.uuid4()), 0
            ver += 1
            alerts += 1
            cmds.append(hotpath.encode_command(
                "XADD", keys.stream(p), "*", "k", "a", "al", aid,
                "op", "open" if ver == 1 else "update", "b", b,
                "sv", ["HIGH", "HIGH", "CRITICAL"][ver - 1], "n", 4 + ver,
                "an", ",".join(f"+2348031{j:06d}" for j in range(4 + ver)), "t0", ts, "t1", ts,
                "ver", ver, "wms", 5000, "blk", 0))
        if len(cmds) >= 2000:
            c.round_trip(b"".join(cmds), len(cmds), 30.0)
            cmds = []
    if cmds:
        c.round_trip(b"".join(cmds), len(cmds), 30.0)
    c.close()
    return n, alerts


def drained(store: StoreConnection, groups: list[str]) -> bool:
    for s in keys.streams(PARTITIONS):
        info = store.call("XINFO", "GROUPS", s)
        for g in info or []:  # type: ignore[union-attr]
            d = {g[i].decode(): g[i + 1] for i in range(0, len(g), 2)}
            if d["name"].decode() in groups and (d["pending"] or d["lag"]):
                return False
    return True


def run(store_url: str, sinks: list, total: int, batch: int) -> float:
    """Drain the streams into `sinks`; return the seconds it took."""
    cfg = WriterConfig(store_url=store_url, partitions=PARTITIONS, consumer="bench",
                       batch=batch, trim_interval_s=3600)
    w = Writer(cfg, sinks)
    groups = [GROUP_PREFIX + s.name for s in sinks]
    store = StoreConnection(store_url, timeout=10.0)
    t0 = time.perf_counter()
    for r in w.runners:
        r.start()
    # The runners create their groups first: until then there is nothing to call drained.
    while not (_groups_exist(store, groups) and drained(store, groups)):
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    w.stop_event.set()
    for r in w.runners:
        r.thread.join(30)
    store.close()
    return elapsed


def run_cli(store_url: str, env: dict[str, str], batch: int) -> float:
    """Drain the streams with `acm writer` (a process per sink); return the seconds it took,
    process start-up included."""
    store = StoreConnection(store_url, timeout=10.0)
    groups = [GROUP_PREFIX + n for n in ("pg", "questdb", "clickhouse")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "acm_module.cli", "writer", "--store", store_url,
         "--consumer", "bench", "--batch", str(batch)],
        env={**os.environ, **env, "ACM_WHITELIST_SYNC_INTERVAL": "0",
             "ACM_LOG_LEVEL": "WARNING"}, cwd=ROOT)
    try:
        while not (_groups_exist(store, groups) and drained(store, groups)):
            if proc.poll() is not None:
                raise RuntimeError(f"acm writer exited {proc.returncode}")
            time.sleep(0.02)
        return time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        store.close()


def _groups_exist(store: StoreConnection, groups: list[str]) -> bool:
    for s in keys.streams(PARTITIONS):
        names = {(g[1].decode() if isinstance(g[1], bytes) else g[1])
                 for g in store.call("XINFO", "GROUPS", s) or []}  # type: ignore[union-attr]
        if not set(groups) <= names:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="decision records (default 200000)")
    ap.add_argument("--batch", type=int, default=5000, help="writer batch (records)")
    ap.add_argument("--runs", default="pg,questdb,clickhouse,all,all-procs",
                    help="all: one process, a thread per sink; all-procs: `acm writer`, "
                         "a process per sink")
    args = ap.parse_args(argv)
    servers: list = []
    tmp = tempfile.mkdtemp(prefix="acm-bench-")
    try:
        store_url = os.environ.get("ACM_TEST_REDIS_URL")
        if not store_url:
            r = RedisServer().start()
            servers.append(r)
            store_url = r.url
        db = os.environ.get("ACM_TEST_DATABASE_URL")
        if not db:
            pg = PostgresServer().init().start()
            servers.append(pg)
            db = pg.url
        qdb = os.environ.get("ACM_TEST_QUESTDB_URL")
        if not qdb:
            q = QuestDBServer().start()
            servers.append(q)
            qdb = q.url
        print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, "
              f"Python {platform.python_version()}, hot path {hotpath.__name__}")
        results: dict[str, float] = {}
        for name in args.runs.split(","):
            flush(store_url)
            with psycopg.connect(db, autocommit=True) as c:
                c.execute("DROP TABLE IF EXISTS fraud_alerts, whitelist, audit_log, "
                          "schema_migrations")
            migrate(db)
            QuestDB(qdb).exec("DROP TABLE IF EXISTS call_events")
            chpath = os.path.join(tmp, f"chdb-{name}")
            t = time.perf_counter()
            nd, na = prefill(store_url, args.n)
            fill = time.perf_counter() - t
            make = {"pg": lambda: PostgresSink(db),
                    "questdb": lambda: QuestDBSink(qdb, store_url=None),
                    "clickhouse": lambda path=chpath: ClickHouseSink(chdb_path=path)}
            if name == "all-procs":
                secs = run_cli(store_url, {"DATABASE_URL": db, "QUESTDB_URL": qdb,
                                           "ACM_CHDB_PATH": chpath}, args.batch)
            else:
                names = list(make) if name == "all" else [name]
                secs = run(store_url, [make[n]() for n in names], nd + na, args.batch)
            rate = (nd + na) / secs
            results[name] = rate
            rows = nd if name == "questdb" else (nd + 2 * na if name.startswith("all") else na)
            print(f"{name:>10}: {nd + na} records ({nd} decisions, {na} alert changes) in "
                  f"{secs:.2f}s = {rate:,.0f} records/s, {rows / secs:,.0f} rows/s "
                  f"(prefill {fill:.1f}s)", flush=True)
            if name in ("questdb", "all", "all-procs"):
                QuestDB(qdb).wait_applied(("call_events",), 120)
                cnt = QuestDB(qdb).rows("SELECT count() FROM call_events")[0][0]
                assert cnt == nd, f"call_events {cnt} != {nd}"
        return 0
    finally:
        for s in reversed(servers):
            s.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    threading.excepthook = lambda a: print("thread error:", a.exc_value, file=sys.stderr)
    sys.exit(main())
