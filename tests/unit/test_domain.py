"""Domain rules that need no server: numbers, severity bands, alert lifecycle, call events."""

from __future__ import annotations

import pytest

from acm_module.domain.alerts import AlertStatus, FraudAlert, Severity
from acm_module.domain.events import CallEvent, InvalidCallEvent
from acm_module.domain.numbers import InvalidNumber, normalise, parse

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(("raw", "expected"), [
    ("+2348031234567", "+2348031234567"),
    ("2348031234567", "+2348031234567"),
    ("08031234567", "+2348031234567"),
    ("002348031234567", "+2348031234567"),
    ("0044 20 7946 0958", "+442079460958"),
    ("sip:08031234567@10.0.0.1:5060", "+2348031234567"),
    ("sips:+2348031234567@carrier.example;user=phone", "+2348031234567"),
    ("tel:+234-803-123-4567;phone-context=+234", "+2348031234567"),
    ("sip:0803.123.4567;npdi@host", "+2348031234567"),
    ("(0803) 123-4567", "+2348031234567"),
    ("  +234 803 123 4567  ", "+2348031234567"),
    ("<sip:+2348031234567@h>", "+2348031234567"),
    ("+12025550123", "+12025550123"),
    ("anonymous", None), ("unknown", None), ("", None), ("   ", None),
    ("sip:anonymous@anonymous.invalid", None), ("0803123456a", None), ("+234abc4567890", None),
    ("1234567", None),            # 7 digits: too short
    ("+1234567890123456", None),  # 16 digits: too long
    ("+0123456789", None),        # country codes never start with 0
    ("000123456789", None), ("+", None), ("++2348031234567", None), ("*123#", None),
    ("٠٨٠٣١٢٣٤٥٦٧", None),        # non-ASCII digits are not dialable digits
])
def test_normalise(raw: str, expected: str | None) -> None:
    assert normalise(raw) == expected


def test_normalise_with_another_country_code() -> None:
    assert normalise("07911123456", "44") == "+447911123456"


def test_parse_raises_on_a_non_number() -> None:
    assert parse("08031234567") == "+2348031234567"
    with pytest.raises(InvalidNumber, match="anonymous"):
        parse("anonymous")


@pytest.mark.parametrize(("n", "band"), [(0, "LOW"), (4, "LOW"), (5, "HIGH"), (6, "HIGH"),
                                         (7, "CRITICAL"), (500, "CRITICAL")])
def test_severity_bands(n: int, band: str) -> None:
    assert Severity.of(n) == band


def test_alert_lifecycle() -> None:
    from datetime import UTC, datetime

    a = FraudAlert("id", "+2348031234567", ["+2348030000001"] * 7, 7, 5000, datetime.now(UTC))
    assert a.severity is Severity.CRITICAL and a.status is AlertStatus.NEW
    assert a.can_move_to(AlertStatus.INVESTIGATING)
    a.status = AlertStatus.RESOLVED
    assert not a.can_move_to(AlertStatus.NEW)
    assert not a.can_move_to(AlertStatus.FALSE_POSITIVE)


def test_call_event_validation() -> None:
    e = CallEvent.create("abc", "anonymous", "08031234567", 12.5, "192.0.2.1", "T1")
    assert e.a_number is None and e.b_number == "+2348031234567"
    with pytest.raises(InvalidCallEvent, match="call_id"):
        CallEvent.create("", "08030000001", "08031234567", 1.0)
    with pytest.raises(InvalidCallEvent, match="B-number"):
        CallEvent.create("x", "08030000001", "unknown", 1.0)
    with pytest.raises(InvalidCallEvent, match="ts"):
        CallEvent.create("x", "08030000001", "08031234567", float("inf"))
    with pytest.raises(InvalidCallEvent, match="source_ip"):
        CallEvent.create("x", "08030000001", "08031234567", 1.0, "not-an-ip")
