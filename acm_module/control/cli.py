"""`acm mi COMMAND [name=value ...]`: run one MI command against a running service; `acm carrier`,
`acm gateway`, `acm route`: the carrier registry's MI commands as subcommands.

Talks to the endpoint the settings name (mi_http first, else mi_datagram), or to --url /
--datagram, through the MI client (python-opensips, control/mi_client.py).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from acm_module.control.auth import parse_bind
from acm_module.control.mi_client import MIClient
from acm_module.core.errors import MIReplyError, MIUnavailable

EXIT_MI_ERROR = 1
EXIT_UNREACHABLE = 2


def add_cli(subparsers: Any) -> None:
    """Add the `mi` subcommand to `acm`'s subparsers."""
    p = subparsers.add_parser(
        "mi", help="run an MI command (acm mi acm_set threshold=7)",
        description="Run one MI command against the running service, e.g. "
                    "`acm mi acm_set threshold=7`, `acm mi acm_stats`, `acm mi which`.")
    p.add_argument("method", help="MI command, e.g. acm_get_config")
    p.add_argument("params", nargs="*", metavar="name=value",
                   help="named parameters (or positional values)")
    add_mi_options(p)
    p.set_defaults(func=cmd_mi)


# `acm carrier|gateway|route ACTION ...`: the registry's MI commands with a friendlier syntax.
# object -> action -> (MI method, help, positional params, options: (flag, param, help)).
_Option = tuple[str, str, str]
REGISTRY_CLI: dict[str, dict[str, tuple[str, str, tuple[str, ...], tuple[_Option, ...]]]] = {
    "carrier": {
        "add": ("acm_carrier_add", "add or replace a carrier", ("id", "name", "licence"),
                (("--contact", "contact", "contact (e-mail, NOC phone)"),
                 ("--cli-rule", "cli_rule", "enforce, monitor, off or null (inherit)"))),
        "remove": ("acm_carrier_remove", "remove a carrier", ("id",),
                   (("--cascade", "cascade", "also remove its gateways and routes"),)),
        "list": ("acm_carrier_list", "list the carriers", (), ()),
        "show": ("acm_registry_show", "show the published registry and its version", (), ()),
    },
    "gateway": {
        "add": ("acm_gateway_add", "add or replace a gateway", ("id", "carrier", "addresses"),
                (("--trunks", "trunks", "comma-separated trunk ids"),
                 ("--cps", "rate_limit_cps", "rate limit, calls per second (0 = none)"),
                 ("--window", "rate_window_s", "rate limit window, seconds (default 1)"))),
        "remove": ("acm_gateway_remove", "remove a gateway", ("id",),
                   (("--cascade", "cascade", "also remove the routes naming it"),)),
        "set-limit": ("acm_gateway_set_limit", "set a gateway's rate limit", ("id", "cps"),
                      (("--window", "window", "window, seconds (default: unchanged)"),)),
    },
    "route": {
        "add": ("acm_route_add", "add or replace a route", ("id", "carrier", "direction"),
                (("--gateway", "gateway", "only calls through this gateway"),
                 ("--trunk", "trunk", "only calls on this trunk"),
                 ("--cli-rule", "cli_rule", "enforce, monitor, off or null (inherit)"))),
        "remove": ("acm_route_remove", "remove a route", ("id",), ()),
    },
}


_POSITIONAL_HELP = {
    "id": "the entry's id (1-64 characters of A-Z a-z 0-9 . _ -)",
    "carrier": "the carrier's id",
    "licence": "international_gateway, interconnect_clearinghouse, pnl, leo, mno or other",
    "addresses": "comma-separated IP addresses and CIDR networks",
    "direction": "international or national",
    "cps": "calls per second (0 = no limit)",
}


def add_mi_options(p: argparse.ArgumentParser, timeout: float = 5.0) -> None:
    """Add the options every MI-calling subcommand takes (how to reach the endpoint)."""
    p.add_argument("--url", default=None,
                   help="MI HTTP URL (default: http://<mi_http>/mi from the settings)")
    p.add_argument("--datagram", default=None, metavar="HOST:PORT|unix:/path",
                   help="use MI over datagrams at this address instead of HTTP")
    p.add_argument("--token", default=None,
                   help="admin token (default: ACM_MI_TOKEN / mi_token)")
    p.add_argument("--timeout", type=float, default=timeout, help="seconds to wait for a reply")
    p.add_argument("--json", action="store_true", help="print the whole JSON-RPC response")


def add_registry_cli(subparsers: Any) -> None:
    """Add `acm carrier`, `acm gateway` and `acm route` (the carrier registry through MI)."""
    for obj, actions in REGISTRY_CLI.items():
        p = subparsers.add_parser(obj, help=f"the carrier registry's {obj}s (through MI)",
                                  description=f"Change the carrier registry's {obj}s through "
                                              f"MI (docs/GATEWAY.md), like `acm mi "
                                              f"acm_{obj}_...`.")
        sub = p.add_subparsers(dest=f"{obj}_command", required=True)
        for action, (method, help_text, positional, options) in actions.items():
            a = sub.add_parser(action, help=help_text)
            for name in positional:
                a.add_argument(name, help=_POSITIONAL_HELP.get(name))
            for flag, param, opt_help in options:
                if param == "cascade":
                    a.add_argument(flag, dest=param, action="store_true", help=opt_help)
                else:
                    a.add_argument(flag, dest=param, default=None, help=opt_help)
            add_mi_options(a)
            a.set_defaults(func=cmd_registry, mi_method=method,
                           mi_params=positional + tuple(o[1] for o in options))


def cmd_registry(args: argparse.Namespace) -> int:
    """Turn `acm carrier|gateway|route ...` into its MI command and run it like `acm mi`."""
    params = []
    for name in args.mi_params:
        v = getattr(args, name)
        if v is True:
            params.append(f"{name}=true")
        elif v is not None and v is not False:
            params.append(f"{name}={v}")
    mi_args = argparse.Namespace(config=args.config, method=args.mi_method, params=params,
                                 url=args.url, datagram=args.datagram, token=args.token,
                                 timeout=args.timeout, json=args.json)
    return cmd_mi(mi_args)


def build_params(params: list[str], actor: str | None = None
                 ) -> dict[str, Any] | list[str] | None:
    """Return the params of a command line: name=value pairs become named params (with the
    actor), else positional values."""
    named = [p for p in params if "=" in p]
    if named and len(named) == len(params):
        out: dict[str, Any] = dict(p.split("=", 1) for p in params)
        if actor and "actor" not in out:
            out["actor"] = actor
        return out
    if params:
        return list(params)
    return {"actor": actor} if actor else None


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "*") else ("::1" if host == "::" else host)


def _datagram_url(value: str) -> str:
    """Return the MI client's URL of a --datagram/mi_datagram value. Raises ConfigError."""
    b = parse_bind(value, "--datagram")
    if b.unix_path is not None:
        return f"unix:{b.unix_path}"
    host = _client_host(b.host)
    return f"udp:[{host}]:{b.port}" if ":" in host else f"udp:{host}:{b.port}"


def cmd_mi(args: argparse.Namespace) -> int:
    """Run `acm mi`."""
    from acm_module.core import settings as settings_mod

    s = settings_mod.load(args.config)
    token = args.token if args.token is not None else (s.mi_token or None)
    url, datagram = args.url, args.datagram
    if url is None and datagram is None:
        if s.mi_http:
            b = parse_bind(s.mi_http, "mi_http")
            if b.unix_path is not None:
                print("acm mi: mi_http is a unix socket; use --datagram or curl "
                      "--unix-socket", file=sys.stderr)
                return EXIT_UNREACHABLE
            host = _client_host(b.host)
            url = f"http://{f'[{host}]' if ':' in host else host}:{b.port}/mi"
        elif s.mi_datagram:
            datagram = s.mi_datagram
        else:
            print("acm mi: MI is disabled (mi_http and mi_datagram are empty)", file=sys.stderr)
            return EXIT_UNREACHABLE
    try:
        actor = getpass.getuser()
    except (KeyError, OSError):
        actor = None
    client: MIClient | None = None
    try:
        client = MIClient(url if url is not None else _datagram_url(datagram or ""),
                          timeout=args.timeout, token=token, name="the MI endpoint")
        result = client.execute(args.method, build_params(args.params, actor))
    except MIReplyError as e:
        if args.json and client is not None:
            print(json.dumps(client.last_reply, indent=2))
        print(f"acm mi: error {e.code}: {e.message}", file=sys.stderr)
        return EXIT_MI_ERROR
    except MIUnavailable as e:
        print(f"acm mi: cannot reach {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ValueError as e:  # a bad --url / --datagram
        print(f"acm mi: cannot reach the MI endpoint {url or datagram}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(client.last_reply if args.json else result, indent=2))
    return 0
