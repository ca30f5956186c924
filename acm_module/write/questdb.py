"""QuestDB sink: call_events (one row per decision) and detection_metrics, over ILP/HTTP.

Tables are created up front through the HTTP /exec endpoint as WAL tables with
DEDUP UPSERT KEYS, so a re-sent batch (writer crash before XACK, retry after a timeout whose
request did land) replaces its rows instead of duplicating them.

Deviation from the seed: call_id, a_number and b_number are VARCHAR, not SYMBOL. Their
cardinality is unbounded (a new Call-ID per call) and a QuestDB symbol table never shrinks.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from questdb import QuestDBError, QuestDBServerRejectionError, Sender, TimestampMicros

from acm_module.core import stats as stats_mod
from acm_module.core.pg import close_quietly
from acm_module.core.records import FRAUD_REASONS, AlertChange, Decision
from acm_module.write.base import Sink, SinkRejected, SinkUnavailable
from acm_module.write.store import StreamStore

log = logging.getLogger("acm.persist.questdb")

LATENCY_STREAM = "{acm.lat}:s"

DDL = (
    """CREATE TABLE IF NOT EXISTS call_events (
        call_id VARCHAR, a_number VARCHAR, b_number VARCHAR, status SYMBOL, source_ip SYMBOL,
        carrier_id SYMBOL, detection_latency_us LONG, fraud_detected BOOLEAN, verdict SYMBOL,
        reason SYMBOL, distinct_count INT, alert_id VARCHAR, severity SYMBOL, trunk SYMBOL,
        mode SYMBOL, gateway_id SYMBOL, timestamp TIMESTAMP
    ) TIMESTAMP(timestamp) PARTITION BY DAY WAL DEDUP UPSERT KEYS(timestamp, call_id)""",
    """CREATE TABLE IF NOT EXISTS detection_metrics (
        metric_name SYMBOL, value DOUBLE, labels VARCHAR, timestamp TIMESTAMP
    ) TIMESTAMP(timestamp) PARTITION BY HOUR WAL DEDUP UPSERT KEYS(timestamp, metric_name)""",
    # A call_events table created before gateway attribution (the seed's has carrier_id, an
    # older one may not): add the columns, so no row depends on ILP creating them implicitly.
    "ALTER TABLE call_events ADD COLUMN IF NOT EXISTS carrier_id SYMBOL",
    "ALTER TABLE call_events ADD COLUMN IF NOT EXISTS gateway_id SYMBOL",
)


def parse_conf(questdb_url: str) -> tuple[str, str, dict[str, str]]:
    """Return (ILP client conf string, HTTP base URL for /exec, basic-auth parts).

    Accepts a client conf string (`http::addr=host:port;...`) or a URL (`http://host:port`).
    Raises ValueError for anything else (TCP ILP has no acknowledgements: not at-least-once).
    """
    if "::" in questdb_url:
        scheme, _, rest = questdb_url.partition("::")
        params = dict(p.split("=", 1) for p in rest.split(";") if "=" in p)
        conf = questdb_url if questdb_url.endswith(";") else questdb_url + ";"
    else:
        u = urllib.parse.urlparse(questdb_url)
        scheme = u.scheme
        params = {"addr": f"{u.hostname or '127.0.0.1'}:{u.port or 9000}"}
        if u.username:
            params["username"] = urllib.parse.unquote(u.username)
        if u.password:
            params["password"] = urllib.parse.unquote(u.password)
        conf = f"{scheme}::" + "".join(f"{k}={v};" for k, v in params.items())
    if scheme not in ("http", "https"):
        raise ValueError(f"QuestDB URL must use http or https (ILP over HTTP), not {scheme!r}")
    auth = {k: params[k] for k in ("username", "password") if k in params}
    return conf, f"{scheme}://{params['addr']}", auth


def literal(value: str) -> str:
    """Return value as a QuestDB SQL string literal (/exec has no bind parameters).

    Raises ValueError for a NUL character, which no literal can carry.
    """
    if "\x00" in value:
        raise ValueError("a QuestDB string literal cannot hold NUL")
    return "'" + value.replace("'", "''") + "'"


class QuestDB:
    """The HTTP SQL endpoint (/exec): DDL and the reads (reports, the episode's calls, tests)."""

    def __init__(self, base_url: str, auth: dict[str, str] | None = None,
                 timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._headers = {}
        if auth and "username" in auth:
            token = base64.b64encode(f"{auth['username']}:{auth.get('password', '')}".encode())
            self._headers["Authorization"] = "Basic " + token.decode()

    def exec(self, sql: str) -> dict[str, Any]:
        """Run one SQL statement and return QuestDB's JSON answer.

        Raises SinkUnavailable when the server cannot be reached, SinkRejected on an SQL error.
        """
        url = self.base_url + "/exec?" + urllib.parse.urlencode({"query": sql})
        req = urllib.request.Request(url, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")[:300]
            if e.code >= 500:
                raise SinkUnavailable(f"questdb /exec: HTTP {e.code}: {body}") from e
            raise SinkRejected(f"questdb /exec: HTTP {e.code}: {body}") from e
        except (OSError, ValueError) as e:
            raise SinkUnavailable(f"questdb /exec: {e}") from e

    def rows(self, sql: str) -> list[list[Any]]:
        """Return the dataset of a query."""
        return self.exec(sql).get("dataset", [])

    def wait_applied(self, tables: tuple[str, ...] = ("call_events", "detection_metrics"),
                     timeout: float = 30.0) -> bool:
        """Wait until every committed WAL transaction of the tables is visible to queries."""
        deadline = time.monotonic() + timeout
        quoted = ",".join("'%s'" % t for t in tables if t.isidentifier())
        while time.monotonic() < deadline:
            rows = self.rows("SELECT name, writerTxn, sequencerTxn, suspended FROM wal_tables() "
                             f"WHERE name IN ({quoted})")
            if all(r[1] >= r[2] and not r[3] for r in rows):
                return True
            time.sleep(0.1)
        return False


class LatencyIndex:
    """rx_us -> detection latency (us), read from the worker's capped latency stream.

    Reads forward from the last entry seen; a batch older than what is cached (a replay after
    a restart) re-seeks by entry id, which is never earlier than the batch's receive time.
    `unanswered` holds the rx of batches the worker answered store_unavailable after sending
    their scripts (field `u`): decisions the store recorded that never reached their callers.
    """

    def __init__(self, store: StreamStore, keep_s: float = 30.0) -> None:
        self.store = store
        self.keep_ms = int(keep_s * 1000)
        self.by_rx: dict[int, int] = {}
        self.unanswered: set[int] = set()
        self.last_id = ""
        self.low_ms = 1 << 62  # cached entries are complete from this entry-id time on

    def _read(self, start: str, stop_ms: int | None = None) -> None:
        while True:
            r = self.store.call("XRANGE", LATENCY_STREAM, start, "+", "COUNT", 2000)
            for eid, fields in r:
                self.last_id = eid
                for pair in fields.get("v", "").split(","):
                    rx, _, us = pair.partition(":")
                    if us:
                        self.by_rx[int(rx)] = int(us)
                self.unanswered.update(int(rx) for rx in fields.get("u", "").split(",") if rx)
            if len(r) < 2000:
                return
            start = "(" + self.last_id
            if stop_ms is not None and int(self.last_id.split("-")[0]) > stop_ms:
                return

    def lookup(self, rx_values: set[int], wait_until: float) -> dict[int, int]:
        """Return the latencies known for rx_values, waiting (until wait_until, monotonic) for
        those that may still arrive."""
        lo_ms = min(rx_values) // 1000
        if lo_ms < self.low_ms or not self.last_id:
            self.by_rx.clear()
            self.unanswered.clear()
            self._read(str(lo_ms))
            self.low_ms = lo_ms
        else:
            self._read("(" + self.last_id)
        while rx_values - self.by_rx.keys() and time.monotonic() < wait_until:
            time.sleep(0.05)
            self._read("(" + self.last_id if self.last_id else "-")
        if len(self.by_rx) > 500_000 or (self.last_id and (
                int(self.last_id.split("-")[0]) - self.low_ms > 3 * self.keep_ms)):
            cutoff = (int(self.last_id.split("-")[0]) - self.keep_ms) * 1000
            self.by_rx = {k: v for k, v in self.by_rx.items() if k >= cutoff}
            self.unanswered = {k for k in self.unanswered if k >= cutoff}
            self.low_ms = cutoff // 1000
        return {rx: self.by_rx[rx] for rx in rx_values if rx in self.by_rx}


class QuestDBSink(Sink):
    """call_events + detection_metrics in QuestDB."""

    name = "questdb"
    kinds = frozenset({"d"})

    def __init__(self, questdb_url: str, store_url: str | None = None,
                 latency_wait_ms: float = 1500.0, metrics_interval_s: float = 1.0,
                 request_timeout_ms: int = 10000) -> None:
        conf, base, auth = parse_conf(questdb_url)
        # The writer owns retries (jittered backoff, other sinks go on): the client must not
        # block for its own default 10 s retry window.
        extra = f"auto_flush=off;retry_timeout=0;request_timeout={int(request_timeout_ms)};"
        self.conf = conf + extra
        self.http = QuestDB(base, auth)
        self.store_url = store_url
        self.latency_wait_s = latency_wait_ms / 1000.0
        self.metrics_interval_s = metrics_interval_s
        self._sender: Sender | None = None
        self._store: StreamStore | None = None
        self._latency: LatencyIndex | None = None
        self._metrics_next = 0.0
        self._no_wait_until = 0.0
        self._prev_requests: tuple[float, int] | None = None

    def open(self) -> None:
        """Create the tables and the ILP sender. Raises SinkUnavailable."""
        self.close()
        for ddl in DDL:
            self.http.exec(ddl)
        try:
            sender = Sender.from_conf(self.conf)
            sender.establish()
        except QuestDBError as e:
            raise SinkUnavailable(f"questdb: {e}") from e
        self._sender = sender
        if self.store_url:
            self._store = StreamStore(self.store_url)
            self._latency = LatencyIndex(self._store)

    def _latencies(self, decisions: list[Decision]) -> tuple[dict[int, int], set[int]]:
        """Return ({rx: latency us}, {rx of batches whose callers got store_unavailable})."""
        if self._latency is None or not decisions:
            return {}, set()
        rx = {d.rx_us for d in decisions}
        # Hold a fresh batch briefly: its latency entry rides on the worker's next round trip.
        # Never for a receive time in the future (a skewed clock), and not while latency
        # entries have stopped flowing (a wait that saw none suspends waiting for a while).
        age = time.time() - max(rx) / 1e6
        now = time.monotonic()
        wait = 0.0
        if 0.0 <= age < self.latency_wait_s and now >= self._no_wait_until:
            wait = self.latency_wait_s - age
        try:
            before = self._latency.last_id
            found = self._latency.lookup(rx, now + wait)
        except Exception as e:  # latency is best effort, decisions are not
            log.warning("latency lookup failed: %s", e)
            if self._store is not None:
                self._store.close()
            return {}, set()
        if wait and len(found) < len(rx) and self._latency.last_id == before:
            self._no_wait_until = time.monotonic() + 30.0
        return found, rx & self._latency.unanswered

    def write(self, decisions: list[Decision], alerts: list[AlertChange]) -> None:
        """Send every decision as a call_events row in one HTTP request."""
        if not decisions:
            return
        if self._sender is None:
            self.open()
        sender = self._sender
        assert sender is not None
        lat, unanswered = self._latencies(decisions)
        try:
            # An explicit buffer: a failed flush leaves it to us (dropped; the batch is re-sent).
            buf = sender.new_buffer()
            for d in decisions:
                fraud = d.reason in FRAUD_REASONS
                # The caller got store_unavailable (its fail policy applied), not this verdict.
                status = ("STORE_UNAVAILABLE" if d.rx_us in unanswered else
                          "DROPPED" if d.verdict == "drop" else "ALLOWED")
                sym = {"status": status, "verdict": d.verdict, "reason": d.reason,
                       "mode": d.mode}
                if d.src_ip:
                    sym["source_ip"] = d.src_ip
                if d.trunk:
                    sym["trunk"] = d.trunk
                if d.severity:
                    sym["severity"] = d.severity
                if d.carrier_id:  # unattributed calls leave carrier and gateway null
                    sym["carrier_id"] = d.carrier_id
                if d.gateway_id:
                    sym["gateway_id"] = d.gateway_id
                cols: dict[str, Any] = {"call_id": d.call_id, "a_number": d.a,
                                        "b_number": d.b, "fraud_detected": fraud,
                                        "distinct_count": d.distinct}
                if d.alert_id:
                    cols["alert_id"] = d.alert_id
                us = lat.get(d.rx_us)
                if us is not None:
                    cols["detection_latency_us"] = us
                buf.row("call_events", symbols=sym, columns=cols,
                        at=TimestampMicros(d.ts_ms * 1000))
            sender.flush(buf)
        except QuestDBError as e:
            self._fail(e)

    def _fail(self, e: QuestDBError) -> None:
        msg = str(e)
        # A 400 from the server is about the rows; anything else is about the link or server.
        if isinstance(e, QuestDBServerRejectionError) and '"code":"invalid"' in msg.replace(
                " ", ""):
            raise SinkRejected(f"questdb: {msg[:300]}") from e
        self.close()
        raise SinkUnavailable(f"questdb: {msg[:300]}") from e

    def tick(self) -> None:
        """Once a metrics interval: write the workers' decision rate and latency percentiles."""
        now = time.monotonic()
        if self._store is None or self._sender is None or now < self._metrics_next:
            return
        self._metrics_next = now + self.metrics_interval_s
        try:
            summary = stats_mod.summarize(stats_mod.read_all(self._store.client))
            self.write_metrics(summary, time.time())
        except Exception as e:  # metrics are best effort
            log.debug("detection metrics skipped: %s", e)

    def write_metrics(self, summary: dict[str, Any], at: float) -> None:
        """Write one sample of the worker pool's summary into detection_metrics."""
        sender = self._sender
        assert sender is not None
        ts = TimestampMicros(int(at * 1e6))
        labels = json.dumps({"workers": summary["workers"]})
        buf = sender.new_buffer()
        values: dict[str, float] = {"requests_total": float(summary["requests"]),
                                    "store_failures_total": float(summary["store_failures"])}
        prev = self._prev_requests
        if prev is not None and at > prev[0]:
            values["decisions_per_s"] = max(0.0, (summary["requests"] - prev[1]) / (at - prev[0]))
        self._prev_requests = (at, summary["requests"])
        for p, v in summary["total_us"].items():
            values[f"latency_{p}_us".replace(".", "_")] = float(v)
        for name, v in values.items():
            buf.row("detection_metrics", symbols={"metric_name": name},
                    columns={"value": v, "labels": labels}, at=ts)
        sender.flush(buf)

    def close(self) -> None:
        close_quietly(self._sender)
        self._sender = None
        if self._store is not None:
            self._store.close()
            self._store = None
            self._latency = None
