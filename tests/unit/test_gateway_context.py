"""Attribution and rule resolution of the gateway context (docs/GATEWAY.md), without I/O."""

from __future__ import annotations

import pytest

from acm_module.decide.gateway.context import GatewayContext

pytestmark = pytest.mark.timeout(30)


def _doc() -> dict:
    return {
        "carriers": [
            {"id": "igw", "name": "IGW", "licence": "international_gateway", "contact": "",
             "cli_rule": None},
            {"id": "leo", "name": "LEO", "licence": "leo", "contact": "", "cli_rule": "off"},
        ],
        "gateways": [
            {"id": "igw-wide", "carrier_id": "igw", "addresses": ["10.0.0.0/8"], "trunks": [],
             "rate_limit_cps": 0, "rate_window_s": 1.0},
            {"id": "igw-lag", "carrier_id": "igw", "addresses": ["10.1.0.0/16", "2001:db8::/32"],
             "trunks": ["tg-7"], "rate_limit_cps": 3, "rate_window_s": 2.0},
            {"id": "leo-1", "carrier_id": "leo", "addresses": ["10.1.2.3"], "trunks": [],
             "rate_limit_cps": 0, "rate_window_s": 1.0},
        ],
        "routes": [
            {"id": "igw-default", "carrier_id": "igw", "gateway_id": None, "trunk": None,
             "direction": "national", "cli_rule": None},
            {"id": "igw-intl-trunk", "carrier_id": "igw", "gateway_id": None, "trunk": "intl",
             "direction": "international", "cli_rule": None},
            {"id": "igw-lag-intl", "carrier_id": "igw", "gateway_id": "igw-lag", "trunk": None,
             "direction": "international", "cli_rule": "monitor"},
            {"id": "leo-intl", "carrier_id": "leo", "gateway_id": None, "trunk": None,
             "direction": "international", "cli_rule": None},
        ],
    }


def test_longest_prefix_exact_address_and_trunk_select_the_gateway() -> None:
    ctx = GatewayContext(_doc())
    assert ctx.resolve("10.200.0.1", "").gateway == "igw-wide"
    assert ctx.resolve("10.1.9.9", "").gateway == "igw-lag"  # /16 beats /8
    assert ctx.resolve("10.1.2.3", "").gateway == "leo-1"  # an exact address beats networks
    assert ctx.resolve("::ffff:10.1.2.3", "").gateway == "leo-1"  # IPv4-mapped IPv6
    assert ctx.resolve("[2001:db8::5]", "").gateway == "igw-lag"
    assert ctx.resolve("192.0.2.1", "tg-7").gateway == "igw-lag"  # the trunk wins
    assert ctx.resolve("192.0.2.1", "") is None
    assert ctx.resolve("", "") is None
    assert ctx.resolve("not-an-ip", "nope") is None


def test_the_most_specific_route_and_the_inherited_cli_rule() -> None:
    ctx = GatewayContext(_doc(), cli_origin_rule="enforce")
    wide = ctx.resolve("10.200.0.1", "")
    assert (wide.route, wide.intl, wide.cli_rule) == ("igw-default", False, "enforce")
    by_trunk = ctx.resolve("10.200.0.1", "intl")
    assert (by_trunk.route, by_trunk.intl) == ("igw-intl-trunk", True)
    lag = ctx.resolve("10.1.9.9", "intl")  # (gateway) beats (trunk)
    assert (lag.route, lag.cli_rule) == ("igw-lag-intl", "monitor")
    leo = ctx.resolve("10.1.2.3", "")
    assert (leo.route, leo.cli_rule) == ("leo-intl", "off")  # the carrier's rule


def test_cli_origin_pre_verdicts() -> None:
    ctx = GatewayContext(_doc(), cli_origin_rule="enforce")
    national, foreign = "+2348031234567", "+447700900123"
    intl = ctx.resolve("10.200.0.1", "intl")
    assert ctx.pre_verdict(intl, national) == b"drop|national_cli_on_international_route"
    assert ctx.pre_verdict(intl, foreign) == b""
    assert ctx.pre_verdict(ctx.resolve("10.1.9.9", ""), national) == (
        b"monitor|national_cli_on_international_route")
    assert ctx.pre_verdict(ctx.resolve("10.1.2.3", ""), national) == b""  # rule off
    assert ctx.pre_verdict(ctx.resolve("10.200.0.1", ""), national) == b""  # national route
    assert ctx.pre_verdict(None, national) == b""
    off = GatewayContext(_doc(), cli_origin_rule="off")
    assert off.pre_verdict(off.resolve("10.200.0.1", "intl"), national) == b""
    us = GatewayContext(_doc(), country_code="1")
    assert us.pre_verdict(us.resolve("10.200.0.1", "intl"), national) == b""


def test_rate_limit_parameters() -> None:
    ctx = GatewayContext(_doc())
    lag = ctx.resolve("10.1.9.9", "")
    assert lag.rl_key == b"{acm.gw.igw-lag}:rl"
    assert (lag.rl_max, lag.rl_window_ms) == (6, 2000)  # 3 cps over 2 s
    assert ctx.resolve("10.200.0.1", "").rl_key is None


def test_an_empty_registry_needs_no_context() -> None:
    assert not GatewayContext({"carriers": [], "gateways": [], "routes": []}).active
    assert GatewayContext({}, fanout_threshold=3).active
    assert GatewayContext(_doc()).active
