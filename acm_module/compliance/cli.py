"""`acm report daily --date YYYY-MM-DD`: the regulator's daily report from the stored data."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from acm_module.core import settings as settings_mod
from acm_module.core.errors import ConfigError

# --format -> the report.write() kinds it writes.
FORMATS = {"json": ("json",), "csv": ("alerts_csv", "summary_csv", "carriers_csv"),
           "html": ("html",), "pdf": ("pdf",)}
_SHARED = ("database_url", "questdb_url", "ncc_reporting", "operator_code", "report_timezone",
           "report_dir", "log_level", "log_json")


def add_cli(subparsers: Any) -> None:
    """Register `acm report daily`."""
    p = subparsers.add_parser("report", help="compliance reports (NCC)")
    sub = p.add_subparsers(dest="report_command", required=True)
    d = sub.add_parser("daily", help="write the daily report (JSON, CSV, HTML, PDF)",
                       description="Compute one day's statistics from PostgreSQL (fraud_alerts, "
                                   "audit_log) and QuestDB (call_events) and write "
                                   "acm-daily-<date>.json, -alerts.csv, -summary.csv, "
                                   "-carriers.csv, .html and .pdf (--format: only some).")
    d.add_argument("--date", default=None, metavar="YYYY-MM-DD",
                   help="the day, in report_timezone (default: yesterday)")
    d.add_argument("--out", default=None, help="output directory (default: report_dir)")
    d.add_argument("--format", action="append", choices=sorted(FORMATS), default=None,
                   help="write only this format (repeatable; default: all)")
    d.add_argument("--no-assign", action="store_true",
                   help="with ncc_reporting, do not give incident ids to alerts still lacking one")
    for name in _SHARED:
        s = settings_mod.BY_NAME[name]
        if s.cli:
            d.add_argument(s.cli, dest=name, default=None, help=f"{s.description} [{name}]")
    d.set_defaults(func=cmd_report_daily)


def cmd_report_daily(args: argparse.Namespace) -> int:
    """Write the daily report; print the paths. Exit 2 on a configuration error."""
    import psycopg

    from acm_module.compliance import ncc, report, stats
    from acm_module.core.logs import setup_logging

    s = settings_mod.load(args.config, cli={n: getattr(args, n, None) for n in _SHARED})
    setup_logging(s.log_level, s.log_json)
    if not s.database_url:
        raise ConfigError("acm report needs database_url (DATABASE_URL or --database-url)")
    try:
        tz = ZoneInfo(s.report_timezone)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ConfigError(f"report_timezone: unknown time zone {s.report_timezone!r}") from e
    if args.date:
        try:
            day = date.fromisoformat(args.date)
        except ValueError as e:
            raise ConfigError(f"--date: expected YYYY-MM-DD, got {args.date!r}") from e
    else:
        day = datetime.now(UTC).astimezone(tz).date() - timedelta(days=1)
    try:
        with psycopg.connect(s.database_url, connect_timeout=10) as conn:
            if s.ncc_reporting and not args.no_assign:
                start, end = stats.day_bounds(day, s.report_timezone)
                ncc.assign_missing(conn, start, end, s.operator_code, s.report_timezone)
            st = stats.compute(conn, day, s.report_timezone, s.operator_code, s.questdb_url)
    except psycopg.Error as e:
        print(f"acm report: database error: {type(e).__name__}: {e}".splitlines()[0],
              file=sys.stderr)
        return 1
    kinds = None if not args.format else {k for f in args.format for k in FORMATS[f]}
    paths = report.write(st, args.out or s.report_dir, kinds)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
