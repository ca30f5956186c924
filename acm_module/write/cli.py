"""The `acm writer` and `acm db migrate` subcommands (wired into acm_module/cli.py)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from acm_module.core import settings as settings_mod
from acm_module.core.errors import ConfigError

log = logging.getLogger("acm.writer")

Periodic = Callable[[dict[str, Any]], list[tuple[float, Callable[[], None]]]]


_SHARED = ("store", "partitions", "database_url", "questdb_url", "clickhouse_url",
           "default_country_code", "graceful_timeout", "log_level", "log_json")
# The writer's own settings are declared with every other one in acm_module/core/settings.py.
_WRITER = (*(s.name for s in settings_mod.SETTINGS if s.name.startswith("writer_")),
           "chdb_path", "whitelist_sync_interval")


def _add_flags(p: argparse.ArgumentParser) -> None:
    for name in _SHARED + _WRITER:
        s = settings_mod.BY_NAME[name]
        if s.cli:
            p.add_argument(s.cli, dest=name, default=None, help=f"{s.description} [{name}]")


def resolve(args: argparse.Namespace, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Return every setting the writer uses (default < file < env < CLI)."""
    env = dict(os.environ if env is None else env)
    cli = {n: getattr(args, n, None) for n in settings_mod.BY_NAME}
    return dict(settings_mod.load(getattr(args, "config", None), env=env, cli=cli).values)


def configured_sinks(v: dict[str, Any]) -> list[str]:
    """Return the sinks `writer_sinks = auto` feeds: pg with a database URL, questdb with a
    QuestDB URL, clickhouse always (chdb when no server URL)."""
    return [n for n, on in (("pg", v["database_url"]), ("questdb", v["questdb_url"]),
                            ("clickhouse", True)) if on]


def deployment_sinks(v: dict[str, Any]) -> list[str]:
    """Return the sinks trimming waits for: this writer's, and every sink with a URL setting
    (another writer may feed it). An embedded chdb fed by another writer is not known here:
    its group holds back trimming once that writer has run."""
    mine = [s.strip() for s in v["writer_sinks"].strip().lower().split(",") if s.strip()]
    if mine == ["auto"]:
        mine = configured_sinks(v)
    urls = [n for n, url in (("pg", v["database_url"]), ("questdb", v["questdb_url"]),
                             ("clickhouse", v["clickhouse_url"])) if url]
    return sorted(set(mine) | set(urls))


def build_sinks(v: dict[str, Any]) -> list[Any]:
    """Create the sinks the settings enable. Raises ConfigError."""
    from acm_module.write.clickhouse import ClickHouseSink
    from acm_module.write.pg import PostgresSink
    from acm_module.write.questdb import QuestDBSink

    wanted = v["writer_sinks"].strip().lower()
    if wanted == "auto":
        names = configured_sinks(v)
    else:
        names = [n.strip() for n in wanted.split(",") if n.strip()]
    sinks: list[Any] = []
    for n in names:
        if n == "pg":
            if not v["database_url"]:
                raise ConfigError("sink pg needs database_url (DATABASE_URL)")
            sinks.append(PostgresSink(v["database_url"]))
        elif n == "questdb":
            if not v["questdb_url"]:
                raise ConfigError("sink questdb needs questdb_url (QUESTDB_URL)")
            try:
                sinks.append(QuestDBSink(v["questdb_url"], store_url=v["store"],
                                         latency_wait_ms=v["writer_latency_wait_ms"]))
            except ValueError as e:
                raise ConfigError(f"questdb_url: {e}") from e
        elif n == "clickhouse":
            sinks.append(ClickHouseSink(v["clickhouse_url"], v["chdb_path"]))
        else:
            raise ConfigError(f"unknown sink {n!r} (pg, questdb, clickhouse)")
    if not sinks:
        raise ConfigError("no sink enabled")
    return sinks


def _start(args: argparse.Namespace, required: str, missing: str) -> dict[str, Any]:
    """Resolve the settings and set up logging; return the settings.

    Raises ConfigError(missing) when the setting `required` is empty."""
    from acm_module.core.logs import setup_logging

    v = resolve(args)
    setup_logging(v["log_level"], v["log_json"])
    if not v[required]:
        raise ConfigError(missing)
    return v


def cmd_writer(args: argparse.Namespace) -> int:
    """Run the persistence writer until SIGTERM."""
    from acm_module.write.writer import ProcessPerSink, Writer, WriterConfig

    v = _start(args, "store", "the writer needs the store URL (DRAGONFLY_URL or --store)")
    cfg = WriterConfig(
        store_url=v["store"], partitions=v["partitions"],
        consumer=v["writer_consumer"] or socket.gethostname(), batch=v["writer_batch"],
        claim_idle_ms=v["writer_claim_idle_ms"], backoff_max_s=v["writer_backoff_max"],
        graceful_timeout_s=v["graceful_timeout"], trim_interval_s=v["writer_trim_interval"],
        group_max_idle_s=v["writer_group_max_idle"], all_sinks=tuple(deployment_sinks(v)))
    # The periodic jobs (the control plane's whitelist sync) are handed in by acm_module/cli.py:
    # the writer does not import the control room.
    jobs = getattr(args, "periodic", None)

    def periodic() -> list[tuple[float, Any]]:
        return jobs(v) if jobs is not None else []

    sinks = build_sinks(v)  # validates the settings; no connection is opened here
    if v["writer_process_per_sink"] and len(sinks) > 1:
        # Each child builds its own sink after fork(): nothing with a socket crosses it.
        factories = {s.name: functools.partial(_one_sink, v, s.name) for s in sinks}
        return ProcessPerSink(cfg, factories, periodic).run()
    return Writer(cfg, sinks, periodic()).run()


def _one_sink(v: dict[str, Any], name: str) -> Any:
    (sink,) = build_sinks({**v, "writer_sinks": name})
    return sink


def cmd_db_migrate(args: argparse.Namespace) -> int:
    """Apply pending database migrations."""
    from acm_module.write.migrate import migrate

    v = _start(args, "database_url",
               "acm db migrate needs database_url (DATABASE_URL or --database-url)")
    done = migrate(v["database_url"])
    print(f"applied {len(done)} migration(s): {', '.join(done) or 'none pending'}")
    return 0


def cmd_writer_stats(args: argparse.Namespace) -> int:
    """Print per-sink backlog and state as JSON."""
    import json

    from acm_module.write.store import StreamStore
    from acm_module.write.writer import writer_stats

    v = resolve(args)
    c = StreamStore(v["store"])
    try:
        json.dump(writer_stats(c, v["partitions"]), sys.stdout, indent=2)
    finally:
        c.close()
    print()
    return 0


def add_cli(subparsers: Any, periodic: Periodic | None = None) -> None:
    """Register `acm writer` (+ `acm writer stats`) and `acm db migrate`.

    periodic, given the resolved settings, returns the (interval s, job) pairs the writer runs
    between batches.
    """
    w = subparsers.add_parser("writer", help="persist the decision streams into the databases")
    _add_flags(w)
    w.set_defaults(func=cmd_writer, periodic=periodic)
    wsub = w.add_subparsers(dest="writer_command")
    ws = wsub.add_parser("stats", help="print per-sink backlog and state")
    _add_flags(ws)
    ws.set_defaults(func=cmd_writer_stats)
    db = subparsers.add_parser("db", help="database administration")
    dsub = db.add_subparsers(dest="db_command", required=True)
    m = dsub.add_parser("migrate", help="apply pending migrations (idempotent)")
    _add_flags(m)
    m.set_defaults(func=cmd_db_migrate)
