"""`acm replay` (with the what-if grid) and `acm metrics` (wired into acm_module/cli.py)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from typing import Any

from acm_module import settings as settings_mod
from acm_module.core.redaction import redact_url
from acm_module.errors import ConfigError

_DETECTION = ("threshold", "window", "block_ttl", "mode", "dedup_ttl", "default_country_code",
              "partitions")


def _add_flags(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    for name in names:
        s = settings_mod.BY_NAME[name]
        if s.cli:
            p.add_argument(s.cli, dest=name, default=None, help=f"{s.description} [{name}]")


def _settings(args: argparse.Namespace, names: tuple[str, ...]) -> settings_mod.Settings:
    return settings_mod.load(getattr(args, "config", None),
                             cli={n: getattr(args, n, None) for n in names})


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a CSV through the decision logic; with a grid, run the what-if table."""
    from acm_module.ops import replay, whatif

    s = _settings(args, _DETECTION)
    det = replay.Detection.from_settings(s)
    grid = args.thresholds is not None or args.windows is not None
    if grid and args.realtime:
        print("acm replay: the what-if grid runs at full speed; drop --realtime",
              file=sys.stderr)
        return 2
    if args.speed <= 0:
        print("acm replay: --speed must be > 0", file=sys.stderr)
        return 2
    try:
        calls = replay.read_calls(args.file)
        thresholds = whatif.parse_list(args.thresholds or str(det.threshold), int, "thresholds")
        windows = whatif.parse_list(args.windows or str(det.window), float, "windows")
        # Never the production store of the settings: only an explicit --store is used.
        with replay.ScratchStore(args.store, flush=args.flush) as store:
            where = "embedded valkey" if store.embedded else redact_url(store.url)
            if grid:
                cells = whatif.run_grid(calls, det, thresholds, windows, store, jobs=args.jobs,
                                        progress=args.progress)
                sys.stdout.write(whatif.render_table(cells, det))
                if args.csv:
                    whatif.write_csv(cells, args.csv)
                if args.json:
                    whatif.write_json(whatif.grid_json(cells, det), args.json)
                if args.plot:
                    whatif.write_svg(cells, det, args.plot)
                return 0
            out = _ResultWriter(args.out)
            try:
                summary = replay.replay_file(calls, det, store, realtime=args.realtime,
                                             speed=args.speed, progress=args.progress,
                                             on_reply=out.write if args.out else None)
            finally:
                out.close()
            sys.stdout.write(replay.render_summary(summary, det, where))
            if args.json:
                whatif.write_json({"detection": dataclasses.asdict(det), **summary.as_dict(),
                                   "alert_list": summary.alerts}, args.json)
            if args.csv or args.plot:
                print("acm replay: --csv and --plot belong to the what-if grid "
                      "(--thresholds/--windows)", file=sys.stderr)
            return 0
    except (replay.ReplayError, OSError) as e:
        print(f"acm replay: {e}", file=sys.stderr)
        return 2


class _ResultWriter:
    """The per-call results file (--out), written as replies come."""

    def __init__(self, path: str | None) -> None:
        from acm_module.ops.replay import RESULT_COLUMNS

        self._f = open(path, "w", newline="", encoding="utf-8") if path else None  # noqa: SIM115
        self._w = csv.DictWriter(self._f, fieldnames=RESULT_COLUMNS) if self._f else None
        if self._w is not None:
            self._w.writeheader()

    def write(self, call: Any, reply: dict[str, Any]) -> None:
        from acm_module.ops.replay import result_row

        assert self._w is not None
        self._w.writerow(result_row(call, reply))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def cmd_metrics(args: argparse.Namespace) -> int:
    """Print one exposition (--once) or serve /metrics for a store without `acm serve`."""
    from acm_module.ops import metrics

    s = _settings(args, ("store", "partitions", "metrics_http"))
    if not s.store:
        print("acm metrics: needs the store (--store or DRAGONFLY_URL)", file=sys.stderr)
        return 2
    if args.once:
        sys.stdout.write(metrics.render_once(s.store, s.partitions).decode())
        return 0
    from acm_module.ops.logs import setup_logging

    setup_logging(s.log_level, s.log_json)
    return metrics.metrics_main(s)


def add_cli(sub: Any) -> None:
    """Register `acm replay` and `acm metrics` on the `acm` subparsers."""
    rp = sub.add_parser(
        "replay", help="replay recorded calls (CSV) through the decision logic; what-if grid",
        description="Replay a CSV (call_id,a_number,b_number,ts) through the workers' decision "
                    "logic on a scratch store. With --thresholds/--windows: a what-if table.")
    rp.add_argument("file", help="CSV with columns call_id,a_number,b_number,ts")
    rp.add_argument("--store", default=None,
                    help="scratch Redis-protocol store URL (default: an embedded Valkey); "
                         "never taken from the settings")
    rp.add_argument("--flush", action="store_true",
                    help="empty the --store database(s) even if they hold keys")
    rp.add_argument("--realtime", action="store_true",
                    help="pace calls by their ts (default: full speed)")
    rp.add_argument("--speed", type=float, default=1.0, help="real-time factor (2 = twice)")
    rp.add_argument("--thresholds", default=None, help="what-if thresholds, e.g. 3,4,5,6,7")
    rp.add_argument("--windows", default=None, help="what-if windows in seconds, e.g. 2,5,10")
    rp.add_argument("--jobs", type=int, default=1,
                    help="what-if cells run in parallel, each on its own logical database")
    rp.add_argument("--out", default=None, help="write every call's reply to this CSV")
    rp.add_argument("--json", default=None, help="write the summary (or grid) as JSON")
    rp.add_argument("--csv", default=None, help="write the what-if grid as CSV")
    rp.add_argument("--plot", default=None, help="write the what-if grid as an SVG heatmap")
    rp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")
    _add_flags(rp, _DETECTION)
    rp.set_defaults(func=_guard(cmd_replay))

    mp = sub.add_parser("metrics", help="Prometheus metrics of a pool, from its store")
    mp.add_argument("--once", action="store_true", help="print one exposition and exit")
    _add_flags(mp, ("store", "partitions", "metrics_http"))
    mp.set_defaults(func=_guard(cmd_metrics))


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ConfigError as e:
            print(f"acm: configuration error: {e}", file=sys.stderr)
            return 2

    run.__doc__ = fn.__doc__
    return run

