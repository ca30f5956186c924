"""Charts of the console drawn on the server as inline SVG (no script, no CDN).

The daily figures reuse the report's chart (acm_module.compliance.report.chart_svg); this module
adds the episode timeline and a small bar chart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True)
class Call:
    """One call of an episode as the timeline draws it."""

    ts_ms: int
    a: str
    verdict: str  # allow | drop
    reason: str = ""


def _nice_step(span_ms: float, ticks: int = 6) -> int:
    """Return a tick step (ms) of 1, 2 or 5 times a power of ten giving about `ticks` ticks."""
    raw = max(span_ms / ticks, 1.0)
    mag = 10 ** (len(str(int(raw))) - 1)
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return int(m * mag)
    return int(10 * mag)


def _seconds(ms: int) -> str:
    return f"{ms / 1000:g} s" if ms % 1000 else f"{ms // 1000} s"


def timeline_svg(calls: Sequence[Call], *, window_ms: int = 0,
                 first_detection_ms: int | None = None, width: int = 760, lane_h: int = 22,
                 max_lanes: int = 40) -> str:
    """Return the timeline of an episode: one lane per A-number, one dot per call.

    The x axis is seconds since the first call; a red dot is a dropped call. The shaded band is
    the detection window that ended at the first detection (clipped to the calls shown). Lanes
    beyond `max_lanes` are folded into one "others" lane so a large attack stays readable.
    """
    calls = sorted(calls, key=lambda c: c.ts_ms)
    if not calls:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} 40" role="img" '
                'aria-label="No calls"><text x="8" y="24">No calls recorded for this episode'
                '</text></svg>')
    order: dict[str, int] = {}
    for c in calls:
        order.setdefault(c.a, len(order))
    folded = len(order) > max_lanes
    lanes = max_lanes + 1 if folded else len(order)

    def lane(a: str) -> int:
        i = order[a]
        return max_lanes if folded and i >= max_lanes else i

    label_w, right, top, bottom = 132, 14, 10, 34
    t0 = calls[0].ts_ms
    span = max(calls[-1].ts_ms - t0, 1000)
    pad = span * 0.04  # keeps the first and last dots off the edges
    plot_w = width - label_w - right
    height = top + lanes * lane_h + bottom

    def x(ts: float) -> float:
        ts = min(max(ts, t0 - pad), t0 + span + pad)
        return label_w + plot_w * (ts - t0 + pad) / (span + 2 * pad)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="Timeline of {len(calls)} calls from {len(order)} '
           f'A-numbers" class="timeline">']
    if window_ms and first_detection_ms is not None:
        x1, x2 = x(first_detection_ms - window_ms), x(first_detection_ms)
        out.append(f'<rect class="window" x="{x1:.1f}" y="{top}" width="{max(x2 - x1, 1):.1f}" '
                   f'height="{lanes * lane_h}"><title>detection window '
                   f'({_seconds(window_ms)})</title></rect>')
    step = _nice_step(span)
    for k in range(0, span + 1, step):
        gx = x(t0 + k)
        out.append(f'<line class="grid" x1="{gx:.1f}" x2="{gx:.1f}" y1="{top}" '
                   f'y2="{top + lanes * lane_h}"/><text x="{gx:.1f}" '
                   f'y="{top + lanes * lane_h + 14}" text-anchor="middle">{_seconds(k)}</text>')
    names = list(order)[:max_lanes] + (["others"] if folded else [])
    for i, name in enumerate(names):
        y = top + i * lane_h + lane_h / 2
        out.append(f'<line class="lane" x1="{label_w}" x2="{width - right}" y1="{y:.1f}" '
                   f'y2="{y:.1f}"/><text x="{label_w - 6}" y="{y + 4:.1f}" text-anchor="end" '
                   f'class="mono">{escape(name)}</text>')
    for c in calls:
        y = top + lane(c.a) * lane_h + lane_h / 2
        cls = "dot-drop" if c.verdict == "drop" else "dot-allow"
        tip = f"{c.a} at +{(c.ts_ms - t0) / 1000:.3f} s: {c.verdict}"
        if c.reason:
            tip += f" ({c.reason})"
        out.append(f'<circle class="{cls}" cx="{x(c.ts_ms):.1f}" cy="{y:.1f}" r="5">'
                   f'<title>{escape(tip)}</title></circle>')
    axis_y = top + lanes * lane_h
    out.append(f'<line class="axis" x1="{label_w}" x2="{width - right}" y1="{axis_y}" '
               f'y2="{axis_y}"/><text x="{width - right}" y="{height - 4}" '
               'text-anchor="end">seconds since the first call</text></svg>')
    return "".join(out)


def bars_svg(items: Sequence[tuple[str, int]], *, width: int = 360, bar_h: int = 20,
             css_prefix: str = "bar-") -> str:
    """Return a horizontal bar chart of (label, value) pairs; a bar's class is prefix+label."""
    label_w, right, gap = 120, 40, 6
    peak = max([v for _, v in items] + [1])
    height = max(len(items), 1) * (bar_h + gap) + gap
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{escape(", ".join(f"{k}: {v}" for k, v in items))}">']
    for i, (label, value) in enumerate(items):
        y = gap + i * (bar_h + gap)
        w = (width - label_w - right) * value / peak
        out.append(f'<text x="{label_w - 6}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">'
                   f'{escape(label)}</text><rect class="{escape(css_prefix + label)}" '
                   f'x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="3"/>'
                   f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h * 0.7:.1f}">{value}</text>')
    out.append("</svg>")
    return "".join(out)
