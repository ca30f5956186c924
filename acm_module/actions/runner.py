"""`acm actions`: act on alerts, off the hot path.

Consumes the partition streams with its own consumer group (`actions`; not under the writer's
`acm.` prefix, so `acm writer stats` does not list it as a sink) and, once per alert:

- on open: end the attack's calls that are up (`disconnect`, when `opensips_mi_url` is set and the
  live mode is `block`), give the alert its NCC incident id (`ncc`, when `ncc_reporting`), then
  notify (`notify`: the webhook when `webhook_url` is set, and always a log line);
- on escalation to a higher severity (`actions_on_escalation`): notify again.

Every action is one audit row with its outcome (see trail.py); the ledger makes a restart (or a
redelivered record) skip what is done. Alerts appended longer than `actions_max_age` ago are
recorded as `skipped` instead of acted on (a runner started on an old backlog does not page
anyone about last week).

The group starts at the beginning of the streams, and the runner acknowledges a record only once
it is older than `lookback_s`: the writer trims a stream only below what every group
acknowledged, so the decision records an alert's disconnect reads are still there when it comes.
Run one runner per deployment (or give each its own `actions_consumer`). A runner taken out of
service should have its group removed (`acm actions --destroy-group`), or the streams keep what it
never acknowledged.
"""

from __future__ import annotations

import collections
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from acm_module.actions.disconnect import (
    Disconnector,
    entry_ms,
    find_attack_calls,
    opensips_mi,
)
from acm_module.actions.notify import Webhook, log_alert
from acm_module.actions.trail import ActionAudit, Ledger, summary
from acm_module.compliance import ncc
from acm_module.core import keys
from acm_module.core import liveconfig as store_config
from acm_module.core.backoff import Backoff
from acm_module.core.errors import StoreError
from acm_module.core.pg import close_quietly
from acm_module.core.records import (
    ALERT_TYPE_COLUMN,
    AlertChange,
    RecordError,
    fields,
    parse_alert,
)
from acm_module.core.redis import LazyRedis, open_redis, read_groups
from acm_module.core.types import SEVERITIES

log = logging.getLogger("acm.actions")

GROUP = "actions"
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


@dataclass
class RunnerConfig:
    """Everything the runner needs, resolved from the settings."""

    store_url: str
    partitions: int = 16
    consumer: str = field(default_factory=socket.gethostname)
    database_url: str = ""
    opensips_mi_url: str = ""
    opensips_mi_timeout: float = 2.0
    disconnect_cause: int = 21
    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_timeout: float = 5.0
    webhook_retries: int = 5
    webhook_backoff_max: float = 30.0
    on_escalation: bool = True
    max_age_s: float = 3600.0
    ncc_reporting: bool = False
    operator_code: str = "OPR"
    report_timezone: str = "Africa/Lagos"
    batch: int = 500
    block_ms: int = 500
    lookback_s: float = 60.0

    @classmethod
    def from_settings(cls, s: Any) -> RunnerConfig:
        """Build the config from resolved settings (acm_module.core.settings.Settings or a dict)."""
        v = s if isinstance(s, dict) else s.values
        return cls(
            store_url=v["store"], partitions=v["partitions"],
            consumer=v.get("actions_consumer") or socket.gethostname(),
            database_url=v.get("database_url", ""), opensips_mi_url=v["opensips_mi_url"],
            opensips_mi_timeout=v["opensips_mi_timeout"], disconnect_cause=v["disconnect_cause"],
            webhook_url=v["webhook_url"], webhook_secret=v["webhook_secret"],
            webhook_timeout=v["webhook_timeout"], webhook_retries=v["webhook_retries"],
            webhook_backoff_max=v["webhook_backoff_max"],
            on_escalation=v["actions_on_escalation"], max_age_s=v["actions_max_age"],
            ncc_reporting=v["ncc_reporting"], operator_code=v["operator_code"],
            report_timezone=v["report_timezone"],
            lookback_s=max(60.0, 2 * float(v.get("window", 5.0)) + 30.0))


class ActionRunner:
    """The consumer loop and the per-alert actions."""

    def __init__(self, cfg: RunnerConfig, stop: threading.Event | None = None) -> None:
        if cfg.ncc_reporting:
            if not cfg.database_url:
                raise ValueError("ncc_reporting needs database_url (incident ids live in "
                                 "fraud_alerts)")
            ncc.operator(cfg.operator_code)
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.streams = keys.streams(cfg.partitions)
        # Opened on first use (the runner starts while the store is down); its timeout covers a
        # blocking read.
        self.store = LazyRedis(cfg.store_url, timeout=cfg.block_ms / 1000.0 + 5.0,
                               connect_timeout=2.0)
        self.audit = ActionAudit(self.store, cfg.partitions, cfg.database_url)
        self.ledger = Ledger(self.store)
        self.disconnector = (Disconnector(opensips_mi(cfg.opensips_mi_url,
                                                      cfg.opensips_mi_timeout),
                                          cfg.disconnect_cause)
                             if cfg.opensips_mi_url else None)
        self.webhook = (Webhook(cfg.webhook_url, cfg.webhook_secret, cfg.webhook_timeout,
                                cfg.webhook_retries, backoff_max=cfg.webhook_backoff_max,
                                stop=self.stop)
                        if cfg.webhook_url else None)
        self._db: psycopg.Connection | None = None
        self._held: collections.deque[tuple[int, str, str]] = collections.deque()
        self.handled = 0  # alert records acted on (tests and stats)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        """Consume until stop is set; return the exit code (0)."""
        log.info("actions runner %s: disconnect %s, webhook %s, ncc %s", self.cfg.consumer,
                 "on" if self.disconnector else "off", "on" if self.webhook else "off",
                 "on" if self.cfg.ncc_reporting else "off")
        backoff = Backoff(0.5, 10.0)
        replay_pending = True
        while not self.stop.is_set():
            try:
                if replay_pending:
                    self._ensure_groups()
                    self._drain_own_pending()
                    replay_pending = False
                batch = self._read(">", block=True)
                self._process(batch)
                self._ack_old()
                backoff.reset()
            except StoreError as e:
                delay = backoff.next()
                log.warning("actions: store unavailable (%s); retry in %.1fs", e, delay)
                self.store.reset()
                replay_pending = True
                self._held.clear()  # re-read as pending after reconnecting
                if self.stop.wait(delay):
                    break
        self.close()
        return 0

    def close(self) -> None:
        """Release connections (unacknowledged records stay pending for the next start)."""
        self.audit.close()
        close_quietly(self._db)
        self._db = None
        self.store.reset()

    def _ensure_groups(self) -> None:
        pipe = self.store.pipeline(transaction=False)
        for s in self.streams:
            pipe.xgroup_create(s, GROUP, "0", mkstream=True)
        for r in pipe.execute(raise_on_error=False):
            if isinstance(r, StoreError) and "BUSYGROUP" not in str(r):
                raise r

    def _drain_own_pending(self) -> None:
        """Re-handle what this consumer read but did not acknowledge before (a restart)."""
        after = {s: "0" for s in self.streams}
        while not self.stop.is_set():
            entries = self._read_ids(after)
            if not entries:
                return
            self._process(entries)
            for s, eid, _ in entries:
                after[s] = eid

    def _read(self, start: str, block: bool) -> list[tuple[str, str, dict[str, str]]]:
        return self._read_ids({s: start for s in self.streams}, block)

    def _read_ids(self, ids: dict[str, str], block: bool = False
                  ) -> list[tuple[str, str, dict[str, str]]]:
        raw = read_groups(self.store.get(), GROUP, self.cfg.consumer, ids, self.cfg.batch,
                          self.cfg.block_ms if block else None, self.stop.wait)
        out: list[tuple[str, str, dict[str, str]]] = []
        for stream, entries in raw:
            for eid, entry in entries:
                if entry is None:
                    continue  # pending entry trimmed away
                out.append((stream.decode(), eid.decode(), fields(entry)))
        return out

    def _process(self, entries: list[tuple[str, str, dict[str, str]]]) -> None:
        for stream, eid, f in entries:
            if f.get("k") == "a":
                try:
                    alert = parse_alert(f"{stream}/{eid}", f)
                except RecordError as e:
                    log.error("actions: malformed alert record %s/%s: %s", stream, eid, e)
                else:
                    self.handle(alert)
            self._held.append((entry_ms(eid), stream, eid))

    def _ack_old(self, everything: bool = False) -> None:
        limit = time.time() * 1000 - self.cfg.lookback_s * 1000
        by_stream: dict[str, list[str]] = {}
        while self._held and (everything or self._held[0][0] < limit):
            _, s, eid = self._held.popleft()
            by_stream.setdefault(s, []).append(eid)
        if by_stream:
            pipe = self.store.pipeline(transaction=False)
            for s, ids in by_stream.items():
                pipe.xack(s, GROUP, *ids)
            pipe.execute()

    # -- one alert -------------------------------------------------------------------------
    def handle(self, alert: AlertChange) -> None:
        """Run the actions an alert record calls for (each at most once). Raises StoreError."""
        prev = self.ledger.severity(alert.alert_id)
        if alert.op == "open" or prev is None:
            trigger = "open"
        elif self.cfg.on_escalation and _RANK[alert.severity] > _RANK.get(prev, 0):
            trigger = f"escalate:{alert.severity}"
        else:
            return
        if self.ledger.done(alert.alert_id, trigger, "notify") is not None:
            # The last action of this trigger is done, so all of it is (a crash may have come
            # before the severity was recorded).
            if prev is None:
                self.ledger.set_severity(alert.alert_id, alert.severity)
            return
        view = alert_view(alert)
        age_s = time.time() - entry_ms(alert.sid.rpartition("/")[2]) / 1000.0
        stale = age_s > self.cfg.max_age_s
        if trigger == "open":
            self._once(alert, trigger, "disconnect", lambda: self._disconnect(alert), stale)
            if self.cfg.ncc_reporting:
                self._once(alert, trigger, "ncc", lambda: self._ncc(alert, view), stale)
        self._once(alert, trigger, "notify", lambda: self._notify(trigger, view), stale)
        if prev is None or _RANK[alert.severity] > _RANK.get(prev, 0):
            self.ledger.set_severity(alert.alert_id, alert.severity)
        self.handled += 1

    def _once(self, alert: AlertChange, trigger: str, action: str,
              fn: Any, stale: bool) -> None:
        if self.ledger.done(alert.alert_id, trigger, action) is not None:
            return
        if stale:
            outcome, new = "skipped", {"reason": f"older than {self.cfg.max_age_s:g}s"}
        else:
            try:
                outcome, new = fn()
            except StoreError:
                raise
            except Exception as e:  # one broken action must not stop the others
                log.exception("action %s on alert %s failed", action, alert.alert_id)
                outcome, new = "failed", {"error": f"{type(e).__name__}: {e}"[:500]}
        new = {"trigger": trigger, "severity": alert.severity, "b_number": alert.b, **new}
        self.audit.record(f"action.{action}", alert.alert_id, outcome, new, summary(new))
        self.ledger.mark(alert.alert_id, trigger, action, outcome)

    def _disconnect(self, alert: AlertChange) -> tuple[str, dict[str, Any]]:
        if alert.typ != "masking":
            # A fan-out alert is a signal about one A-number for the fraud team (its calls were
            # allowed by design); there is no attack on one B-number to cut.
            return "skipped", {"reason": f"{alert.typ} alerts are not disconnected"}
        if self.disconnector is None:
            return "skipped", {"reason": "opensips_mi_url not set"}
        _, live = store_config.read(self.store)
        if (live or {}).get("mode") == "monitor":
            return "skipped", {"reason": "monitor mode"}
        calls = find_attack_calls(self.store, alert)
        res = self.disconnector.end_calls(alert.alert_id, [c.call_id for c in calls])
        return res.outcome, {"calls": len(calls), **res.to_json()}

    def _ncc(self, alert: AlertChange, view: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        for attempt in (1, 2):
            if self._db is None or self._db.closed:
                self._db = psycopg.connect(self.cfg.database_url, connect_timeout=5)
            try:
                nid, new = ncc.assign_for_change(self._db, alert, self.cfg.operator_code,
                                                 self.cfg.report_timezone)
                break
            except psycopg.OperationalError:
                close_quietly(self._db)
                self._db = None
                if attempt == 2:
                    raise
        view["ncc_incident_id"] = nid
        return "ok", {"ncc_incident_id": nid, "new": new}

    def _notify(self, trigger: str, view: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        event = "alert.opened" if trigger == "open" else "alert.escalated"
        log_alert(event, view)
        if self.webhook is None:
            return "ok", {"channels": ["log"]}
        payload = {"event": event, "event_id": f"{view['alert_id']}:{trigger}",
                   "sent_by": "acm", "alert": view}
        res = self.webhook.deliver(payload["event_id"], payload)
        return res.outcome, {"channels": ["log", "webhook"], **res.to_json()}


def alert_view(a: AlertChange) -> dict[str, Any]:
    """Return the alert as the webhook and the log line show it."""
    from acm_module.control.audit import iso_ms

    view = {"alert_id": a.alert_id, "alert_type": ALERT_TYPE_COLUMN[a.typ],
            "severity": a.severity, "b_number": a.b, "distinct": a.distinct,
            "a_numbers": list(a.a_numbers), "first_detection": iso_ms(a.first_ms),
            "last_detection": iso_ms(a.last_ms), "window_ms": a.window_ms, "version": a.ver,
            "carrier_id": a.carrier_id, "gateway_id": a.gateway_id, "ncc_incident_id": None}
    if a.typ == "fanout":
        view["b_numbers"] = list(a.b_numbers)
    return view


def destroy_group(store_url: str, partitions: int) -> int:
    """Remove the runner's group from every stream; return how many existed."""
    c = open_redis(store_url, timeout=5.0)
    try:
        pipe = c.pipeline(transaction=False)
        for s in keys.streams(partitions):
            pipe.xgroup_destroy(s, GROUP)
        return sum(int(n or 0) for n in pipe.execute())
    finally:
        c.close()


def actions_main(settings: Any) -> int:
    """Run the actions runner until SIGTERM/SIGINT (a supervisor sidecar or `acm actions`)."""
    from acm_module.core.logs import register_secret

    cfg = RunnerConfig.from_settings(settings)
    if cfg.webhook_secret:
        register_secret(cfg.webhook_secret)
    if not cfg.store_url:
        log.error("acm actions needs the store URL (DRAGONFLY_URL or --store)")
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()  # the loop notices within block_ms

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runner = ActionRunner(cfg, stop)
    except ValueError as e:
        log.error("acm actions: %s", e)
        return 2
    return runner.run()
