"""Domain rules that need no server: numbers, severity bands, the alert lifecycle."""

from __future__ import annotations

import pytest

from acm_module.domain.alerts import TRANSITIONS, AlertStatus
from acm_module.engine import hotpath
from acm_module.engine.types import severity_of

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
    assert hotpath.normalise(raw, "234") == expected


def test_normalise_with_another_country_code() -> None:
    assert hotpath.normalise("07911123456", "44") == "+447911123456"


@pytest.mark.parametrize(("n", "band"), [(0, "LOW"), (4, "LOW"), (5, "HIGH"), (6, "HIGH"),
                                         (7, "CRITICAL"), (500, "CRITICAL")])
def test_severity_bands(n: int, band: str) -> None:
    assert severity_of(n) == band


def test_alert_lifecycle() -> None:
    assert AlertStatus.INVESTIGATING in TRANSITIONS[AlertStatus.NEW]
    assert AlertStatus.NEW not in TRANSITIONS[AlertStatus.INVESTIGATING]
    assert not TRANSITIONS[AlertStatus.RESOLVED]
    assert not TRANSITIONS[AlertStatus.FALSE_POSITIVE]
    assert set(TRANSITIONS) == set(AlertStatus)
