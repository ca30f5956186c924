"""`acm actions` (the actions runner) and `acm alert ...` (the alert lifecycle through MI)."""

from __future__ import annotations

import argparse
from typing import Any

from acm_module import settings as settings_mod

_RUNNER_SHARED = ("store", "partitions", "database_url", "window", "ncc_reporting",
                  "operator_code", "report_timezone", "log_level", "log_json")


def add_cli(subparsers: Any) -> None:
    """Register `acm actions` and `acm alert {show,assign,status,note}`."""
    p = subparsers.add_parser("actions", help="act on alerts: disconnect, notify, NCC ids",
                              description="Consume the alert records of the durable streams "
                                          "and act once per alert (see acm_module/actions/"
                                          "runner.py).")
    p.add_argument("--destroy-group", action="store_true",
                   help="remove the runner's consumer group from every stream and exit")
    for s in settings_mod.SETTINGS:
        if s.cli and (s.section == "actions" or s.name in _RUNNER_SHARED):
            p.add_argument(s.cli, dest=s.name, default=None, help=f"{s.description} [{s.name}]")
    p.set_defaults(func=cmd_actions)

    a = subparsers.add_parser("alert", help="the alert lifecycle (through MI)",
                              description="Run an alert lifecycle MI command against the "
                                          "running service (like `acm mi acm_alert_...`).")
    sub = a.add_subparsers(dest="alert_command", required=True)
    show = sub.add_parser("show", help="show an alert")
    show.add_argument("alert_id")
    assign = sub.add_parser("assign", help="assign an alert (NEW becomes INVESTIGATING)")
    assign.add_argument("alert_id")
    assign.add_argument("assignee")
    assign.add_argument("--note", default=None)
    status = sub.add_parser("status", help="move an alert to a status")
    status.add_argument("alert_id")
    status.add_argument("status", type=str.upper,
                        choices=["INVESTIGATING", "CONFIRMED", "RESOLVED", "FALSE_POSITIVE"])
    status.add_argument("--note", default=None)
    status.add_argument("--whitelist", action="store_true",
                        help="with FALSE_POSITIVE: whitelist the B-number in the same step")
    status.add_argument("--reason", default=None, help="reason of the whitelist entry")
    note = sub.add_parser("note", help="add a note to an alert")
    note.add_argument("alert_id")
    note.add_argument("note")
    for sp in (show, assign, status, note):
        sp.add_argument("--url", default=None, help="MI HTTP URL (default: from mi_http)")
        sp.add_argument("--datagram", default=None, metavar="HOST:PORT|unix:/path")
        sp.add_argument("--token", default=None, help="admin token (default: mi_token)")
        sp.add_argument("--timeout", type=float, default=10.0)
        sp.add_argument("--json", action="store_true", help="print the whole JSON-RPC response")
        sp.set_defaults(func=cmd_alert)


def cmd_actions(args: argparse.Namespace) -> int:
    """Run the actions runner (or remove its group)."""
    from acm_module.actions.runner import actions_main, destroy_group
    from acm_module.ops.logs import setup_logging

    cli = {s.name: getattr(args, s.name, None) for s in settings_mod.SETTINGS}
    s = settings_mod.load(args.config, cli=cli)
    setup_logging(s.log_level, s.log_json)
    if args.destroy_group:
        n = destroy_group(s.store, s.partitions)
        print(f"removed the actions group from {n} stream(s)")
        return 0
    return actions_main(s)


def cmd_alert(args: argparse.Namespace) -> int:
    """Turn `acm alert ...` into the MI command and run it like `acm mi`."""
    from acm_module.control.cli import cmd_mi

    params = [f"alert_id={args.alert_id}"]
    method = f"acm_alert_{args.alert_command}"
    if args.alert_command == "assign":
        params.append(f"assignee={args.assignee}")
    if args.alert_command == "status":
        params.append(f"status={args.status}")
        if args.whitelist:
            params.append("whitelist=true")
        if args.reason:
            params.append(f"reason={args.reason}")
    if getattr(args, "note", None):
        params.append(f"note={args.note}")
    mi_args = argparse.Namespace(config=args.config, method=method, params=params, url=args.url,
                                 datagram=args.datagram, token=args.token,
                                 timeout=args.timeout, json=args.json)
    return cmd_mi(mi_args)
