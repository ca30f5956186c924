"""What every MI command domain shares: the declarations (`Command`, `Param`), the parameter
parsers, binding a request's params to a declaration, and the state the commands work on
(`Plane`: the settings, one store connection, the repository and the lock that serialises them).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from acm_module.control import jsonrpc
from acm_module.control.jsonrpc import bad_params, param_str
from acm_module.control.repository import ControlRepository, StoreRepository
from acm_module.core import numbers, registry
from acm_module.core import settings as settings_mod
from acm_module.core.redis import LazyRedis
from acm_module.core.types import SEVERITIES

log = logging.getLogger("acm.control")

EVENT_RELOAD = "E_ACM_RELOAD"


# -- parameter parsing ---------------------------------------------------------------------
MAX_INT = 2**53  # no MI integer is larger; JSON numbers beyond it are not exact anyway
MAX_TIME_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z


def p_int(v: Any) -> int:
    n: int = settings_mod.coerce(int, v)  # the settings' integers: the same rules and words
    if abs(n) > MAX_INT:
        raise ValueError(f"must be an integer within ±{MAX_INT}")
    return n


def p_float(v: Any) -> float:
    f: float = settings_mod.coerce(float, v)
    return f


def p_time_ms(v: Any) -> int:
    """Parse epoch seconds or ISO 8601 (naive = UTC) into epoch milliseconds."""
    what = "must be epoch seconds or an ISO 8601 time, from 1970 to 9999"
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError(what)
    try:
        secs: float | None = float(v)
    except OverflowError as e:  # an integer beyond any float
        raise ValueError(what) from e
    except ValueError:
        secs = None
    if secs is not None:
        ms = secs * 1000
    else:
        try:
            dt = datetime.fromisoformat(jsonrpc.valid_text(str(v).strip()))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            ms = dt.timestamp() * 1000
        except (ValueError, OverflowError, OSError) as e:  # 0001-01-01 with a +hh offset
            raise ValueError(what) from e
    # Before 1970 is no time of this service's (and a negative stream id to the store).
    if not (math.isfinite(ms) and 0 <= ms < MAX_TIME_MS):
        raise ValueError(what)
    return int(ms)


def p_severity(v: Any) -> str:
    s = param_str(v).strip().upper()
    if s not in SEVERITIES:
        raise ValueError(f"must be one of {', '.join(SEVERITIES)}")
    return s


def p_limit(v: Any) -> int:
    n = p_int(v)
    if not 1 <= n <= 10_000:
        raise ValueError("must be between 1 and 10000")
    return n


def p_id(v: Any) -> str:
    s = param_str(v).strip()
    if not registry.ID_RE.fullmatch(s):
        raise ValueError(f"must be 1 to {registry.MAX_ID} characters of A-Z a-z 0-9 . _ -")
    return s


def p_list(v: Any) -> list[str]:
    """A list, or a comma-separated string (`addresses=198.51.100.7,203.0.113.0/24`)."""
    items = v if isinstance(v, list) else param_str(v).split(",")
    return [param_str(x).strip() for x in items if not isinstance(x, str) or x.strip()]


def p_rule(v: Any) -> str | None:
    """cli_rule: enforce, monitor, off; null (or none, inherit, "") inherits."""
    s = param_str(v).strip().lower()
    return None if s in ("", "null", "none", "inherit") else s


def p_number(v: Any) -> str:
    """A phone number: bind() normalises it with the deployment's country code."""
    raise AssertionError("p_number marks a parameter; bind() parses it")  # never called


# -- declarations --------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """A declared command parameter."""

    name: str
    parse: Callable[[Any], Any]
    required: bool = False
    default: Any = None


@dataclass(frozen=True)
class Command:
    """A declared MI command."""

    name: str
    handler: Callable[..., Any]
    admin: bool
    help: str
    params: tuple[Param, ...] = ()
    settings_params: bool = False  # takes setting=value pairs (acm_set, E_ACM_RELOAD)


# Declares the commands of one domain, or of another room (given the Plane they run on).
CommandFactory = Callable[["Plane"], Iterable[Command]]


# -- the state the commands share ----------------------------------------------------------
def open_repository(settings: Any, conn: Any) -> ControlRepository:
    """Return the PostgreSQL repository when configured and installed, else the store one
    (on conn: a redis-py client, or LazyRedis)."""
    if getattr(settings, "database_url", ""):
        try:
            from acm_module.control.pg_repository import (  # type: ignore[import-not-found]
                PostgresControlRepository,
            )
        except ImportError:
            log.warning("database_url is set but acm_module.control.pg_repository is not "
                        "available: whitelist/audit/alerts use the store")
        else:
            repo: ControlRepository = PostgresControlRepository(settings)
            return repo
    return StoreRepository(conn, settings.partitions)


class Plane:
    """The state behind the MI endpoint: one store connection, one repository, one lock."""

    def __init__(self, settings: Any, repo: ControlRepository | None = None) -> None:
        self.settings = settings
        # Opened on first use: the control plane starts while the store is down.
        self.conn = LazyRedis(settings.store, timeout=1.0, connect_timeout=1.0)
        self.repo = repo if repo is not None else open_repository(settings, self.conn)
        # Commands are rare; one lock serialises store access (LazyRedis opens its client
        # once) and makes each read-modify-write atomic within this process.
        self._lock = threading.RLock()


class Domain:
    """A group of commands on the shared state; `declare()` returns their declarations."""

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self.settings = plane.settings

    def declare(self) -> list[Command]:
        """Return the command declarations."""
        raise NotImplementedError


def now_ms() -> int:
    return int(time.time() * 1000)


# -- binding a request's params ------------------------------------------------------------
def _split_pair(item: Any) -> tuple[str, Any]:
    if not isinstance(item, str) or "=" not in item:
        raise bad_params(f"expected name=value, got {item!r}")
    name, _, value = item.partition("=")
    return name.strip(), value.strip()


def named(cmd: Command, params: dict[str, Any] | list[Any]) -> dict[str, Any]:
    """Turn positional params into named ones (name=value items, else declaration order)."""
    if isinstance(params, dict):
        return dict(params)
    if cmd.name == EVENT_RELOAD and len(params) == 1 and isinstance(params[0], str) \
            and params[0].lstrip().startswith(("{", "[")):
        return {"": params[0]}  # raise_event's nameless JSON parameter, array form
    pairs = bool(params) and all(isinstance(p, str) and "=" in p for p in params)
    if cmd.settings_params or pairs:
        out = dict(_split_pair(p) for p in params)
        if len(out) != len(params):
            raise bad_params("a parameter is given more than once")
        return out
    if len(params) > len(cmd.params):
        raise bad_params(f"{cmd.name} takes at most {len(cmd.params)} positional params")
    return {p.name: v for p, v in zip(cmd.params, params, strict=False)}


def bind(cmd: Command, given: dict[str, Any], country_code: str) -> dict[str, Any]:
    """Validate named params against the declaration (numbers are normalised with
    country_code). Raises MIError(-32602)."""
    if cmd.settings_params:
        return given
    known = {p.name: p for p in cmd.params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
        raise bad_params(f"unknown parameter(s) {', '.join(unknown)} for {cmd.name} "
                         f"(allowed: {allowed})")
    args: dict[str, Any] = {}
    for p in cmd.params:
        if p.name not in given or given[p.name] is None:
            if p.required:
                raise bad_params(f"{cmd.name}: missing required parameter {p.name!r}")
            if p.default is not None:
                args[p.name] = p.default
            continue
        raw = given[p.name]
        if p.parse is p_number:
            args[p.name] = _number(p.name, raw, country_code)
            continue
        try:
            args[p.name] = p.parse(raw)
        except (ValueError, TypeError, OverflowError) as e:
            raise bad_params(f"{p.name}: {e} (got {shown(raw)})") from e
    return args


def shown(raw: Any) -> str:
    """Return a value's repr for an error message, cut short (an error must not echo 30 KB)."""
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(name: str, raw: Any, country_code: str) -> str:
    if not isinstance(raw, str | int) or isinstance(raw, bool) or (
            isinstance(raw, str) and not raw.isprintable()):
        raise bad_params(f"{name}: must be a phone number (got {shown(raw)})")
    n = numbers.normalise(str(raw), country_code)
    if n is None:
        raise bad_params(f"{name}: {shown(raw)} is not a phone number")
    return n
