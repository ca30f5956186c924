"""Secrets out of URLs: the one masking every log line, error message and printed setting uses.

Imports nothing from acm_module, so the store client at the bottom and the logging setup both
use it.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://[user]:password@ -- the password runs to the last @ before the path, so one holding
# an unencoded @ is masked whole.
_URL_PASSWORD = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s/]+@")
_URL_USERINFO = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/]+@")


def redact_url(text: str, userinfo: bool = False) -> str:
    """Return text with the password of every URL in it masked.

    `redis://:pw@h/0` -> `redis://:***@h/0`. With userinfo, the user name goes too
    (`scheme://***@host`), for output anyone may read.
    """
    if userinfo:
        return _URL_USERINFO.sub(lambda m: m.group("pre") + MASK + "@", text)
    return _URL_PASSWORD.sub(lambda m: m.group("pre") + MASK + "@", text)
