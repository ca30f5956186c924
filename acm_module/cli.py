"""The `acm` command."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from acm_module.core import settings as settings_mod
from acm_module.core.errors import ConfigError
from acm_module.core.redaction import MASK, redact_url

log = logging.getLogger("acm.supervisor")

# The settings `acm serve` uses: its own, the detection rules, and its MI control plane's.
SERVE_SECTIONS = frozenset({"service", "detection", "control"})


def _add_setting_flags(p: argparse.ArgumentParser, sections: frozenset[str]) -> None:
    for s in settings_mod.SETTINGS:
        if s.cli is not None and s.section in sections:
            p.add_argument(s.cli, dest=s.name, default=None, help=f"{s.description} [{s.name}]")


def flag_commands() -> dict[str, list[str]]:
    """Return every option flag of `acm` with the (sub)commands that accept it."""
    out: dict[str, list[str]] = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    walk(f"{name} {sub}".strip(), sp)
            elif name:
                for opt in a.option_strings:
                    out.setdefault(opt, []).append(name)

    walk("", build_parser())
    return {k: sorted(set(v)) for k, v in out.items()}


def _load(args: argparse.Namespace) -> settings_mod.Settings:
    cli = {s.name: getattr(args, s.name, None) for s in settings_mod.SETTINGS}
    return settings_mod.load(args.config, cli=cli)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the supervisor and its worker pool."""
    from acm_module.control.commands import open_repository
    from acm_module.control.overrides import apply_overrides
    from acm_module.core.logs import setup_logging
    from acm_module.decide.supervisor import Supervisor

    def resolve() -> settings_mod.Settings:
        s = _load(args)
        # The deployment's MI overrides (repository or store) win over the file/env, so a
        # restart keeps them and a node that joins applies them.
        apply_overrides(s, open_repository)
        return s

    s = resolve()
    from acm_module.web.security import check_boot as check_web
    check_web(s.web_http, s.api_token)  # an exposed API without auth: exit 2 before anything
    setup_logging(s.log_level, s.log_json)
    # SIGHUP reloads the same way: file and environment again, the same flags, the overrides.
    return Supervisor(s, reload=resolve, sidecars=serve_sidecars).run()


def serve_sidecars(s: settings_mod.Settings, boot_id: str) -> dict[str, Callable[[Any], int]]:
    """Return the processes `acm serve` runs beside its workers, as the settings ask: the MI
    control plane (with the alert lifecycle commands of actions/), metrics, the REST API (with
    the console of console/ mounted on it)."""
    from acm_module.actions.mi import lifecycle_commands

    extra = (lifecycle_commands,)  # MI commands of other rooms, on every control plane
    out: dict[str, Callable[[Any], int]] = {}
    if s.mi_http or s.mi_datagram:
        try:
            from acm_module.control.server import control_main
        except ImportError:
            log.warning("MI control plane not available in this build")
        else:
            out["control"] = functools.partial(control_main, boot_id=boot_id,
                                               extra_commands=extra)
    if s.metrics_http:
        from acm_module.ops.metrics import metrics_main

        out["metrics"] = metrics_main
    if getattr(s, "web_http", ""):
        try:
            from acm_module.console import mount as console
            from acm_module.web.server import web_main
        except ImportError as e:  # the `web` extra is not installed
            log.warning("REST API not available in this build (%s)", e)
        else:
            out["web"] = functools.partial(web_main, extra_commands=extra, mounts=(console,))
    return out


def cmd_settings(args: argparse.Namespace) -> int:
    """Print the settings reference, or the resolved values."""
    if args.markdown:
        sys.stdout.write(settings_mod.markdown_table(flag_commands()))
        return 0
    s = _load(args)
    for name in sorted(s.values):
        value = s.values[name]
        if value and ("token" in name or "secret" in name):
            value = MASK
        elif isinstance(value, str):
            value = redact_url(value)
        print(f"{name} = {value!r}  ({s.source[name]})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the end-to-end load tool shipped in benchmarks/ of a source checkout."""
    import runpy
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "benchmarks" / "loadtool.py"
    if not tool.exists():
        print("acm bench: needs a source checkout (benchmarks/loadtool.py)", file=sys.stderr)
        return 2
    # Run the file as a script: the tool lives beside acm_module, not in it. It imports its
    # ZMTP client as benchmarks.zmtp_client, so the checkout must be importable even when the
    # installed `acm` runs from another directory (a console script's sys.path has no cwd).
    root = str(tool.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return runpy.run_path(str(tool), run_name="acm_bench")["main"](args.bench_args)


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Write a CurveZMQ key pair; print where, and the public key."""
    from acm_module.decide.access import generate_keypair

    try:
        public, secret = generate_keypair(args.dir, args.name, force=args.force)
    except (OSError, RuntimeError) as e:
        print(f"acm keys generate: {e}", file=sys.stderr)
        return 2
    print(f"public key (give it to the other side): {public}")
    print(f"secret key (keep it here, mode 0600):   {secret}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of `acm`."""
    p = argparse.ArgumentParser(prog="acm", description="Anti-call-masking detection service")
    p.add_argument("--config", "-c", default=None, help="TOML config file (or ACM_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the decision worker pool")
    _add_setting_flags(serve, SERVE_SECTIONS)
    serve.set_defaults(func=cmd_serve)
    st = sub.add_parser("settings", help="show settings")
    st.add_argument("--markdown", action="store_true", help="print the reference table")
    st.set_defaults(func=cmd_settings)
    keys = sub.add_parser("keys", help="CurveZMQ keys of the request endpoint")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    gen = keys_sub.add_parser(
        "generate", help="write NAME.key (public) and NAME.key_secret (0600)",
        description="Write a CurveZMQ key pair: NAME.key holds the public key (for the other "
                    "side: the service's goes to every client's curve_server_key, a client's "
                    "into the service's curve_client_keys directory), NAME.key_secret both keys "
                    "(mode 0600; the service's goes to curve_server_key, a client's to its "
                    "curve_client_key). See docs/PRODUCTION.md.")
    gen.add_argument("--dir", default=".", help="directory to write into (default: .)")
    gen.add_argument("--name", default="acm", help="file name without extension (default: acm)")
    gen.add_argument("--force", action="store_true", help="replace existing files")
    gen.set_defaults(func=cmd_keys_generate)
    bench = sub.add_parser("bench", help="end-to-end load test (see benchmarks/)",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    from acm_module.control.cli import add_cli as add_mi_cli; add_mi_cli(sub)  # noqa: E702, I001
    from acm_module.control.cli import add_registry_cli; add_registry_cli(sub)  # noqa: E702, I001
    from acm_module.write.cli import add_cli; add_cli(sub, periodic=_writer_jobs)  # noqa: E702, I001
    from acm_module.ops.cli import add_cli as add_ops_cli; add_ops_cli(sub)  # noqa: E702, I001
    from acm_module.actions.cli import add_cli as add_actions_cli; add_actions_cli(sub)  # noqa: E702, I001
    from acm_module.compliance.cli import add_cli as add_report_cli; add_report_cli(sub)  # noqa: E702, I001
    return p


def _writer_jobs(v: dict[str, Any]) -> list[tuple[float, Callable[[], None]]]:
    """Return the control plane's periodic jobs the writer runs (the whitelist sync)."""
    from acm_module.control.whitelist_sync import writer_jobs  # needs psycopg: only when run

    return writer_jobs(v)


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
