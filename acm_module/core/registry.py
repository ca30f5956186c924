"""The carrier registry as the hot path sees it: one JSON document in the store.

The control plane owns the system of record (YugabyteDB) and publishes the whole registry here
on every change; workers poll `ver` with the live config and reload `doc` when it moves.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from typing import Any

from acm_module.core.errors import ConfigError, StoreReplyError
from acm_module.core.liveconfig import Store
from acm_module.core.types import RespError

REGISTRY_KEY = "{acm.cfg}:gw"

EMPTY: dict[str, list[Any]] = {"carriers": [], "gateways": [], "routes": []}

# Replace the document and move the version on, in one atomic step. The version is at least
# the publisher's clock in ms, so a store that was flushed (or a fresh Dragonfly) never hands
# out a version a worker still holds for another document.
_PUBLISH = """
local ver = math.max(tonumber(redis.call('HGET', KEYS[1], 'ver') or '0') + 1, tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'ver', string.format('%.0f', ver), 'doc', ARGV[1])
return ver
"""


def publish(conn: Store, doc: dict[str, Any]) -> int:
    """Publish a (validated) registry document; return its new version."""
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    now_ms = int(time.time() * 1000)
    return int(conn.execute_command("EVAL", _PUBLISH, 1, REGISTRY_KEY, body, now_ms))  # type: ignore[arg-type]


def read(conn: Store) -> tuple[int, dict[str, Any]]:
    """Return (version, document); (0, EMPTY) when nothing was ever published."""
    r = conn.execute_command("HMGET", REGISTRY_KEY, "ver", "doc")
    assert isinstance(r, list)
    if r[0] is None or r[1] is None:
        return 0, {k: [] for k in EMPTY}
    return int(r[0]), json.loads(r[1])


def version(conn: Store) -> int:
    """Return the published version (0 when none)."""
    return parse_version(conn.execute_command("HGET", REGISTRY_KEY, "ver"))


def parse_version(r: Any) -> int:
    """Parse the reply of `HGET REGISTRY_KEY ver` (workers pipeline it with their config poll)."""
    if isinstance(r, RespError):
        raise StoreReplyError(r.message)
    return 0 if r is None else int(r)  # type: ignore[arg-type]


# -- validation (docs/GATEWAY.md, "The registry") --------------------------------------------
LICENCES = ("international_gateway", "interconnect_clearinghouse", "pnl", "leo", "mno", "other")
DIRECTIONS = ("international", "national")
CLI_RULES = ("enforce", "monitor", "off")
MAX_ID = 64
MAX_TEXT = 200  # name, contact
MAX_TRUNK = 128
MAX_CPS = 100_000
WINDOW_MIN_S, WINDOW_MAX_S, WINDOW_DEFAULT_S = 0.1, 60.0, 1.0

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,%d}" % MAX_ID)
_KINDS = {"carriers": "carrier", "gateways": "gateway", "routes": "route"}
_FIELDS = {
    "carrier": ("id", "name", "licence", "contact", "cli_rule"),
    "gateway": ("id", "carrier_id", "addresses", "trunks", "rate_limit_cps", "rate_window_s"),
    "route": ("id", "carrier_id", "gateway_id", "trunk", "direction", "cli_rule"),
}


def validate(doc: Any) -> dict[str, list[dict[str, Any]]]:
    """Check a whole registry document; return it normalised (every field present, addresses
    canonical, each kind sorted by id). Raises ConfigError naming the offending entry: of two
    entries in conflict, the later in the document (where an edit appends the new one)."""
    if not isinstance(doc, dict):
        raise ConfigError("registry: must be an object with carriers, gateways and routes")
    unknown = sorted(set(doc) - set(_KINDS))
    if unknown:
        raise ConfigError(f"registry: unknown member(s) {', '.join(map(repr, unknown))} "
                          "(allowed: carriers, gateways, routes)")
    out: dict[str, list[dict[str, Any]]] = {}
    for plural, kind in _KINDS.items():
        raw = doc.get(plural)
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise ConfigError(f"registry: {plural} must be a list")
        entries: dict[str, dict[str, Any]] = {}
        for i, e in enumerate(raw):
            entry = _check_fields(e, kind, i)
            if entry["id"] in entries:
                raise ConfigError(f"{kind} {entry['id']!r}: duplicate id")
            entries[entry["id"]] = entry
        out[plural] = list(entries.values())
    carriers = {c["id"]: _carrier(c) for c in out["carriers"]}
    gateways = {g["id"]: _gateway(g, carriers) for g in out["gateways"]}
    _no_shared(gateways)
    routes = {r["id"]: _route(r, carriers, gateways) for r in out["routes"]}
    selectors: dict[tuple[str, str | None, str | None], str] = {}
    for rid, r in routes.items():
        sel = (r["carrier_id"], r["gateway_id"], r["trunk"])
        if sel in selectors:
            raise ConfigError(
                f"route {rid!r}: route {selectors[sel]!r} already has carrier "
                f"{sel[0]!r}, gateway {sel[1]!r} and trunk {sel[2]!r}")
        selectors[sel] = rid
    return {"carriers": _by_id(carriers), "gateways": _by_id(gateways), "routes": _by_id(routes)}


def _by_id(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [entries[k] for k in sorted(entries)]


def _check_fields(e: Any, kind: str, index: int) -> dict[str, Any]:
    """Check an entry's shape and id; return a copy."""
    if not isinstance(e, dict):
        raise ConfigError(f"{kind} #{index + 1}: must be an object")
    eid = e.get("id")
    if not isinstance(eid, str) or not ID_RE.fullmatch(eid):
        raise ConfigError(f"{kind} #{index + 1}: id {eid!r} must be 1 to {MAX_ID} characters "
                          "of A-Z a-z 0-9 . _ -")
    unknown = sorted(set(e) - set(_FIELDS[kind]))
    if unknown:
        raise ConfigError(f"{kind} {eid!r}: unknown field(s) {', '.join(unknown)} "
                          f"(allowed: {', '.join(_FIELDS[kind])})")
    return dict(e)


def _carrier(c: dict[str, Any]) -> dict[str, Any]:
    what = f"carrier {c['id']!r}"
    return {"id": c["id"],
            "name": _text(c.get("name"), f"{what}: name", required=True),
            "licence": _choice(c.get("licence"), f"{what}: licence", LICENCES),
            "contact": _text(c.get("contact"), f"{what}: contact"),
            "cli_rule": _choice(c.get("cli_rule"), f"{what}: cli_rule", CLI_RULES, null=True)}


def _gateway(g: dict[str, Any], carriers: dict[str, Any]) -> dict[str, Any]:
    what = f"gateway {g['id']!r}"
    addresses = _addresses(g.get("addresses"), f"{what}: addresses")
    trunks = _strings(g.get("trunks"), f"{what}: trunks")
    if not addresses and not trunks:
        raise ConfigError(f"{what}: needs at least one address or trunk")
    return {"id": g["id"],
            "carrier_id": _ref(g.get("carrier_id"), f"{what}: carrier_id", "carrier", carriers),
            "addresses": addresses, "trunks": trunks,
            "rate_limit_cps": _int(g.get("rate_limit_cps", 0), f"{what}: rate_limit_cps",
                                   0, MAX_CPS),
            "rate_window_s": _seconds(g.get("rate_window_s"), f"{what}: rate_window_s")}


def _route(r: dict[str, Any], carriers: dict[str, Any], gateways: dict[str, Any]
           ) -> dict[str, Any]:
    what = f"route {r['id']!r}"
    cid = _ref(r.get("carrier_id"), f"{what}: carrier_id", "carrier", carriers)
    gid = r.get("gateway_id")
    if gid is not None:
        gid = _ref(gid, f"{what}: gateway_id", "gateway", gateways)
        if gateways[gid]["carrier_id"] != cid:
            raise ConfigError(f"{what}: gateway {gid!r} belongs to carrier "
                              f"{gateways[gid]['carrier_id']!r}, not {cid!r}")
    trunk = r.get("trunk")
    if trunk is not None:
        trunk = _strings([trunk], f"{what}: trunk")[0]
    return {"id": r["id"], "carrier_id": cid, "gateway_id": gid, "trunk": trunk,
            "direction": _choice(r.get("direction"), f"{what}: direction", DIRECTIONS),
            "cli_rule": _choice(r.get("cli_rule"), f"{what}: cli_rule", CLI_RULES, null=True)}


def _no_shared(gateways: dict[str, dict[str, Any]]) -> None:
    """An address/network and a trunk belong to one gateway at most."""
    owners: dict[Any, str] = {}
    for gid, g in gateways.items():
        for item in [ipaddress.ip_network(a) for a in g["addresses"]] + [
                ("trunk", t) for t in g["trunks"]]:
            other = owners.setdefault(item, gid)
            if other != gid:
                label = f"trunk {item[1]!r}" if isinstance(item, tuple) else \
                    f"address {_canonical(item)}"
                raise ConfigError(f"gateway {gid!r}: {label} is already listed by gateway "
                                  f"{other!r}")


def _ref(v: Any, what: str, kind: str, known: dict[str, Any]) -> str:
    if not isinstance(v, str) or v not in known:
        raise ConfigError(f"{what}: no {kind} {v!r}")
    return v


def _text(v: Any, what: str, required: bool = False) -> str | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise ConfigError(f"{what}: required")
        return None
    if not isinstance(v, str) or len(v.strip()) > MAX_TEXT:
        raise ConfigError(f"{what}: must be a string of at most {MAX_TEXT} characters")
    return v.strip()


def _choice(v: Any, what: str, allowed: tuple[str, ...], null: bool = False) -> str | None:
    if v is None and null:
        return None
    s = v.strip().lower() if isinstance(v, str) else v
    if s not in allowed:
        choices = ", ".join(allowed) + (" or null" if null else "")
        raise ConfigError(f"{what}: {v!r} is not one of {choices}")
    return str(s)


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{what}: must be an integer from {lo} to {hi} (got {v!r})")
    return v


def _seconds(v: Any, what: str) -> float:
    if v is None:
        return WINDOW_DEFAULT_S
    if isinstance(v, bool) or not isinstance(v, int | float) or not (
            WINDOW_MIN_S <= v <= WINDOW_MAX_S):
        raise ConfigError(f"{what}: must be a number of seconds from {WINDOW_MIN_S} to "
                          f"{WINDOW_MAX_S} (got {v!r})")
    return float(v)


def _strings(v: Any, what: str) -> list[str]:
    """A list of 1-128 character strings, duplicates dropped (first kept)."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise ConfigError(f"{what}: must be a list")
    out: list[str] = []
    for s in v:
        if not isinstance(s, str) or not 0 < len(s.strip()) <= MAX_TRUNK:
            raise ConfigError(f"{what}: {s!r} must be a string of 1 to {MAX_TRUNK} characters")
        if s.strip() not in out:
            out.append(s.strip())
    return out


def _addresses(v: Any, what: str) -> list[str]:
    """IP addresses and CIDR networks, canonical (a /32 or /128 is an address)."""
    out: list[str] = []
    for s in _strings(v, what):
        try:
            net = ipaddress.ip_network(s, strict=False)
        except ValueError as e:
            raise ConfigError(f"{what}: {s!r} is not an IP address or network") from e
        c = _canonical(net)
        if c not in out:
            out.append(c)
    return out


def _canonical(net: Any) -> str:
    if net.num_addresses != 1:
        return str(net)
    ip = net.network_address
    mapped = getattr(ip, "ipv4_mapped", None)  # the hot path matches ::ffff:a.b.c.d as a.b.c.d
    return str(mapped if mapped is not None else ip)
