"""The gateway context on the hot path: attribution, the CLI-origin rule, rate limits, fan-out.

Shared by both hot-path twins (ext/decider.pyx and decide/engine/decider_py.py), which see it
through the interface acm_module.core.types.GatewayContext declares and call it per request
only while a registry is loaded or fan-out is on; without either the decider skips it and behaves
exactly as before. Everything here is pure computation plus command encoding: the
worker owns the I/O. See docs/GATEWAY.md.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any

from acm_module.decide.engine import hotpath

CLI_REASON = "national_cli_on_international_route"
RATE_REASON = "rate_limited"
PRE_RATE_LIMITED = b"drop|" + RATE_REASON.encode()
_PRE_CLI = {"enforce": b"drop|" + CLI_REASON.encode(), "monitor": b"monitor|" + CLI_REASON.encode()}
_CACHE_MAX = 65536  # (src_ip, trunk) pairs remembered; cleared when full


@dataclass(slots=True, eq=False)
class Attribution:
    """Where one call came from, and what the registry says about that place."""

    carrier: str
    gateway: str
    route: str
    intl: bool
    cli_rule: str
    rl_key: bytes | None = field(repr=False)
    rl_max: int
    rl_window_ms: int


def rate_limit_key(gateway: str) -> str:
    """Return the store key of a gateway's sliding window (its own hash tag, one key)."""
    return "{acm.gw.%s}:rl" % gateway


class GatewayContext:
    """A loaded registry document plus the rule settings, ready for per-request lookups."""

    def __init__(self, doc: dict[str, Any], *, cli_origin_rule: str = "enforce",
                 fanout_threshold: int = 0, fanout_window: float = 60.0,
                 country_code: str = "234", partitions: int = 16,
                 rl_sha: str = "", fanout_sha: str = "") -> None:
        self.cli_origin_rule = cli_origin_rule
        self.fanout_threshold = int(fanout_threshold)
        self.fanout_window_ms = int(round(fanout_window * 1000))
        self.national_prefix = "+" + country_code
        self.partitions = partitions
        self.rl_sha = rl_sha.encode()
        self.fanout_sha = fanout_sha.encode()
        self._carriers = {c["id"]: c for c in doc.get("carriers", [])}
        self._gateways = {g["id"]: g for g in doc.get("gateways", [])}
        self._by_trunk: dict[str, str] = {}
        exact: dict[str, str] = {}
        nets: list[tuple[int, Any, str]] = []
        for g in doc.get("gateways", []):
            for t in g.get("trunks") or ():
                self._by_trunk.setdefault(t, g["id"])
            for a in g.get("addresses") or ():
                net = ipaddress.ip_network(a, strict=False)
                if net.num_addresses == 1:
                    exact[str(net.network_address)] = g["id"]
                else:
                    nets.append((net.prefixlen, net, g["id"]))
        nets.sort(key=lambda x: -x[0])  # longest prefix first
        self._exact = exact
        self._nets = nets
        self._routes: dict[tuple[str, str | None, str | None], dict[str, Any]] = {}
        for r in doc.get("routes", []):
            self._routes[(r["carrier_id"], r.get("gateway_id"), r.get("trunk"))] = r
        self._cache: dict[tuple[str, str], Attribution | None] = {}
        # Nothing to look up: the twins skip the context per request.
        self.resolves = bool(self._gateways)
        self.fanout = self.fanout_threshold > 0

    @property
    def active(self) -> bool:
        """Whether a decider needs this context at all."""
        return self.resolves or self.fanout

    # -- attribution -------------------------------------------------------------------------
    def resolve(self, src_ip: str, trunk: str) -> Attribution | None:
        """Return the attribution of a request's source address and trunk (cached)."""
        key = (src_ip, trunk)
        try:
            return self._cache[key]
        except KeyError:
            pass
        att = self._resolve(src_ip, trunk)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = att
        return att

    def _gateway_of(self, src_ip: str, trunk: str) -> str | None:
        if trunk and trunk in self._by_trunk:
            return self._by_trunk[trunk]
        if not src_ip:
            return None
        try:
            ip = ipaddress.ip_address(src_ip.strip("[]"))
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        gid = self._exact.get(str(ip))
        if gid is not None:
            return gid
        for _, net, g in self._nets:
            if ip.version == net.version and ip in net:
                return g
        return None

    def _resolve(self, src_ip: str, trunk: str) -> Attribution | None:
        gid = self._gateway_of(src_ip, trunk)
        if gid is None:
            return None
        g = self._gateways[gid]
        cid = g["carrier_id"]
        tr = trunk or None
        routes = self._routes
        route = (routes.get((cid, gid, tr)) if tr else None) or routes.get((cid, gid, None)) \
            or (routes.get((cid, None, tr)) if tr else None) or routes.get((cid, None, None))
        carrier = self._carriers.get(cid, {})
        rule = (route or {}).get("cli_rule") or carrier.get("cli_rule") or self.cli_origin_rule
        cps = int(g.get("rate_limit_cps") or 0)
        window_s = float(g.get("rate_window_s") or 1.0)
        return Attribution(
            carrier=cid, gateway=gid, route=(route or {}).get("id", ""),
            intl=bool(route and route.get("direction") == "international"), cli_rule=rule,
            rl_key=rate_limit_key(gid).encode() if cps > 0 else None,
            rl_max=max(1, math.ceil(cps * window_s - 1e-9)) if cps > 0 else 0,
            rl_window_ms=int(round(window_s * 1000)))

    # -- rules -------------------------------------------------------------------------------
    def pre_verdict(self, att: Attribution | None, a: str) -> bytes:
        """Return decide.lua's ARGV[8] for a call: b"" or b"<drop|monitor>|<reason>"."""
        if att is None or not att.intl or att.cli_rule == "off":
            return b""
        if not a.startswith(self.national_prefix):
            return b""
        return _PRE_CLI.get(att.cli_rule, b"")

    def rate_command(self, att: Attribution, call_id: str, now_ms: int) -> bytes:
        """Return the EVALSHA of ratelimit.lua for one call (now_ms: the receive clock)."""
        return hotpath.encode_command(b"EVALSHA", self.rl_sha, b"1", att.rl_key or b"", now_ms,
                                      att.rl_window_ms, att.rl_max, call_id)

    def fanout_command(self, call_id: str, a: str, b: str, ts_ms: int, alert_id: str,
                       state_ttl_ms: int, att: Attribution | None) -> bytes:
        """Return the EVALSHA of fanout.lua for one call (keys in the A-number's partition)."""
        tag = b"{acm.%d}:" % hotpath.partition_of(a, self.partitions)
        ab = a.encode()
        window = self.fanout_window_ms
        return hotpath.encode_command(
            b"EVALSHA", self.fanout_sha, b"5", tag + b"fw:" + ab, tag + b"fe:" + ab,
            tag + b"fea:" + ab, tag + b"s", tag + b"n", call_id, ab, b, ts_ms, window,
            self.fanout_threshold, alert_id, max(state_ttl_ms, 2 * window + 1000),
            att.carrier if att is not None else b"", att.gateway if att is not None else b"")
