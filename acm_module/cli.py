"""The `acm` command."""

from __future__ import annotations

import argparse
import sys

from acm_module import settings as settings_mod
from acm_module.errors import ConfigError


def _add_setting_flags(p: argparse.ArgumentParser, section: str | None = None) -> None:
    for s in settings_mod.SETTINGS:
        if s.cli is None or (section is not None and s.section not in (section, "detection")):
            continue
        p.add_argument(s.cli, dest=s.name, default=None, help=f"{s.description} [{s.name}]")


def _load(args: argparse.Namespace) -> settings_mod.Settings:
    cli = {s.name: getattr(args, s.name, None) for s in settings_mod.SETTINGS}
    return settings_mod.load(args.config, cli=cli)


def setup_logging(level: str, json_logs: bool = False) -> None:
    """Configure the root logger (text or JSON, secrets redacted)."""
    from acm_module.ops.logs import setup_logging as _setup

    _setup(level, json_logs)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the supervisor and its worker pool."""
    from acm_module.control.overrides import apply_overrides
    from acm_module.server.supervisor import Supervisor

    s = _load(args)
    from acm_module.web.security import check_boot as check_web
    check_web(s.web_http, s.api_token)  # an exposed API without auth: exit 2 before anything
    setup_logging(s.log_level, s.log_json)
    # MI changes persisted in state_dir win over the file/env, so a restart keeps them.
    apply_overrides(s)
    return Supervisor(s).run()


_URL_SETTINGS = ("database_url", "store", "questdb_url", "clickhouse_url")


def cmd_settings(args: argparse.Namespace) -> int:
    """Print the settings reference, or the resolved values."""
    if args.markdown:
        sys.stdout.write(settings_mod.markdown_table())
        return 0
    s = _load(args)
    for name in sorted(s.values):
        value = s.values[name]
        secret = "token" in name or "secret" in name
        url_with_password = name in _URL_SETTINGS and "@" in str(value)
        if value and (secret or url_with_password):
            value = "***"
        print(f"{name} = {value!r}  ({s.source[name]})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the end-to-end load tool shipped in benchmarks/ of a source checkout."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "loadtool.py").exists():
        print("acm bench: needs a source checkout (benchmarks/loadtool.py)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from benchmarks.loadtool import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of `acm`."""
    p = argparse.ArgumentParser(prog="acm", description="Anti-call-masking detection service")
    p.add_argument("--config", "-c", default=None, help="TOML config file (or ACM_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the decision worker pool")
    _add_setting_flags(serve, "service")
    serve.set_defaults(func=cmd_serve)
    st = sub.add_parser("settings", help="show settings")
    st.add_argument("--markdown", action="store_true", help="print the reference table")
    st.set_defaults(func=cmd_settings)
    bench = sub.add_parser("bench", help="end-to-end load test (see benchmarks/)",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    from acm_module.control.cli import add_cli as add_mi_cli; add_mi_cli(sub)  # noqa: E702, I001
    from acm_module.control.cli import add_registry_cli; add_registry_cli(sub)  # noqa: E702, I001
    from acm_module.persist.cli import add_cli; add_cli(sub)  # noqa: E702, I001
    from acm_module.ops.cli import add_cli as add_ops_cli; add_ops_cli(sub)  # noqa: E702, I001
    from acm_module.actions.cli import add_cli as add_actions_cli; add_actions_cli(sub)  # noqa: E702, I001
    from acm_module.compliance.cli import add_cli as add_report_cli; add_report_cli(sub)  # noqa: E702, I001
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `acm`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # every flag after `bench` belongs to the load tool
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"acm: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
