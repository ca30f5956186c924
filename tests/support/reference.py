"""A straightforward in-memory model of the decision contract: the oracle for replay tests.

Written from the contract's rules, not from the Lua script, so the two can disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from acm_module.decide.engine.hotpath_py import normalise, severity_of


@dataclass
class Alert:
    b: str
    first_ms: int
    last_ms: int
    max_distinct: int
    a_numbers: set[str] = field(default_factory=set)

    @property
    def severity(self) -> str:
        return severity_of(self.max_distinct)


@dataclass
class Reference:
    threshold: int = 5
    window: float = 5.0
    mode: str = "block"
    block_ttl: float = 0.0
    whitelist: set[str] = field(default_factory=set)
    latest: dict[str, dict[str, int]] = field(default_factory=dict)  # b -> a -> latest ts_ms
    replies: dict[str, dict] = field(default_factory=dict)  # call_id -> reply
    alerts: list[Alert] = field(default_factory=list)
    open_alert: dict[str, int] = field(default_factory=dict)  # b -> index in alerts
    # a -> (expiry_ms, alert index, severity when blocked)
    blocked: dict[str, tuple[int, int, str]] = field(default_factory=dict)

    def decide(self, call_id: str, a_raw: str, b_raw: str, ts: float) -> dict:
        b = normalise(b_raw)
        a = normalise(a_raw)
        if b is None:
            return {"verdict": "allow", "reason": "invalid_b", "distinct": 0}
        if a is None:
            return {"verdict": "allow", "reason": "unverifiable_cli", "distinct": 0}
        if call_id in self.replies:
            return self.replies[call_id]
        ts_ms = math.floor(ts * 1000.0)
        win = round(self.window * 1000)
        reply: dict
        if b in self.whitelist:
            reply = {"verdict": "allow", "reason": "whitelisted", "distinct": 0}
        elif a in self.blocked and self.blocked[a][0] > ts_ms:
            _, idx, sev = self.blocked[a]
            reply = {"verdict": "drop", "reason": "blocked", "distinct": 0,
                     "alert_id": idx, "severity": sev}
        else:
            seen = self.latest.setdefault(b, {})
            seen[a] = max(seen.get(a, ts_ms), ts_ms)
            in_window = {x for x, t in seen.items() if t >= ts_ms - win}
            distinct = len(in_window)
            if distinct >= self.threshold:
                idx = self.open_alert.get(b)
                if idx is None or self.alerts[idx].last_ms < ts_ms - win:
                    self.alerts.append(Alert(b, ts_ms, ts_ms, distinct))
                    idx = len(self.alerts) - 1
                    self.open_alert[b] = idx
                al = self.alerts[idx]
                al.last_ms = max(al.last_ms, ts_ms)
                al.max_distinct = max(al.max_distinct, distinct)
                al.a_numbers |= in_window
                if self.block_ttl > 0:
                    for x in in_window:
                        exp = ts_ms + round(self.block_ttl * 1000)
                        if exp > self.blocked.get(x, (0, 0, ""))[0]:
                            self.blocked[x] = (exp, idx, al.severity)
                reply = {"verdict": "drop", "reason": "masking", "distinct": distinct,
                         "alert_id": idx, "severity": al.severity}
            else:
                reply = {"verdict": "allow", "reason": "clean", "distinct": distinct}
        if self.mode == "monitor":
            reply = {**reply, "verdict": "allow"}
        self.replies[call_id] = reply
        return reply


def mismatches(ref: Reference, events: list[tuple[str, str, str, float]],
               decide: Callable[[int, str, str, str, float], dict],
               undecided: Callable[[dict], bool] | None = None) -> list[tuple]:
    """Send every event through decide(k, call_id, a, b, ts) and the reference; return the
    events whose replies differ (alert ids compared by the order of their first reply).

    A reply undecided(reply) says was never decided (an error the contract allows) is not
    compared and not given to the reference either."""
    alert_index: dict[str, int] = {}
    out = []
    for k, (call_id, a, b, ts) in enumerate(events):
        got = decide(k, call_id, a, b, ts)
        if undecided is not None and undecided(got):
            continue
        want = ref.decide(call_id, a, b, ts)
        if "alert_id" in got:
            got = {**got, "alert_id": alert_index.setdefault(got["alert_id"], len(alert_index))}
        if got != want:
            out.append((k, call_id, a, b, ts, got, want))
    return out
