"""Render the daily report: JSON (everything), CSV (the alerts, and the summary figures), a
one-page HTML report with an inline SVG chart of the day (alerts per hour by severity) and the
same report as a PDF document for the regulator (fpdf2, core fonts: no system packages).

Files, in the output directory, for day D:
  acm-daily-D.json          the statistics and every alert (stats.DailyStats)
  acm-daily-D-alerts.csv    one row per alert: NCC incident id, times, severity, numbers, state
  acm-daily-D-summary.csv   metric,value rows of the headline figures
  acm-daily-D-carriers.csv  one row per carrier: calls decided, dropped by reason, alerts by
                            type and severity, distinct A-numbers (carrier "" = unattributed)
  acm-daily-D.html          the one-page report
  acm-daily-D.pdf           the same report as an A4 document (figures, tables, chart)
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import unicodedata
from collections.abc import Callable, Collection
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


def headline_rows(s: DailyStats) -> list[tuple[str, Any]]:
    """Return the report's headline figures as (label, value) rows (HTML and PDF)."""
    ttr = s.time_to_resolve_s
    return [("Alerts", s.alerts_total)] + [
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


def action_rows(s: DailyStats) -> list[tuple[str, Any]]:
    """Return the actions taken as ("action: outcome", count) rows."""
    return [(f"{a}: {o}", n) for a, outs in sorted(s.actions.items())
            for o, n in sorted(outs.items())] or [("none", 0)]


def carrier_headings() -> list[str]:
    """Return the headings of the report's per-carrier table (carrier_cells order)."""
    return ["Carrier", "Calls decided", "Dropped",
            *(f"dropped: {r.replace('_', ' ')}" for r in DROP_REASONS),
            *(f"{TYPE_NAMES.get(t, t)} alerts (LOW/HIGH/CRIT)" for t in ALERT_TYPES),
            "A-numbers in alerts"]


def to_html(s: DailyStats) -> str:
    """Return the one-page HTML report."""
    e = html.escape

    def kv(rows: list[tuple[str, Any]]) -> str:
        return "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in rows)

    headline = headline_rows(s)
    actions = action_rows(s)
    carrier_head = "".join(f"<th>{e(h)}</th>" for h in carrier_headings())
    carrier_rows = "".join(
        "<tr>" + "".join(f"<td>{e(x)}</td>" for x in carrier_cells(c)) + "</tr>"
        for c in s.carriers) or (
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


def carrier_cells(c: dict[str, Any]) -> list[str]:
    """Return a carrier's table cells (alerts of a type as total (LOW/HIGH/CRITICAL))."""
    cells = carrier_values(c)
    name = c["carrier_id"] or UNATTRIBUTED
    n_calls = 3 + len(DROP_REASONS)
    calls = [str(v) if v != "" else "n/a" for v in cells[1:n_calls]]
    types = []
    for t in ALERT_TYPES:
        sev = c["alerts_by_type_severity"].get(t, {})
        types.append(f"{c['alerts_by_type'].get(t, 0)} "
                     f"({'/'.join(str(sev.get(v, 0)) for v in SEVERITIES)})")
    return [name, *calls, *types, str(c["distinct_a_numbers"])]


def _latin1(text: Any) -> str:
    """Return text the PDF core fonts can show: Latin-1 kept, other letters without their
    accents when that makes them Latin-1 (Ł -> L), anything else as "?"."""
    out = []
    for ch in str(text):
        if ord(ch) < 256:
            out.append(ch)
            continue
        base = unicodedata.normalize("NFKD", ch).encode("latin-1", "ignore").decode("latin-1")
        out.append(base if base.strip() else "?")
    return "".join(out)


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def to_pdf(s: DailyStats) -> bytes:
    """Return the report as an A4 PDF: title, headline figures, actions, alerts by severity,
    a bar chart of alerts per hour, the per-carrier table and the first alerts."""
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_margins(12, 12, 12)
    pdf.set_auto_page_break(True, margin=12)
    pdf.set_title(_latin1(f"Call masking daily report {s.date}"))
    pdf.set_creator("acm")
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def line(text: Any, size: float = 9, style: str = "", h: float = 5) -> None:
        pdf.set_font("Helvetica", style, size)
        pdf.multi_cell(width, h, _latin1(text), new_x="LMARGIN", new_y="NEXT")

    def heading(text: str) -> None:
        pdf.ln(2)
        line(text, 11, "B", 6)

    def table(head: list[str], rows: list[list[Any]], widths: list[float],
              size: float = 8) -> None:
        pdf.set_font("Helvetica", "", size)
        with pdf.table(width=sum(widths), col_widths=widths, align="LEFT", line_height=4,
                       padding=0.8, text_align="LEFT", repeat_headings=1,
                       headings_style=FontFace(emphasis="BOLD", fill_color=(235, 235, 235))
                       ) as tbl:
            for row in [head, *rows]:
                cells = tbl.row()
                for text in row:
                    cells.cell(_latin1(text))

    line("Call masking (CLI spoofing) daily report - " + s.date, 15, "B", 8)
    line(f"Operator {s.operator_code or '-'} - day in {s.timezone} ({s.period_start} to "
         f"{s.period_end}) - generated {s.generated_at} - calls dropped from "
         f"{s.calls_dropped_source}", 8)
    heading("The day")
    table(["Figure", "Value"], [[k, v] for k, v in headline_rows(s)], [80, 40])
    heading("Actions taken")
    table(["Action: outcome", "Count"], [[k, v] for k, v in action_rows(s)], [80, 40])
    heading("Alerts by severity")
    sev_types = [[v, s.alerts_by_severity.get(v, 0),
                  *(sum(c["alerts_by_type_severity"].get(t, {}).get(v, 0) for c in s.carriers)
                    for t in ALERT_TYPES)] for v in SEVERITIES]
    table(["Severity", "Alerts", *(f"{TYPE_NAMES.get(t, t)}" for t in ALERT_TYPES)],
          sev_types, [30, 25, *([25] * len(ALERT_TYPES))])
    heading("Alerts per hour by severity")
    _pdf_chart(pdf, s.alerts_per_hour, width, 50)
    heading("Per carrier")
    head = carrier_headings()
    n_other = len(head) - 1
    table(head, [carrier_cells(c) for c in s.carriers] or [["none"] + [""] * n_other],
          [width - 16 * n_other] + [16] * n_other, size=6.5)
    top = s.alerts[:30]
    heading("Alerts")
    table(["NCC incident", "Detected (UTC)", "Type", "Severity", "B-number (fan-out: A)",
           "A-numbers", "Carrier", "Status"],
          [[a["ncc_incident_id"] or "-", a["detected_at"] or "", a["type"], a["severity"],
            a["b_number"] or a["a_number"] or "", a["a_number_count"], a["carrier_id"] or "-",
            a["status"]] for a in top], [34, 37, 14, 16, 30, 17, 22, 16], size=7)
    if len(s.alerts) > len(top):
        line(f"{len(s.alerts) - len(top)} more alert(s) in the CSV.", 8)
    return bytes(pdf.output())


def _pdf_chart(pdf: Any, per_hour: list[dict[str, int]], width: float, height: float) -> None:
    """Draw the stacked bars of alerts per local hour by severity (as chart_svg) at the cursor."""
    left, bottom = 10.0, 10.0
    x0, y0 = pdf.l_margin + left, pdf.get_y()
    plot_w, plot_h = width - left, height - bottom
    peak = max([sum(h[v] for v in SEVERITIES) for h in per_hour] + [1])
    step = max(1, -(-peak // 5))
    ymax = step * -(-peak // step)
    bw = plot_w / 24
    pdf.set_font("Helvetica", "", 6)
    pdf.set_draw_color(221, 221, 221)
    for v in range(0, ymax + 1, step):
        y = y0 + plot_h - plot_h * v / ymax
        pdf.line(x0, y, x0 + plot_w, y)
        pdf.text(x0 - 1 - pdf.get_string_width(str(v)), y + 1, str(v))
    for h in per_hour:
        x = x0 + h["hour"] * bw
        y = y0 + plot_h
        for v in SEVERITIES:
            if h[v]:
                bh = plot_h * h[v] / ymax
                y -= bh
                pdf.set_fill_color(*_rgb(COLOURS[v]))
                pdf.rect(x + 0.5, y, bw - 1, bh, style="F")
        if h["hour"] % 3 == 0:
            pdf.text(x + bw / 2 - 1.5, y0 + plot_h + 3.5, f"{h['hour']:02d}")
    pdf.set_draw_color(51, 51, 51)
    pdf.line(x0, y0 + plot_h, x0 + plot_w, y0 + plot_h)
    lx = x0
    for v in SEVERITIES:
        pdf.set_fill_color(*_rgb(COLOURS[v]))
        pdf.rect(lx, y0 + height - 4, 3, 3, style="F")
        pdf.text(lx + 4, y0 + height - 1.5, v)
        lx += 25
    pdf.set_draw_color(0, 0, 0)
    pdf.set_y(y0 + height + 1)


def _dur(seconds: Any) -> str:
    s = int(seconds or 0)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write(s: DailyStats, out_dir: str | Path,
          kinds: Collection[str] | None = None) -> dict[str, Path]:
    """Write the report files of kinds (default every one; atomically: temp file + rename);
    return {kind: path}."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    base = f"acm-daily-{s.date}"
    render: dict[str, tuple[str, Callable[[DailyStats], str | bytes]]] = {
        "json": (".json", to_json), "alerts_csv": ("-alerts.csv", alerts_csv),
        "summary_csv": ("-summary.csv", summary_csv),
        "carriers_csv": ("-carriers.csv", carriers_csv), "html": (".html", to_html),
        "pdf": (".pdf", to_pdf)}
    files = {}
    for kind, (suffix, fn) in render.items():
        if kinds is not None and kind not in kinds:
            continue
        path = d / f"{base}{suffix}"
        data = fn(s)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.replace(tmp, path)
        files[kind] = path
    return files
