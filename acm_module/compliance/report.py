"""Render the daily report: JSON (everything), CSV (the alerts, and the summary figures) and a
one-page HTML report with an inline SVG chart of the day (alerts per hour by severity).

Files, in the output directory, for day D:
  acm-daily-D.json          the statistics and every alert (stats.DailyStats)
  acm-daily-D-alerts.csv    one row per alert: NCC incident id, times, severity, numbers, state
  acm-daily-D-summary.csv   metric,value rows of the headline figures
  acm-daily-D-carriers.csv  one row per carrier: calls decided, dropped by reason, alerts by
                            type and severity, distinct A-numbers (carrier "" = unattributed)
  acm-daily-D.html          the one-page report (print it to PDF from a browser if needed)
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from acm_module.compliance.stats import (
    ALERT_TYPES,
    DROP_REASONS,
    SEVERITIES,
    DailyStats,
)

ALERT_COLUMNS = ("ncc_incident_id", "alert_id", "detected_at", "last_detected_at", "severity",
                 "b_number", "a_number_count", "distinct_count", "status", "assigned_to",
                 "resolved_at", "time_to_resolve_s", "type", "carrier_id", "gateway_id",
                 "a_number")
UNATTRIBUTED = "(unattributed)"  # how the report names carrier "" (no registered gateway)
TYPE_NAMES = {"masking": "Masking", "fanout": "Fan-out"}
COLOURS = {"LOW": "#f2c14e", "HIGH": "#f78154", "CRITICAL": "#b0413e"}


def summary_rows(s: DailyStats) -> list[tuple[str, Any]]:
    """Return the headline figures as (metric, value) rows."""
    rows: list[tuple[str, Any]] = [("date", s.date), ("timezone", s.timezone),
                                   ("operator_code", s.operator_code),
                                   ("alerts_total", s.alerts_total)]
    rows += [(f"alerts_{k.lower()}", v) for k, v in s.alerts_by_severity.items()]
    rows += [(f"status_{k.lower()}", v) for k, v in s.alerts_by_status.items()]
    rows += [(f"alerts_type_{k}", v) for k, v in s.alerts_by_type.items()]
    rows += [("distinct_a_numbers", s.distinct_a_numbers),
             ("distinct_b_numbers", s.distinct_b_numbers),
             ("calls_dropped", "" if s.calls_dropped is None else s.calls_dropped),
             ("calls_store_unavailable",
              "" if s.calls_store_unavailable is None else s.calls_store_unavailable),
             ("calls_disconnected", s.calls_disconnected)]
    for action, outcomes in sorted(s.actions.items()):
        rows += [(f"action_{action}_{o}", n) for o, n in sorted(outcomes.items())]
    rows += [(f"time_to_resolve_{k}_s", "" if v is None else v)
             for k, v in s.time_to_resolve_s.items()]
    return rows


def to_json(s: DailyStats) -> str:
    return json.dumps(s.to_json(), indent=2, sort_keys=False) + "\n"


def alerts_csv(s: DailyStats) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(ALERT_COLUMNS)
    for a in s.alerts:
        w.writerow(["" if a.get(c) is None else a[c] for c in ALERT_COLUMNS])
    return buf.getvalue()


def carrier_columns() -> list[str]:
    """Return the carriers CSV header: the flattened keys of a stats carrier row."""
    return (["carrier_id", "calls_decided", "calls_dropped"]
            + [f"dropped_{r}" for r in DROP_REASONS] + ["alerts_total"]
            + [f"alerts_{t}" for t in ALERT_TYPES]
            + [f"alerts_{t}_{v.lower()}" for t in ALERT_TYPES for v in SEVERITIES]
            + ["distinct_a_numbers", "calls_store_unavailable"])


def carrier_values(c: dict[str, Any]) -> list[Any]:
    """Return a carrier row's values in carrier_columns() order ("" for unknown call counts)."""
    def opt(v: Any) -> Any:
        return "" if v is None else v

    dropped = c["calls_dropped_by_reason"]
    known = c["calls_decided"] is not None
    return ([c["carrier_id"], opt(c["calls_decided"]), opt(c["calls_dropped"])]
            + [dropped.get(r, 0) if known else "" for r in DROP_REASONS] + [c["alerts_total"]]
            + [c["alerts_by_type"].get(t, 0) for t in ALERT_TYPES]
            + [c["alerts_by_type_severity"].get(t, {}).get(v, 0)
               for t in ALERT_TYPES for v in SEVERITIES]
            + [c["distinct_a_numbers"], opt(c.get("calls_store_unavailable"))])


def carriers_csv(s: DailyStats) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(carrier_columns())
    w.writerows(carrier_values(c) for c in s.carriers)
    return buf.getvalue()


def summary_csv(s: DailyStats) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("metric", "value"))
    w.writerows(summary_rows(s))
    return buf.getvalue()


def chart_svg(per_hour: list[dict[str, int]], width: int = 720, height: int = 220) -> str:
    """Return an SVG stacked bar chart of alerts per local hour by severity."""
    left, bottom, top, right = 36, 28, 12, 8
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([sum(h[s] for s in SEVERITIES) for h in per_hour] + [1])
    step = max(1, -(-peak // 5))
    ymax = step * -(-peak // step)
    bw = plot_w / 24
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="Alerts per hour by '
             f'severity" font-family="sans-serif" font-size="10">']
    for v in range(0, ymax + 1, step):
        y = top + plot_h - plot_h * v / ymax
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#ddd"/><text x="{left - 4}" y="{y + 3:.1f}" '
                     f'text-anchor="end">{v}</text>')
    for h in per_hour:
        x = left + h["hour"] * bw
        y = top + plot_h
        for sev in SEVERITIES:
            n = h[sev]
            if not n:
                continue
            bh = plot_h * n / ymax
            y -= bh
            parts.append(f'<rect x="{x + 2:.1f}" y="{y:.1f}" width="{bw - 4:.1f}" '
                         f'height="{bh:.1f}" fill="{COLOURS[sev]}"><title>{h["hour"]:02d}:00 '
                         f'{sev}: {n}</title></rect>')
        if h["hour"] % 3 == 0:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{height - bottom + 14}" '
                         f'text-anchor="middle">{h["hour"]:02d}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" '
                 f'y2="{top + plot_h}" stroke="#333"/>')
    lx = left
    for sev in SEVERITIES:
        parts.append(f'<rect x="{lx}" y="{height - 10}" width="10" height="8" '
                     f'fill="{COLOURS[sev]}"/><text x="{lx + 14}" y="{height - 3}">{sev}</text>')
        lx += 90
    parts.append("</svg>")
    return "".join(parts)


def to_html(s: DailyStats) -> str:
    """Return the one-page HTML report."""
    e = html.escape

    def kv(rows: list[tuple[str, Any]]) -> str:
        return "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in rows)

    ttr = s.time_to_resolve_s
    headline = [("Alerts", s.alerts_total)] + [
        (f"{k.title()} severity", v) for k, v in s.alerts_by_severity.items()] + [
        (f"{TYPE_NAMES.get(k, k)} alerts", v) for k, v in s.alerts_by_type.items()] + [
        ("Distinct A-numbers involved", s.distinct_a_numbers),
        ("B-numbers attacked", s.distinct_b_numbers),
        ("Calls dropped", "n/a" if s.calls_dropped is None else s.calls_dropped),
        ("Calls not checked (store unavailable)",
         "n/a" if s.calls_store_unavailable is None else s.calls_store_unavailable),
        ("Calls disconnected", s.calls_disconnected),
        ("Resolved / false positive", f"{s.alerts_by_status.get('RESOLVED', 0)} / "
                                      f"{s.alerts_by_status.get('FALSE_POSITIVE', 0)}"),
        ("Time to resolve (median / max)",
         "n/a" if not ttr["count"] else f"{_dur(ttr['median'])} / {_dur(ttr['max'])}")]
    actions = [(f"{a}: {o}", n) for a, outs in sorted(s.actions.items())
               for o, n in sorted(outs.items())] or [("none", 0)]
    carrier_head = "".join(f"<th>{e(h)}</th>" for h in (
        "Carrier", "Calls decided", "Dropped",
        *(f"dropped: {r.replace('_', ' ')}" for r in DROP_REASONS),
        *(f"{TYPE_NAMES.get(t, t)} alerts (LOW/HIGH/CRIT)" for t in ALERT_TYPES),
        "A-numbers in alerts"))
    carrier_rows = "".join(_carrier_tr(c) for c in s.carriers) or (
        f"<tr><td colspan='{len(DROP_REASONS) + 6}'>none</td></tr>")
    top = s.alerts[:40]
    alert_rows = "".join(
        f"<tr><td>{e(a['ncc_incident_id'] or '-')}</td><td>{e(a['detected_at'] or '')}</td>"
        f"<td>{e(a['type'])}</td><td class='{e(a['severity'])}'>{e(a['severity'])}</td>"
        f"<td>{e(a['b_number'] or a['a_number'] or '')}</td><td>{a['a_number_count']}</td>"
        f"<td>{e(a['carrier_id'] or '-')}</td><td>{e(a['status'])}</td></tr>" for a in top)
    more = (f"<p class='note'>{len(s.alerts) - len(top)} more alert(s) in the CSV.</p>"
            if len(s.alerts) > len(top) else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Call masking daily report {e(s.date)}</title>
<style>
@page {{ size: A4; margin: 12mm; }}
body {{ font-family: sans-serif; font-size: 11px; color: #222; max-width: 190mm; margin: auto; }}
h1 {{ font-size: 17px; margin: 0 0 2px; }} h2 {{ font-size: 13px; margin: 10px 0 4px; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 2px 6px; text-align: left; }}
.kv th {{ font-weight: normal; color: #555; }} .kv td {{ font-weight: bold; }}
.alerts td, .alerts th {{ border-bottom: 1px solid #ddd; }}
.cols {{ display: flex; gap: 24px; }} .note {{ color: #666; }}
.CRITICAL {{ color: #b0413e; font-weight: bold; }} .HIGH {{ color: #c4532f; }}
</style></head><body>
<h1>Call masking (CLI spoofing) daily report &mdash; {e(s.date)}</h1>
<p class="note">Operator {e(s.operator_code or '-')} &middot; day in {e(s.timezone)}
({e(s.period_start)} to {e(s.period_end)}) &middot; generated {e(s.generated_at)}
&middot; calls dropped from {e(s.calls_dropped_source)}</p>
<div class="cols"><div><h2>The day</h2><table class="kv">{kv(headline)}</table></div>
<div><h2>Actions taken</h2><table class="kv">{kv(actions)}</table></div></div>
<h2>Alerts per hour by severity</h2>
{chart_svg(s.alerts_per_hour)}
<h2>Per carrier</h2>
<table class="alerts carriers"><tr>{carrier_head}</tr>{carrier_rows}</table>
<h2>Alerts</h2>
<table class="alerts"><tr><th>NCC incident</th><th>Detected (UTC)</th><th>Type</th>
<th>Severity</th><th>B-number (fan-out: A-number)</th><th>A-numbers</th><th>Carrier</th>
<th>Status</th></tr>{alert_rows}</table>{more}
</body></html>
"""


def _carrier_tr(c: dict[str, Any]) -> str:
    """Return a carrier's HTML table row (alerts of a type as total (LOW/HIGH/CRITICAL))."""
    cells = carrier_values(c)
    name = c["carrier_id"] or UNATTRIBUTED
    n_calls = 3 + len(DROP_REASONS)
    calls = [str(v) if v != "" else "n/a" for v in cells[1:n_calls]]
    types = []
    for t in ALERT_TYPES:
        sev = c["alerts_by_type_severity"].get(t, {})
        types.append(f"{c['alerts_by_type'].get(t, 0)} "
                     f"({'/'.join(str(sev.get(v, 0)) for v in SEVERITIES)})")
    return ("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (
        name, *calls, *types, c["distinct_a_numbers"])) + "</tr>")


def _dur(seconds: Any) -> str:
    s = int(seconds or 0)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write(s: DailyStats, out_dir: str | Path) -> dict[str, Path]:
    """Write every report file (atomically: temp file + rename); return {kind: path}."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    base = f"acm-daily-{s.date}"
    files = {"json": (d / f"{base}.json", to_json(s)),
             "alerts_csv": (d / f"{base}-alerts.csv", alerts_csv(s)),
             "summary_csv": (d / f"{base}-summary.csv", summary_csv(s)),
             "carriers_csv": (d / f"{base}-carriers.csv", carriers_csv(s)),
             "html": (d / f"{base}.html", to_html(s))}
    for path, text in files.values():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return {k: p for k, (p, _) in files.items()}
