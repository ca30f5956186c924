"""ClickHouse per-carrier analytics (docs/GATEWAY.md, "Where attribution is stored"):
daily_carrier_stats_mv counts each alert once, under its latest carrier, type and severity,
however often it was updated or replayed; carrier '' is an unattributed alert; a sink opened
on an existing database, also one from before the table existed, rebuilds the same numbers.

chdb keeps global state per process, so the sink runs in a child process, like `acm writer`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from acm_module.core import records as rec
from tests.support.numbers import a_num, b_num
from tests.support.pgqdb import ch_query
from tests.support.servers import REPO
from tests.support.streamrec import Record, fanout_alert, masking_alert

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

DAY1 = 1_800_532_800_000  # 2027-01-21 12:00 UTC: far from a day boundary in any time zone
DAY2 = DAY1 + 86_400_000
C1, G1, G1B = "glo-ig", "glo-lag-1", "glo-lag-2"
C2, G2 = "mtn.ng_1", "mtn-gw.2"
Key = tuple[str, str, str, str]  # (date, carrier_id, alert_type, severity)

# Open the sink on the chdb directory argv[1], write the batches of alert records read from
# stdin (JSON: a list of lists of k=a fields), print the per-carrier and daily figures.
CHILD = """
import json, sys
from acm_module.core import records as rec
from acm_module.write.clickhouse import ClickHouseSink
batches = json.load(sys.stdin)
s = ClickHouseSink(chdb_path=sys.argv[1])
s.open()
for i, batch in enumerate(batches):
    s.write([], [rec.parse_alert(f"s/{i}-{j}", f) for j, f in enumerate(batch)])
print(json.dumps({"carrier": s.daily_carrier_stats(), "daily": s.daily_stats()}))
s.close()
"""


def run_sink(path: str, batches: list[list[Record]]) -> dict[str, list[dict[str, Any]]]:
    out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True,
                         input=json.dumps([[f for _, f in b] for b in batches]), timeout=90,
                         cwd=str(REPO), env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def per_carrier(res: dict[str, list[dict[str, Any]]]) -> dict[Key, tuple[int, int]]:
    rows = {(r["date"], r["carrier_id"], r["alert_type"], r["severity"]):
            (int(r["alert_count"]), int(r["total_a_numbers"])) for r in res["carrier"]}
    assert len(rows) == len(res["carrier"])
    return rows


def expected(batches: list[list[Record]]) -> dict[Key, tuple[int, int]]:
    """The figures of the alerts written: each alert's latest version, counted once."""
    changes = [rec.parse_alert(f"x/{i}", f) for i, (_, f) in
               enumerate(r for b in batches for r in b)]
    count: Counter[Key] = Counter()
    numbers: Counter[Key] = Counter()
    for a in rec.latest_versions(changes):
        day = datetime.fromtimestamp(a.first_ms / 1000, UTC).date().isoformat()
        k = (day, a.carrier_id, rec.ALERT_TYPE_COLUMN[a.typ], a.severity)
        count[k] += 1
        numbers[k] += len(a.a_numbers)
    return {k: (count[k], numbers[k]) for k in count}


def _traffic() -> list[list[Record]]:
    """Batches as the writer hands them over: updates, replays, late older versions."""
    m1, m2, m3, m4, m5 = (str(uuid.uuid4()) for _ in range(5))
    f1, f2, f3 = (str(uuid.uuid4()) for _ in range(3))
    an = [a_num(i) for i in range(9)]
    bn = [b_num(i) for i in range(9)]
    # m1: updated three times, through two gateways of C1, escalated to CRITICAL.
    m1v = [masking_alert(m1, b_num(1), an[:5 + v], DAY1, DAY1 + v, ver=v,
                         severity="CRITICAL" if v == 4 else "HIGH", carrier=C1,
                         gateway=G1 if v < 3 else G1B) for v in range(1, 5)]
    # f1: a fan-out alert of C1 updated twice (more B-numbers, then CRITICAL).
    f1v = [fanout_alert(f1, a_num(40), bn[:3 + 2 * v], DAY1 + 20, DAY1 + 20 + v, ver=v,
                        severity="CRITICAL" if v == 3 else "HIGH", carrier=C1, gateway=G1)
           for v in range(1, 4)]
    # m3: opened through C2, its update came through C1: it counts under C1 only.
    m3v = [masking_alert(m3, b_num(3), an[:5], DAY1 + 40, DAY1 + 41, carrier=C2, gateway=G2),
           masking_alert(m3, b_num(3), an[:6], DAY1 + 40, DAY1 + 42, ver=2, carrier=C1,
                         gateway=G1)]
    return [
        [m1v[0], masking_alert(m2, b_num(2), an[:5], DAY1 + 10, DAY1 + 11, severity="LOW",
                               carrier=C1, gateway=G1), f1v[0], m3v[0]],
        [m1v[0], m1v[1], f1v[1]],  # a replay and updates
        [m1v[2], m1v[3], m3v[1]],  # two versions in one batch
        [m1v[1], f1v[2], f1v[0]],  # a late older version of each
        # C2: fan-out and masking; unattributed alerts (no cr/gw, or empty) are carrier ''.
        [fanout_alert(f2, a_num(41), bn[:4], DAY1 + 60, DAY1 + 61, carrier=C2, gateway=G2),
         masking_alert(m4, b_num(4), an[:5], DAY2, DAY2 + 1, carrier=C2, gateway=G2),
         masking_alert(m5, b_num(5), an[:7], DAY1 + 80, DAY1 + 81, attributed=False),
         fanout_alert(f3, a_num(42), bn[:5], DAY2 + 10, DAY2 + 11, severity="LOW")],
    ]


def test_carrier_stats_count_each_alert_once_per_carrier(tmp_path: Any) -> None:
    path = str(tmp_path / "chdb")
    batches = _traffic()
    want = expected(batches)
    d1, d2 = "2027-01-21", "2027-01-22"
    mask, fan = "MULTICALL_MASKING", "MULTICALL_FANOUT"
    assert want == {
        (d1, C1, mask, "CRITICAL"): (1, 9), (d1, C1, mask, "LOW"): (1, 5),
        (d1, C1, mask, "HIGH"): (1, 6), (d1, C1, fan, "CRITICAL"): (1, 1),
        (d1, C2, fan, "HIGH"): (1, 1), (d2, C2, mask, "HIGH"): (1, 5),
        (d1, "", mask, "HIGH"): (1, 7), (d2, "", fan, "LOW"): (1, 1)}
    res = run_sink(path, batches)
    assert per_carrier(res) == want
    # The same alerts as daily_stats counts them.
    by_day: Counter[tuple[str, str]] = Counter()
    for (day, _, _, sev), (n, _) in want.items():
        by_day[day, sev] += n
    assert {(r["date"], r["severity"]): int(r["alert_count"]) for r in res["daily"]} == by_day

    # Reopened: the rebuild from the current rows gives the same figures, and a replay of
    # everything adds nothing.
    assert per_carrier(run_sink(path, [])) == want
    assert per_carrier(run_sink(path, batches)) == want

    # A database from before the per-carrier table: opening creates and fills it, and the
    # view counts what comes next (an update of f2 to CRITICAL).
    ch_query(path, "DROP VIEW acm.daily_carrier_stats_mv")
    ch_query(path, "DROP TABLE acm.daily_carrier_stats")
    f2 = batches[4][0][1]["al"]
    upd = fanout_alert(f2, a_num(41), [b_num(i) for i in range(6)], DAY1 + 60, DAY1 + 62,
                       ver=2, severity="CRITICAL", carrier=C2, gateway=G2)
    got = per_carrier(run_sink(path, [[upd]]))
    assert got == expected([*batches, [upd]])
    assert (d1, C2, fan, "HIGH") not in got and got[d1, C2, fan, "CRITICAL"] == (1, 1)
    assert per_carrier(run_sink(path, [])) == got
