"""What-if tuning: replay one recorded file under every (threshold, window) of a grid.

Each cell is a full replay in block mode (so "dropped" means what blocking would have dropped)
on an empty logical database: with `jobs` > 1 the cells run in forked processes, each on its own
database (base + job index) of the same store, flushed between its cells.

Read the table with care: with blocking off, a higher threshold (or a shorter window) can only
detect a subset of the calls, so dropped calls never grow. The alert count is not monotone in
general: an alert is an *episode*, and removing detections in the middle of a long attack can
split one episode into two.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import queue
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from acm_module.core.errors import ConfigError, StoreError
from acm_module.decide.store.cluster import StoreClient
from acm_module.ops.replay import (
    Call,
    Detection,
    Progress,
    ReplayError,
    ScratchStore,
    Summary,
    run_replay,
)

METRICS = (("alerts", "alerts"), ("dropped", "dropped calls"), ("b_numbers_hit", "B-numbers hit"))
CSV_COLUMNS = ("threshold", "window", "calls", "alerts", "alerts_low", "alerts_high",
               "alerts_critical", "dropped", "detections", "b_numbers_hit", "seconds")


@dataclass
class Cell:
    """The outcome of one (threshold, window) replay."""

    threshold: int
    window: float
    calls: int = 0
    alerts: int = 0
    alerts_by_severity: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    detections: int = 0
    b_numbers_hit: int = 0
    seconds: float = 0.0

    @classmethod
    def of(cls, threshold: int, window: float, s: Summary) -> Cell:
        return cls(threshold, window, s.calls, len(s.alerts), s.alerts_by_severity(),
                   s.dropped, s.detections, s.b_hit(), round(s.seconds, 3))

    def csv_row(self) -> dict[str, Any]:
        sev = self.alerts_by_severity
        return {"threshold": self.threshold, "window": self.window, "calls": self.calls,
                "alerts": self.alerts, "alerts_low": sev.get("LOW", 0),
                "alerts_high": sev.get("HIGH", 0), "alerts_critical": sev.get("CRITICAL", 0),
                "dropped": self.dropped, "detections": self.detections,
                "b_numbers_hit": self.b_numbers_hit, "seconds": self.seconds}


def parse_list(raw: str, typ: type, name: str) -> list[Any]:
    """Parse "3,4,5" into sorted unique values. Raises ReplayError."""
    try:
        values = sorted({typ(x) for x in raw.split(",") if x.strip()})
    except ValueError as e:
        raise ReplayError(f"--{name}: {e}") from e
    if not values or any(v <= 0 for v in values):
        raise ReplayError(f"--{name} needs positive values, e.g. 3,4,5")
    return values


def cell_detection(base: Detection, threshold: int, window: float) -> Detection:
    """Return the detection settings of a cell: block mode, dedup at least the window."""
    return dataclasses.replace(base, threshold=threshold, window=window, mode="block",
                               dedup_ttl=max(base.dedup_ttl, window))


def _run_cells(calls: Sequence[Call], base: Detection, todo: list[tuple[int, int, float]],
               store: ScratchStore, db_offset: int, report: Any) -> None:
    """Run cells one after the other on one database; report ("cell"|"progress"|"error", ...)."""
    conn = StoreClient(store.db_url(db_offset), timeout=30.0, connect_timeout=5.0)
    try:
        conn.connect()
        for index, t, w in todo:
            store.prepare(db_offset)
            tick = _Ticker(report)
            s = run_replay(calls, conn, cell_detection(base, t, w), progress=tick)
            tick.flush()
            report(("cell", index, dataclasses.asdict(Cell.of(t, w, s))))
    except (ReplayError, StoreError, ConfigError) as e:
        report(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


class _Ticker:
    """Forward replay progress to the parent in chunks (a queue message per batch is wasteful)."""

    def __init__(self, report: Any) -> None:
        self.report = report
        self.pending = 0

    def update(self, n: int = 0, force: bool = False) -> None:
        self.pending += n
        if self.pending >= 2000:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.report(("progress", self.pending))
            self.pending = 0


def run_grid(calls: Sequence[Call], base: Detection, thresholds: Sequence[int],
             windows: Sequence[float], store: ScratchStore, jobs: int = 1,
             progress: bool | None = None) -> list[Cell]:
    """Replay the calls once per cell; return the cells, thresholds-major. Raises ReplayError."""
    todo = [(i, t, w) for i, (t, w) in enumerate((t, w) for t in thresholds for w in windows)]
    jobs = max(1, min(jobs, len(todo)))
    bar = Progress(len(calls) * len(todo), "what-if", enabled=progress)
    results: dict[int, Cell] = {}
    try:
        if jobs == 1:
            errors: list[str] = []

            def report(msg: tuple) -> None:
                if msg[0] == "progress":
                    bar.update(msg[1])
                elif msg[0] == "cell":
                    results[msg[1]] = Cell(**msg[2])
                else:
                    errors.append(msg[1])

            _run_cells(calls, base, todo, store, 0, report)
            if errors:
                raise ReplayError(errors[0])
        else:
            _run_parallel(calls, base, todo, store, jobs, bar, results)
    finally:
        bar.close()
    return [results[i] for i, _, _ in todo]


def _run_parallel(calls: Sequence[Call], base: Detection, todo: list[tuple[int, int, float]],
                  store: ScratchStore, jobs: int, bar: Progress, results: dict[int, Cell]
                  ) -> None:
    # fork: the children inherit the parsed calls; no store connection exists before the fork.
    ctx = multiprocessing.get_context("fork")
    q: Any = ctx.Queue()
    procs = []
    for j in range(jobs):
        share = todo[j::jobs]
        store.db_url(j)  # refuse a unix:// store before forking
        p = ctx.Process(target=_run_cells, args=(calls, base, share, store, j, q.put),
                        daemon=True)
        p.start()
        procs.append(p)
    try:
        while len(results) < len(todo):
            try:
                msg = q.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and q.empty():
                    raise ReplayError("a what-if job died") from None
                continue
            if msg[0] == "progress":
                bar.update(msg[1])
            elif msg[0] == "cell":
                results[msg[1]] = Cell(**msg[2])
            else:
                raise ReplayError(msg[1])
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
        q.close()


# -- output ------------------------------------------------------------------------------------
def render_table(cells: Sequence[Cell], base: Detection) -> str:
    """Return one threshold x window table per metric; `*` marks the current setting."""
    thresholds = sorted({c.threshold for c in cells})
    windows = sorted({c.window for c in cells})
    by = {(c.threshold, c.window): c for c in cells}
    calls = cells[0].calls if cells else 0
    out = [f"what-if over {calls:,} calls (block mode, block_ttl {base.block_ttl:g} s); "
           f"* = current setting (threshold {base.threshold}, window {base.window:g} s)"]
    for key, title in METRICS:
        out += ["", f"{title}: threshold (rows) x window in seconds (columns)",
                f"{'':>10}" + "".join(f"{w:>12g}" for w in windows)]
        for t in thresholds:
            row = f"{t:>10}"
            for w in windows:
                mark = "*" if (t, w) == (base.threshold, base.window) else " "
                row += f"{getattr(by[(t, w)], key):>11,}{mark}"
            out.append(row)
    return "\n".join(out) + "\n"


def write_csv(cells: Sequence[Cell], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for c in cells:
            w.writerow(c.csv_row())


def grid_json(cells: Sequence[Cell], base: Detection) -> dict[str, Any]:
    return {"base": dataclasses.asdict(base), "mode": "block",
            "cells": [dataclasses.asdict(c) for c in cells]}


def write_svg(cells: Sequence[Cell], base: Detection, path: str | Path) -> None:
    """Write the grid as three heatmaps (alerts, dropped calls, B-numbers hit) in one SVG."""
    Path(path).write_text(render_svg(cells, base), encoding="utf-8")


def render_svg(cells: Sequence[Cell], base: Detection) -> str:
    """Return a self-contained SVG: no plotting library needed to make or view it."""
    thresholds = sorted({c.threshold for c in cells})
    windows = sorted({c.window for c in cells})
    by = {(c.threshold, c.window): c for c in cells}
    cw, ch, left, top, gap = 64, 30, 84, 64, 40
    panel_w = left + cw * len(windows)
    width = len(METRICS) * panel_w + (len(METRICS) - 1) * gap + 20
    height = top + ch * len(thresholds) + 50
    calls = cells[0].calls if cells else 0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<title>acm what-if over {calls} calls</title>',
        f'<text x="10" y="18" font-size="14" font-weight="bold">acm what-if: {calls:,} calls, '
        f'block mode; outlined = current setting (threshold {base.threshold}, window '
        f'{base.window:g} s)</text>',
    ]
    for k, (key, title) in enumerate(METRICS):
        x0 = 10 + k * (panel_w + gap)
        hi = max((getattr(c, key) for c in cells), default=0) or 1
        parts.append(f'<text x="{x0 + left}" y="{top - 24}" font-weight="bold">'
                     f'{escape(title)}</text>')
        for j, w in enumerate(windows):
            parts.append(f'<text x="{x0 + left + j * cw + cw / 2}" y="{top - 6}" '
                         f'text-anchor="middle">{w:g} s</text>')
        for i, t in enumerate(thresholds):
            y = top + i * ch
            parts.append(f'<text x="{x0 + left - 8}" y="{y + ch / 2 + 4}" text-anchor="end">'
                         f'threshold {t}</text>')
            for j, w in enumerate(windows):
                v = getattr(by[(t, w)], key)
                frac = v / hi
                # White to red: easy to read, and survives greyscale printing.
                g = int(255 - 200 * frac)
                fill = f"rgb(255,{g},{g})"
                x = x0 + left + j * cw
                stroke = ('stroke="#000" stroke-width="2.5"'
                          if (t, w) == (base.threshold, base.window)
                          else 'stroke="#999" stroke-width="0.5"')
                parts.append(f'<rect x="{x}" y="{y}" width="{cw}" height="{ch}" '
                             f'fill="{fill}" {stroke}><title>threshold {t}, window {w:g} s: '
                             f'{v} {escape(title)}</title></rect>')
                parts.append(f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" '
                             f'text-anchor="middle">{v:,}</text>')
        parts.append(f'<text x="{x0 + left + cw * len(windows) / 2}" '
                     f'y="{top + ch * len(thresholds) + 20}" text-anchor="middle">window</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_json(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
