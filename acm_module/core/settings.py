"""Every setting declared once: name, type, default, env var, CLI flag, validator, description.

Precedence, lowest to highest: declared default < config file (TOML) < environment < CLI flag.
The docs table (`acm settings --markdown`) is generated from these declarations.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from acm_module.core.errors import ConfigError

Validator = Callable[[Any], None]


def _positive(v: Any) -> None:
    if v <= 0:
        raise ValueError("must be > 0")


def _non_negative(v: Any) -> None:
    if v < 0:
        raise ValueError("must be >= 0")


def _one_of(*choices: str) -> Validator:
    def check(v: Any) -> None:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")

    return check


def _range(lo: float, hi: float) -> Validator:
    def check(v: Any) -> None:
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}")

    return check


def _name(v: Any) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
        raise ValueError("must be 1 to 64 characters of A-Z a-z 0-9 . _ -, starting with a "
                         "letter or digit")


def _endpoint(v: Any) -> None:
    if not (v.startswith("ipc://") or v.startswith("tcp://")):
        raise ValueError("must start with ipc:// or tcp://")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """Parse comma-separated addresses/CIDRs. Raises ValueError naming the bad one."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if item:
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError as e:
                raise ValueError(f"{item!r} is not an address or network") from e
    return tuple(out)


def _networks(v: Any) -> None:
    parse_networks(v)


STORE_SCHEMES = ("redis", "rediss", "unix", "dragonfly")


def _store_url(v: Any) -> None:
    if not v:
        return  # an embedded store
    u = urlparse(v)
    if u.scheme not in STORE_SCHEMES:
        raise ValueError("must be a redis[s]://[user:password@]host:port[,host:port...]/db "
                         "or unix:///path URL")
    for hp in u.netloc.rpartition("@")[2].split(","):  # several seeds of one cluster
        port = hp.rpartition("]")[2].rpartition(":")[2] if ":" in hp else ""
        if port and not (port.isdigit() and int(port) <= 65535):
            raise ValueError(f"port {port!r} is not a number in 0..65535")
    db = "" if u.scheme == "unix" else u.path.strip("/")
    if db and not db.isdigit():
        raise ValueError("the database after the last / must be a number")


@dataclass(frozen=True)
class Setting:
    """One declared setting."""

    name: str
    type: type
    default: Any
    description: str
    env: tuple[str, ...] = ()
    cli: str | None = None
    validator: Validator | None = None
    runtime: bool = False  # changeable at runtime through MI without a restart
    section: str = "service"
    octal: bool = False  # a file mode: strings are read as octal

    def parse(self, raw: Any) -> Any:
        """Convert raw (str from env/CLI, or TOML value) to the declared type and validate it.

        Raises ConfigError naming the setting.
        """
        try:
            if raw is None:
                raise ValueError("must have a value")
            if self.octal and isinstance(raw, str):
                # File modes are octal whatever their spelling: "0660", "660", "0o660".
                text = raw.strip().lower()
                value = int(text[2:] if text.startswith("0o") else text, 8)
            else:
                value = coerce(self.type, raw)
            if self.validator is not None:
                self.validator(value)
        except (ValueError, TypeError, OverflowError) as e:  # Overflow: a 400-digit float
            shown = repr(raw)
            if len(shown) > 60:  # an error must not echo a 30 KB value into replies and logs
                shown = shown[:57] + "..."
            raise ConfigError(f"{self.name}: {e} (got {shown})") from e
        return value


def coerce(typ: type, raw: Any) -> Any:
    """Convert raw (a string, or a TOML/JSON value) to typ: bool, int, float or str.

    The one definition of these types: settings, the live config and MI's number parameters
    use it. Raises ValueError saying what was expected (TypeError for another typ).
    """
    if raw is None:
        return None
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("must be a boolean")
    if typ is int:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError("must be an integer")
        if isinstance(raw, float) and not raw.is_integer():  # NaN and infinities are not
            raise ValueError("must be an integer")
        try:
            return int(raw)
        except (ValueError, OverflowError) as e:
            raise ValueError("must be an integer") from e
    if typ is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError("must be a number")
        try:
            v = float(raw)
        except (ValueError, OverflowError) as e:  # OverflowError: an int beyond any float
            raise ValueError("must be a number") from e
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v
    if typ is str:
        if not isinstance(raw, str):
            raise ValueError("must be a string")
        return raw
    raise TypeError(f"unsupported setting type {typ}")


_DEFAULT_WORKERS = os.cpu_count() or 2

SETTINGS: tuple[Setting, ...] = (
    # --- detection (runtime-changeable) ---
    Setting("threshold", int, 5,
            "Distinct A-numbers to one B-number within the window that mean masking.",
            env=("ACM_DETECTION_THRESHOLD",), cli="--threshold", validator=_range(2, 1000),
            runtime=True, section="detection"),
    Setting("window", float, 5.0, "Sliding window in seconds.",
            env=("ACM_DETECTION_WINDOW_SECONDS",), cli="--window", validator=_range(0.1, 3600),
            runtime=True, section="detection"),
    Setting("block_ttl", float, 0.0,
            "Seconds every A-number of a detection's window stays blocked (0 = blocking off).",
            env=("ACM_BLOCK_TTL",), cli="--block-ttl", validator=_range(0, 30 * 86400),
            runtime=True, section="detection"),
    Setting("mode", str, "block",
            "block: drop on detection; monitor: detect and alert but always allow.",
            env=("ACM_MODE",), cli="--mode", validator=_one_of("block", "monitor"),
            runtime=True, section="detection"),
    Setting("dedup_ttl", float, 32.0,
            "Seconds a Call-ID's reply is remembered (at least the window; 32 s = SIP Timer B).",
            env=("ACM_DEDUP_TTL",), cli="--dedup-ttl", validator=_range(1, 86400),
            runtime=True, section="detection"),
    Setting("cli_origin_rule", str, "enforce",
            "A national CLI on a route marked international: enforce (drop), monitor (allow, "
            "reason recorded) or off; carriers and routes may override it (docs/GATEWAY.md).",
            env=("ACM_CLI_ORIGIN_RULE",), cli="--cli-origin-rule",
            validator=_one_of("enforce", "monitor", "off"), runtime=True, section="detection"),
    Setting("fanout_threshold", int, 0,
            "Distinct B-numbers one A-number calls within fanout_window that open a fan-out "
            "alert (0 = off).",
            env=("ACM_FANOUT_THRESHOLD",), cli="--fanout-threshold", validator=_range(0, 100000),
            runtime=True, section="detection"),
    Setting("fanout_window", float, 60.0, "Fan-out sliding window in seconds.",
            env=("ACM_FANOUT_WINDOW",), cli="--fanout-window", validator=_range(1, 3600),
            runtime=True, section="detection"),
    Setting("default_country_code", str, "234", "Country code for national (0...) numbers.",
            env=("ACM_DEFAULT_COUNTRY_CODE",), cli="--country-code", section="detection"),
    # --- service ---
    Setting("endpoint", str, "ipc:///run/acm/acm.sock", "Request endpoint (ipc:// or tcp://).",
            env=("ACM_ENDPOINT",), cli="--endpoint", validator=_endpoint),
    Setting("workers", int, _DEFAULT_WORKERS, "Worker processes (default: number of cores).",
            env=("ACM_WORKERS",), cli="--workers", validator=_range(1, 256)),
    Setting("max_workers", int, max(64, _DEFAULT_WORKERS),
            "Most workers SIGTTIN grows the pool to (SIGTTOU stops at 1); at least `workers`.",
            env=("ACM_MAX_WORKERS",), cli="--max-workers", validator=_range(1, 256)),
    Setting("store", str, "",
            "Redis-protocol store URL (DragonflyDB); empty starts an embedded server.",
            env=("DRAGONFLY_URL", "ACM_STORE_URL"), cli="--store", validator=_store_url),
    Setting("partitions", int, 16,
            "Key partitions (hash tags) and durable streams; fixed for a deployment.",
            env=("ACM_PARTITIONS",), cli="--partitions", validator=_range(1, 1024)),
    Setting("store_timeout_ms", float, 40.0,
            "Worker's budget for a batch's store round trip, counted from the batch's "
            "arrival; keep it under the OpenSIPS client's ACM_TIMEOUT_MS (50) by the reply's "
            "way back.",
            env=("ACM_STORE_TIMEOUT_MS",), cli="--store-timeout-ms", validator=_range(1, 10000),
            runtime=True),
    Setting("max_batch", int, 64, "Most requests a worker decides in one store round trip.",
            env=("ACM_MAX_BATCH",), cli="--max-batch", validator=_range(1, 4096)),
    Setting("worker_io", str, "zmtp",
            "How workers talk to clients: zmtp (the worker thread speaks ZMTP 3 itself: no "
            "libzmq I/O thread hops) or libzmq (a ROUTER socket).",
            env=("ACM_WORKER_IO",), cli="--worker-io", validator=_one_of("zmtp", "libzmq"),
            section="service"),
    Setting("rebalance", bool, True,
            "A ZMTP worker serving over 1.25x the pool's mean request rate hands one of its "
            "connections to the least-loaded worker, and a retiring worker (SIGHUP roll, "
            "SIGTTOU) hands all of its connections to the others (worker_io = zmtp only).",
            env=("ACM_REBALANCE",), cli="--rebalance", section="service"),
    Setting("max_request_bytes", int, 4096, "Largest request frame accepted.",
            env=("ACM_MAX_REQUEST_BYTES",), cli="--max-request-bytes",
            validator=_range(64, 1 << 20)),
    Setting("graceful_timeout", float, 5.0, "Seconds a stopping worker may take to drain.",
            env=("ACM_GRACEFUL_TIMEOUT",), cli="--graceful-timeout", validator=_positive),
    Setting("config_poll_ms", float, 50.0, "How often an idle worker checks for a config change.",
            env=("ACM_CONFIG_POLL_MS",), cli="--config-poll-ms", validator=_range(1, 10000)),
    Setting("log_level", str, "INFO", "Log level.", env=("ACM_LOG_LEVEL",), cli="--log-level",
            validator=_one_of("DEBUG", "INFO", "WARNING", "ERROR"), runtime=True),
    Setting("log_json", bool, False, "Structured JSON logs.", env=("ACM_LOG_JSON",),
            cli="--log-json"),
    Setting("curve_server_key", str, "",
            "CurveZMQ key pair file of the request endpoint (the .key_secret of `acm keys "
            "generate`); set: every client must speak CURVE with its public key, and workers "
            "use libzmq I/O.",
            env=("ACM_CURVE_SERVER_KEY",), cli="--curve-server-key"),
    Setting("curve_client_keys", str, "",
            "Directory of the public keys (*.key) of the clients allowed in with CURVE; empty: "
            "any client that has the server's public key.",
            env=("ACM_CURVE_CLIENT_KEYS",), cli="--curve-client-keys"),
    Setting("allow_networks", str, "",
            "Client addresses/networks allowed to connect to a tcp:// endpoint, comma-separated "
            "(e.g. 10.1.0.0/24, 192.0.2.7); empty: any.",
            env=("ACM_ALLOW_NETWORKS",), cli="--allow-networks", validator=_networks),
    Setting("allow_insecure_tcp", bool, False,
            "Serve a tcp:// endpoint bound beyond loopback with neither CURVE nor allow_networks "
            "(a WARNING at every start).",
            env=("ACM_ALLOW_INSECURE_TCP",), cli="--allow-insecure-tcp"),
    Setting("ipc_mode", int, 0o660, "Permissions of the ipc socket file (octal, e.g. 0660).",
            env=("ACM_IPC_MODE",), validator=_range(0, 0o777), octal=True),
    # --- control plane (MI) ---
    Setting("mi_http", str, "127.0.0.1:8899",
            "MI JSON-RPC over HTTP (POST /mi) host:port; empty disables.",
            env=("ACM_MI_HTTP",), cli="--mi-http", section="control"),
    Setting("mi_datagram", str, "127.0.0.1:8898",
            "MI JSON-RPC over UDP datagrams host:port; empty disables.",
            env=("ACM_MI_DATAGRAM",), cli="--mi-datagram", section="control"),
    Setting("mi_http_timeout", float, 10.0,
            "Seconds an MI HTTP connection has to deliver one whole request (also the idle "
            "keep-alive limit); then it is closed.",
            env=("ACM_MI_HTTP_TIMEOUT",), validator=_range(0.1, 3600), section="control"),
    Setting("mi_http_max_connections", int, 64,
            "MI HTTP connections served at once; a new one closes the oldest that has not "
            "delivered its request, or gets 503 when all are busy.",
            env=("ACM_MI_HTTP_MAX_CONNECTIONS",), validator=_range(1, 10_000),
            section="control"),
    Setting("mi_token", str, "",
            "Admin token for MI; required when MI binds a non-loopback address.",
            env=("ACM_MI_TOKEN",), cli="--mi-token", section="control"),
    Setting("state_dir", str, "/tmp/acm/state",
            "Local state directory. MI overrides no longer live here (they are the "
            "deployment's: in the repository with database_url, else in the store); an old "
            "overrides.json is reported and ignored.",
            env=("ACM_STATE_DIR",), cli="--state-dir", section="control"),
    Setting("deployment", str, "default",
            "Name of the deployment this node belongs to: with database_url, its MI overrides "
            "(the live config every node shares) are the repository row of this name; nodes "
            "sharing a store must share it.",
            env=("ACM_DEPLOYMENT",), cli="--deployment", validator=_name, section="control"),
    # --- persistence (writer) ---
    Setting("database_url", str, "", "YugabyteDB/PostgreSQL URL (alerts, whitelist, audit).",
            env=("DATABASE_URL",), cli="--database-url", section="writer"),
    Setting("questdb_url", str, "", "QuestDB ILP/HTTP address or client conf string.",
            env=("QUESTDB_URL",), cli="--questdb-url", section="writer"),
    Setting("clickhouse_url", str, "", "ClickHouse server URL; empty uses embedded chdb.",
            env=("CLICKHOUSE_URL",), cli="--clickhouse-url", section="writer"),
    # --- actions and compliance ---
    Setting("opensips_mi_url", str, "",
            "OpenSIPS MI endpoint for ending attack calls (dlg_end_dlg): "
            "http://host:8888/mi (mi_http) or udp:host:port (mi_datagram); empty disables.",
            env=("ACM_OPENSIPS_MI_URL",), cli="--opensips-mi-url", section="actions"),
    Setting("opensips_mi_timeout", float, 2.0, "Seconds to wait for one OpenSIPS MI reply.",
            env=("ACM_OPENSIPS_MI_TIMEOUT",), cli="--opensips-mi-timeout",
            validator=_range(0.05, 60), section="actions"),
    Setting("disconnect_cause", int, 21,
            "Q.850 cause in the Reason header of the BYEs that end attack calls.",
            env=("ACM_DISCONNECT_CAUSE",), cli="--disconnect-cause", validator=_range(1, 127),
            section="actions"),
    Setting("webhook_url", str, "", "HTTP(S) URL that receives alert events; empty disables.",
            env=("ACM_WEBHOOK_URL",), cli="--webhook-url", section="actions"),
    Setting("webhook_secret", str, "",
            "Shared secret of the webhook's HMAC-SHA256 signature (required with webhook_url).",
            env=("ACM_WEBHOOK_SECRET",), section="actions"),
    Setting("webhook_timeout", float, 5.0, "Seconds one webhook delivery attempt may take.",
            env=("ACM_WEBHOOK_TIMEOUT",), cli="--webhook-timeout", validator=_range(0.1, 120),
            section="actions"),
    Setting("webhook_retries", int, 5, "Retries of a failed webhook delivery (jittered backoff).",
            env=("ACM_WEBHOOK_RETRIES",), cli="--webhook-retries", validator=_range(0, 50),
            section="actions"),
    Setting("webhook_backoff_max", float, 30.0, "Longest wait between webhook retries (s).",
            env=("ACM_WEBHOOK_BACKOFF_MAX",), cli="--webhook-backoff-max",
            validator=_range(0.01, 3600), section="actions"),
    Setting("actions_on_escalation", bool, True,
            "Notify again when an open alert escalates to a higher severity.",
            env=("ACM_ACTIONS_ON_ESCALATION",), cli="--actions-on-escalation",
            section="actions"),
    Setting("actions_max_age", float, 3600.0,
            "Alerts older than this (s, by stream time) are recorded as skipped, not acted on.",
            env=("ACM_ACTIONS_MAX_AGE",), cli="--actions-max-age", validator=_positive,
            section="actions"),
    Setting("actions_consumer", str, "",
            "Consumer name of this actions runner in its stream group (default: host name).",
            env=("ACM_ACTIONS_CONSUMER",), cli="--actions-consumer", section="actions"),
    Setting("ncc_reporting", bool, False,
            "Give every alert an NCC incident id (NCC-<operator_code>-<YYYYMMDD>-<seq>).",
            env=("ACM_NCC_REPORTING",), cli="--ncc-reporting", section="compliance"),
    Setting("operator_code", str, "OPR",
            "Operator code in NCC incident ids (2-16 letters/digits).",
            env=("ACM_OPERATOR_CODE",), cli="--operator-code", section="compliance"),
    Setting("report_timezone", str, "Africa/Lagos",
            "Time zone of report days and NCC incident-id dates (IANA name).",
            env=("ACM_REPORT_TIMEZONE",), cli="--report-timezone", section="compliance"),
    Setting("report_dir", str, "/var/lib/acm/reports", "Where `acm report daily` writes.",
            env=("ACM_REPORT_DIR",), cli="--report-dir", section="compliance"),
    Setting("writer_sinks", str, "auto",
            "Sinks this writer feeds, comma-separated (pg,questdb,clickhouse); auto: pg if "
            "database_url, questdb if questdb_url, clickhouse always (chdb if no URL). Trimming "
            "also waits for the sinks other writers feed: those with a URL setting.",
            env=("ACM_WRITER_SINKS",), cli="--sinks", section="writer"),
    Setting("writer_consumer", str, "",
            "Consumer name in the stream groups (default: host name); unique per writer.",
            env=("ACM_WRITER_CONSUMER",), cli="--consumer", section="writer"),
    Setting("writer_batch", int, 5000, "Most stream records the writer handles per batch.",
            env=("ACM_WRITER_BATCH",), cli="--batch", validator=_positive, section="writer"),
    Setting("writer_claim_idle_ms", int, 60000,
            "Take over records another writer left unacknowledged this long (ms).",
            env=("ACM_WRITER_CLAIM_IDLE_MS",), cli="--claim-idle-ms", validator=_positive,
            section="writer"),
    Setting("writer_backoff_max", float, 30.0,
            "Longest wait between retries of a down sink (s).",
            env=("ACM_WRITER_BACKOFF_MAX",), cli="--backoff-max", validator=_positive,
            section="writer"),
    Setting("writer_latency_wait_ms", float, 1500.0,
            "How long a fresh decision waits for its latency record before it is written "
            "without one (ms).",
            env=("ACM_WRITER_LATENCY_WAIT_MS",), cli="--latency-wait-ms", section="writer"),
    Setting("writer_trim_interval", float, 5.0,
            "Seconds between trims of the decision streams (below what every group acknowledged).",
            env=("ACM_WRITER_TRIM_INTERVAL",), cli="--trim-interval", validator=_positive,
            section="writer"),
    Setting("writer_group_max_idle", float, 3600.0,
            "Seconds a stream group may hold a backlog that nobody reads (no progress, no live "
            "writer of its sink) before it stops holding back trimming: reported in the log and "
            "as acm_stream_group_* metrics, and what is then trimmed unread is counted; 0: hold "
            "back for ever.",
            env=("ACM_WRITER_GROUP_MAX_IDLE",), cli="--group-max-idle", validator=_non_negative,
            section="writer"),
    Setting("writer_process_per_sink", bool, True,
            "Run each sink in its own process (uses more cores); off: one thread per sink.",
            env=("ACM_WRITER_PROCESS_PER_SINK",), cli="--process-per-sink", section="writer"),
    Setting("chdb_path", str, "/var/lib/acm/chdb",
            "Data directory of the embedded ClickHouse (chdb) when clickhouse_url is empty.",
            env=("ACM_CHDB_PATH",), cli="--chdb-path", section="writer"),
    Setting("whitelist_sync_interval", float, 10.0,
            "Seconds between whitelist reconciles (database -> store markers); 0 disables.",
            env=("ACM_WHITELIST_SYNC_INTERVAL",), cli="--whitelist-sync-interval",
            section="writer"),
    # --- REST API and console ---
    Setting("web_http", str, "127.0.0.1:8080",
            "REST API (/api/v1) and web console host:port; empty disables. A non-loopback "
            "address requires api_token.",
            env=("ACM_WEB_HTTP",), cli="--web-http", section="service"),
    Setting("api_token", str, "",
            "Bootstrap admin bearer token of the REST API (automation; at least 16 "
            "characters); required when web_http binds a non-loopback address.",
            env=("ACM_API_TOKEN",), cli="--api-token", section="service"),
    Setting("web_max_inflight", int, 1024,
            "Most call events the REST API has in flight to the worker pool at once; more "
            "are answered 503 at once.",
            env=("ACM_WEB_MAX_INFLIGHT",), cli="--web-max-inflight",
            validator=_range(1, 100000), section="service"),
    Setting("web_session_ttl", float, 43200.0,
            "Seconds a console login (session cookie or login token) stays valid.",
            env=("ACM_WEB_SESSION_TTL",), cli="--web-session-ttl", validator=_range(60, 30 * 86400),
            section="service"),
    # --- operations ---
    Setting("metrics_http", str, "127.0.0.1:9464",
            "Prometheus metrics endpoint host:port (GET /metrics); empty disables.",
            env=("ACM_METRICS_HTTP",), cli="--metrics-http"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
RUNTIME: frozenset[str] = frozenset(s.name for s in SETTINGS if s.runtime)
RUNTIME_TYPES: dict[str, type] = {s.name: s.type for s in SETTINGS if s.runtime}


@dataclass
class Settings:
    """Resolved settings; `source` says where each value came from."""

    values: dict[str, Any]
    source: dict[str, str] = field(default_factory=dict)
    config_file: Path | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def detection(self) -> dict[str, Any]:
        """Return the runtime-changeable detection values."""
        return {n: self.values[n] for n in sorted(RUNTIME) if n in self.values}


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file into {setting: raw value}; sections are flattened.

    Raises ConfigError on syntax errors or unknown settings.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start})") from e
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from e
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"{path}: unknown settings: {', '.join(unknown)}")
    return flat


def load(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve every setting: defaults < config file < env < CLI. Raises ConfigError."""
    env = os.environ if env is None else env
    values = {s.name: s.default for s in SETTINGS}
    source = {s.name: "default" for s in SETTINGS}
    path = Path(config_file) if config_file else None
    if path is None and env.get("ACM_CONFIG"):
        path = Path(env["ACM_CONFIG"])
    if path is not None and path.exists():
        for name, raw in read_config_file(path).items():
            values[name] = BY_NAME[name].parse(raw)
            source[name] = f"file:{path}"
    elif path is not None and config_file:
        raise ConfigError(f"config file {path} does not exist")
    for s in SETTINGS:
        for var in s.env:
            # An empty value counts for strings (it disables an endpoint such as mi_http);
            # for other types an empty variable is treated as unset.
            if var in env and (env[var] != "" or s.type is str):
                values[s.name] = s.parse(env[var])
                source[s.name] = f"env:{var}"
                break
    for name, raw in (cli or {}).items():
        if raw is None:
            continue
        values[name] = BY_NAME[name].parse(raw)
        source[name] = "cli"
    validate_combination(values)
    if values["workers"] > values["max_workers"]:
        raise ConfigError(f"workers ({values['workers']}) must not exceed max_workers "
                          f"({values['max_workers']})")
    return Settings(values=values, source=source, config_file=path)


def validate_combination(values: Mapping[str, Any]) -> None:
    """Check rules spanning several settings. Raises ConfigError."""
    if values["dedup_ttl"] < values["window"]:
        raise ConfigError(f"dedup_ttl ({values['dedup_ttl']:g}) must be at least "
                          f"the window ({values['window']:g})")


def markdown_table(commands: Mapping[str, list[str]] | None = None) -> str:
    """Render the settings reference as a Markdown table.

    commands maps a CLI flag to the `acm` commands that accept it (`acm_module.cli.
    flag_commands()`), so the table says where each flag works.
    """
    rows = [
        "| setting | type | default | env | CLI flag (commands) | runtime (MI) | description |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        default = {"workers": "number of cores", "max_workers": "max(64, number of cores)"
                   }.get(s.name, repr(s.default))
        if s.name == "ipc_mode":
            default = oct(s.default)
        flag = "-"
        if s.cli:
            where = (commands or {}).get(s.cli)
            flag = f"`{s.cli}`" + (f" ({', '.join(where)})" if where else "")
        rows.append(
            f"| `{s.name}` | {s.type.__name__} | `{default}` | "
            f"{', '.join(f'`{e}`' for e in s.env) or '-'} | {flag} | "
            f"{'yes' if s.runtime else 'no'} | {s.description} |"
        )
    return "\n".join(rows) + "\n"
