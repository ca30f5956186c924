"""Phone numbers of the shared kernel: E.164 normalisation (the same code as the hot path)."""

from __future__ import annotations

from acm_module.engine import hotpath


class InvalidNumber(ValueError):
    """A string is not a phone number."""


def normalise(raw: str | None, country_code: str = "234") -> str | None:
    """Return raw as E.164 (+digits), or None when it is not a phone number."""
    if raw is None:
        return None
    return hotpath.normalise(raw, country_code)


def parse(raw: str, country_code: str = "234") -> str:
    """Return raw as E.164; raise InvalidNumber when it is not a phone number."""
    n = normalise(raw, country_code)
    if n is None:
        raise InvalidNumber(f"not a phone number: {raw!r}")
    return n
