"""The carrier registry document: validate() checks and normalises it per docs/GATEWAY.md."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from acm_module.core import registry
from acm_module.core.errors import ConfigError

pytestmark = pytest.mark.timeout(10)


def doc() -> dict[str, Any]:
    """The example of docs/GATEWAY.md plus a second carrier."""
    return {
        "carriers": [
            {"id": "glo-ig", "name": "Globacom IGW", "licence": "international_gateway",
             "contact": "noc@example.ng", "cli_rule": None},
            {"id": "mtn", "name": "MTN", "licence": "mno"},
        ],
        "gateways": [
            {"id": "glo-lag-1", "carrier_id": "glo-ig",
             "addresses": ["198.51.100.7", "203.0.113.0/24"], "trunks": ["tg-101"],
             "rate_limit_cps": 50, "rate_window_s": 1.0},
            {"id": "mtn-1", "carrier_id": "mtn", "addresses": ["2001:db8::1"]},
        ],
        "routes": [
            {"id": "glo-intl", "carrier_id": "glo-ig", "gateway_id": None, "trunk": None,
             "direction": "international", "cli_rule": None},
            {"id": "glo-lag-nat", "carrier_id": "glo-ig", "gateway_id": "glo-lag-1",
             "trunk": "tg-101", "direction": "national", "cli_rule": "monitor"},
        ],
    }


def test_the_documented_example_is_valid_and_normalised() -> None:
    out = registry.validate(doc())
    assert [c["id"] for c in out["carriers"]] == ["glo-ig", "mtn"]
    assert out["carriers"][1] == {"id": "mtn", "name": "MTN", "licence": "mno",
                                  "contact": None, "cli_rule": None}
    assert out["gateways"][1] == {"id": "mtn-1", "carrier_id": "mtn",
                                  "addresses": ["2001:db8::1"], "trunks": [],
                                  "rate_limit_cps": 0, "rate_window_s": 1.0}
    assert out["routes"][0]["gateway_id"] is None
    # Idempotent, and JSON round-trips unchanged (what publish() stores).
    assert registry.validate(out) == out
    assert registry.validate(json.loads(json.dumps(out))) == out
    assert registry.validate({}) == registry.EMPTY
    assert registry.validate({"carriers": None}) == registry.EMPTY


def test_normalisation() -> None:
    d = doc()
    d["carriers"].reverse()
    d["carriers"][0].update(licence=" PNL ", name="  MTN  ", contact="", cli_rule="Enforce")
    d["gateways"][0]["addresses"] = ["203.0.113.9/24", "198.51.100.7/32", "198.51.100.7",
                                     "::ffff:192.0.2.1", "2001:DB8:0:0::/64"]
    d["gateways"][0]["trunks"] = [" tg-101 ", "tg-101", "tg-102"]
    d["gateways"][0]["rate_window_s"] = 2
    d["gateways"][0]["rate_limit_cps"] = 10.0
    d["routes"][1]["direction"] = "NATIONAL"
    out = registry.validate(d)
    assert [c["id"] for c in out["carriers"]] == ["glo-ig", "mtn"]  # sorted by id
    assert out["carriers"][1] == {"id": "mtn", "name": "MTN", "licence": "pnl",
                                  "contact": None, "cli_rule": "enforce"}
    g = out["gateways"][0]
    assert g["addresses"] == ["203.0.113.0/24", "198.51.100.7", "192.0.2.1", "2001:db8::/64"]
    assert g["trunks"] == ["tg-101", "tg-102"]
    assert g["rate_window_s"] == 2.0 and isinstance(g["rate_window_s"], float)
    assert g["rate_limit_cps"] == 10 and isinstance(g["rate_limit_cps"], int)
    assert out["routes"][1]["direction"] == "national"


_DELETE = object()


def _set(path: str, value: Any) -> dict[str, Any]:
    """doc() with one field changed: path is "<kind>.<index>.<field>" (_DELETE deletes it)."""
    d = copy.deepcopy(doc())
    kind, index, field = path.split(".")
    if value is _DELETE:
        del d[kind][int(index)][field]
    else:
        d[kind][int(index)][field] = value
    return d


@pytest.mark.parametrize(("path", "value", "message"), [
    ("carriers.0.id", "", "carrier #1: id '' must be 1 to 64 characters"),
    ("carriers.0.id", "a" * 65, "must be 1 to 64"),
    ("carriers.0.id", "glo ig", "carrier #1: id 'glo ig'"),
    ("carriers.0.id", "glo/ig", "A-Z a-z 0-9 . _ -"),
    ("carriers.0.id", 7, "carrier #1: id 7"),
    ("carriers.1.id", "glo-ig", "carrier 'glo-ig': duplicate id"),
    ("carriers.0.name", _DELETE, "carrier 'glo-ig': name: required"),
    ("carriers.0.name", "x" * 201, "name: must be a string of at most 200"),
    ("carriers.0.contact", "x" * 201, "carrier 'glo-ig': contact"),
    ("carriers.0.contact", 5, "contact: must be a string"),
    ("carriers.0.licence", "isp", "carrier 'glo-ig': licence: 'isp' is not one of "
                                  "international_gateway, interconnect_clearinghouse, pnl"),
    ("carriers.0.licence", None, "licence: None is not one of"),
    ("carriers.0.cli_rule", "drop", "cli_rule: 'drop' is not one of enforce, monitor, off or "
                                    "null"),
    ("carriers.0.colour", "red", "carrier 'glo-ig': unknown field(s) colour"),
    ("gateways.0.id", "x" * 65, "gateway #1: id"),
    ("gateways.1.id", "glo-lag-1", "gateway 'glo-lag-1': duplicate id"),
    ("gateways.0.carrier_id", "nope", "gateway 'glo-lag-1': carrier_id: no carrier 'nope'"),
    ("gateways.0.carrier_id", None, "carrier_id: no carrier None"),
    ("gateways.0.addresses", ["300.1.2.3"], "gateway 'glo-lag-1': addresses: '300.1.2.3' is "
                                            "not an IP address or network"),
    ("gateways.0.addresses", ["10.0.0.0/33"], "'10.0.0.0/33' is not an IP"),
    ("gateways.0.addresses", "198.51.100.7", "addresses: must be a list"),
    ("gateways.0.addresses", [""], "addresses: '' must be a string of 1 to 128"),
    ("gateways.0.addresses", [42], "addresses: 42"),
    ("gateways.1.addresses", ["203.0.113.0/24"], "gateway 'mtn-1': address 203.0.113.0/24 is "
                                                 "already listed by gateway 'glo-lag-1'"),
    ("gateways.1.addresses", ["203.0.113.5/24"], "address 203.0.113.0/24 is already listed"),
    ("gateways.1.addresses", ["198.51.100.7/32"], "address 198.51.100.7 is already listed"),
    ("gateways.1.addresses", ["::ffff:198.51.100.7"], "address 198.51.100.7 is already"),
    ("gateways.1.addresses", [], "gateway 'mtn-1': needs at least one address or trunk"),
    ("gateways.1.trunks", ["tg-101"], "gateway 'mtn-1': trunk 'tg-101' is already listed by "
                                      "gateway 'glo-lag-1'"),
    ("gateways.0.trunks", ["t" * 129], "trunks: 'ttt"),
    ("gateways.0.trunks", "tg-101", "trunks: must be a list"),
    ("gateways.0.rate_limit_cps", -1, "rate_limit_cps: must be an integer from 0 to 100000"),
    ("gateways.0.rate_limit_cps", 100_001, "rate_limit_cps: must be an integer"),
    ("gateways.0.rate_limit_cps", 1.5, "rate_limit_cps: must be an integer"),
    ("gateways.0.rate_limit_cps", "50", "rate_limit_cps: must be an integer"),
    ("gateways.0.rate_limit_cps", True, "rate_limit_cps: must be an integer"),
    ("gateways.0.rate_window_s", 0.09, "rate_window_s: must be a number of seconds from 0.1 "
                                       "to 60.0"),
    ("gateways.0.rate_window_s", 60.5, "rate_window_s"),
    ("gateways.0.rate_window_s", float("nan"), "rate_window_s"),
    ("gateways.0.rate_window_s", "1", "rate_window_s"),
    ("gateways.0.name", "x", "gateway 'glo-lag-1': unknown field(s) name"),
    ("routes.0.id", "", "route #1: id"),
    ("routes.1.id", "glo-intl", "route 'glo-intl': duplicate id"),
    ("routes.0.carrier_id", "nope", "route 'glo-intl': carrier_id: no carrier 'nope'"),
    ("routes.0.gateway_id", "nope", "route 'glo-intl': gateway_id: no gateway 'nope'"),
    ("routes.0.gateway_id", "mtn-1", "route 'glo-intl': gateway 'mtn-1' belongs to carrier "
                                     "'mtn', not 'glo-ig'"),
    ("routes.0.direction", "outbound", "route 'glo-intl': direction: 'outbound' is not one of "
                                       "international, national"),
    ("routes.0.direction", _DELETE, "direction: None is not one of"),
    ("routes.0.cli_rule", "block", "route 'glo-intl': cli_rule"),
    ("routes.0.trunk", "", "route 'glo-intl': trunk: '' must be a string"),
    ("routes.1.gateway_id", None, "route 'glo-lag-nat': route 'glo-intl' already has"),
    ("routes.1.trunk", None, "route 'glo-lag-nat': route 'glo-intl' already has"),
])
def test_invalid_entries_are_named(path: str, value: Any, message: str) -> None:
    d = _set(path, value)
    if path == "routes.1.gateway_id":
        d["routes"][1]["trunk"] = None
    if path == "routes.1.trunk":
        d["routes"][1]["gateway_id"] = None
    d["routes"][1]["direction"] = "international"
    d["routes"][1]["cli_rule"] = None
    with pytest.raises(ConfigError) as e:
        registry.validate(d)
    assert message in str(e.value)


@pytest.mark.parametrize(("bad", "message"), [
    ([], "registry: must be an object"),
    ({"carriers": {}}, "registry: carriers must be a list"),
    ({"carriers": ["x"]}, "carrier #1: must be an object"),
    ({"version": 3}, "registry: unknown member(s) 'version'"),
])
def test_invalid_documents(bad: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        registry.validate(bad)
    assert message in str(e.value)


def test_nested_networks_of_two_gateways_are_fine() -> None:
    d = doc()
    d["gateways"][1]["addresses"] = ["203.0.113.128/25", "198.51.100.8"]
    out = registry.validate(d)
    assert out["gateways"][1]["addresses"] == ["203.0.113.128/25", "198.51.100.8"]


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        registry.validate({"routes": [{"id": "r", "carrier_id": "x", "direction": "national"}]})
