"""Phone numbers: E.164 normalisation and the key partition (FNV-1a), for every room.

The pure-Python twin of ext/numbers.pyx (the decision path's compiled copy) and its readable
reference; off the decision path every room uses this module; the severity bands live in
core/types.py, shared by both twins.
"""

from __future__ import annotations

__all__ = ["normalise", "partition_of"]

_SEPARATORS = frozenset(" -.()\t")


def normalise(raw: str, country_code: str = "234") -> str | None:
    """Return `raw` as E.164 ("+<digits>"), or None when it is not a phone number.

    Accepts +CC..., CC..., national 0..., international 00..., sip:/sips:/tel: URIs (user part
    before '@', ';params' dropped), spaces, dashes, dots and parentheses. A number has 8 to 15
    digits and its country code does not start with 0.
    """
    s = raw.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1].strip()
    low = s[:5].lower()
    if low.startswith("sip:") or low.startswith("tel:"):
        s = s[4:]
    elif low.startswith("sips:"):
        s = s[5:]
    at = s.find("@")
    if at >= 0:
        s = s[:at]
    semi = s.find(";")
    if semi >= 0:
        s = s[:semi]
    kept = [ch for ch in s if ch not in _SEPARATORS]
    t = "".join(kept)
    if t.startswith("+"):
        d = t[1:]
    elif t.startswith("00"):
        d = t[2:]
    elif t.startswith("0"):
        d = country_code + t[1:]
    else:
        d = t
    n = len(d)
    if n < 8 or n > 15:
        return None
    for ch in d:
        if ch < "0" or ch > "9":
            return None
    if d[0] == "0":
        return None
    return "+" + d


def partition_of(number: str, partitions: int) -> int:
    """Return the key partition of a normalised number (FNV-1a 32 of its UTF-8 bytes)."""
    h = 0x811C9DC5
    for byte in number.encode():
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h % partitions
