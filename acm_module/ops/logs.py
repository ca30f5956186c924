"""Structured logging that never prints secrets.

`setup_logging(level, json_logs)` installs one stderr handler on the root logger: plain text, or
one JSON object per line (`log_json`). Both formats pass through the same redaction:

* passwords in URLs (`redis://:pw@host`, `postgresql://u:pw@h/db`) become `***`;
* `password=…`, `token=…`, `secret=…`, `api_key=…`, `Authorization: Bearer …` values become `***`
  (DSNs, QuestDB conf strings, HTTP headers);
* every registered secret (`register_secret()`; `setup_logging` registers the passwords and
  tokens of the settings it is given or finds in the environment) is replaced wherever it shows;
* phone numbers, in every spelling the normaliser accepts (`+CC…`, `00CC…`, national `0…`, bare
  digits that start with the home country code, with spaces, dashes, dots or parentheses, inside
  `sip:`/`tel:` URIs), are masked in records above DEBUG, and the `a`/`b`/`a_number`/`b_number`
  extras are dropped there: subscriber numbers are personal data, kept for debugging sessions
  only. Identifiers are left whole: a run of digits that touches a letter or is joined to one by
  `-`/`.` (UUIDs such as alert ids, hex ids, Call-IDs, NCC ids) is not a number, nor are IPv4
  addresses, decimals, or bare digits without the country code (times, stream ids).

`apply_log_level(level)` changes the level at runtime. The MI command `acm_log_level` calls it in
the control process; other processes (workers, the metrics sidecar) call it when they see a new
`log_level` in the live config (`{acm.cfg}:detect`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any, TextIO
from urllib.parse import unquote, urlparse

from acm_module.core.redaction import MASK, redact_url

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
NUMBER_FIELDS = frozenset({"a", "b", "a_number", "b_number", "caller", "called"})
# Settings whose values are secrets or URLs that may carry one.
SECRET_SETTINGS = ("store", "database_url", "questdb_url", "clickhouse_url", "mi_token",
                   "webhook_secret", "api_token")

_KEY_VALUE = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|mi_token"
    r"|auth_token)\b[\"']?\s*[=:]\s*[\"']?)(?P<val>[^\s\"',;&}]+)", re.IGNORECASE)
_BEARER = re.compile(r"(?P<key>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
# A run of digits in any spelling the normaliser accepts: groups joined by up to two of
# space . - ( ), optionally after + or (. Whether it is a number is decided in _mask_numbers.
_RUN = re.compile(r"(?:\+|\(\+?)?\d(?:[ .()-]{0,2}\d)*\)?")
_NOT_A_NUMBER = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}|\d+\.\d+")  # IPv4, a decimal
_NON_DIGITS = re.compile(r"\D")
_home_codes: tuple[str, ...] = ("234",)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_HANDLER_FLAG = "_acm_ops_handler"
_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


def register_secret(value: str | None) -> None:
    """Redact `value` from every log record from now on (values under 4 characters ignored)."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def secrets_of(values: Mapping[str, Any]) -> list[str]:
    """Return the secrets in settings values: URL passwords and tokens."""
    out: list[str] = []
    for name in SECRET_SETTINGS:
        v = values.get(name)
        if not isinstance(v, str) or not v:
            continue
        if "://" in v:
            with contextlib.suppress(ValueError):
                pw = urlparse(v).password
                if pw:
                    out += [pw, unquote(pw)]
        else:
            for m in _KEY_VALUE.finditer(v):
                out.append(m.group("val"))
            if name in ("mi_token", "api_token"):
                out.append(v)
    return out


def redact(text: str, mask_numbers: bool = False) -> str:
    """Return text with secrets (and, if asked, phone numbers) masked."""
    text = redact_url(text)
    text = _KEY_VALUE.sub(lambda m: m.group("key") + MASK, text)
    text = _BEARER.sub(lambda m: m.group("key") + MASK, text)
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for s in known:
        if s in text:
            text = text.replace(s, MASK)
    if mask_numbers:
        text = _RUN.sub(_mask_run, text)
    return text


def set_home_country_code(code: str) -> None:
    """Mask bare digit runs (no + or 0) that start with this country code from now on."""
    global _home_codes
    if code.isdigit():
        _home_codes = (code,)


def _is_number(run: str) -> bool:
    """Say whether a run (separators included) spells a phone number."""
    body = run.lstrip("(+ ")
    d = _NON_DIGITS.sub("", run)
    if run.startswith(("+", "(+")):
        cc = d
    elif body.startswith("00"):
        cc = d[2:]
    elif body.startswith("0"):
        cc = _home_codes[0] + d[1:]
    elif d.startswith(_home_codes):  # bare: only with the home code (times are bare digits)
        cc = d
    else:
        return False
    return 8 <= len(cc) <= 15 and cc[0] != "0"


def _mask_one(run: str) -> str:
    """Mask the digits of a number but the first 3 of the number proper and the last 2: enough
    to tell numbers apart, not to dial them. Separators and the +/0/00 prefix stay."""
    d = _NON_DIGITS.sub("", run)
    body = run.lstrip("(+ ")
    keep_head = 3 + (2 if body.startswith("00") else 1 if body.startswith("0") else 0)
    if run.startswith(("+", "(+")):
        keep_head = 3
    keep_tail = len(d) - 2
    out, i = [], 0
    for ch in run:
        if ch.isdigit():
            out.append(ch if i < keep_head or i >= keep_tail else "*")
            i += 1
        else:
            out.append(ch)
    return "".join(out)


def _mask_run(m: re.Match[str]) -> str:
    run, text, start, end = m.group(), m.string, m.start(), m.end()
    # Part of an identifier: touching a letter/underscore, or joined to one by - or . .
    def word(i: int) -> bool:
        return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")

    def joined(i: int, step: int) -> bool:
        return word(i) or (0 <= i < len(text) and text[i] in "-." and word(i + step))

    if joined(start - 1, -1) or joined(end, 1):
        return run
    if _NOT_A_NUMBER.fullmatch(run):
        return run
    if _is_number(run):
        return _mask_one(run)
    # Several things side by side ("08031234567 1800000000000"): take the longest number that
    # starts at each space-separated piece.
    pieces = re.split(r"( +)", run)
    words = pieces[::2]
    out: list[str] = []
    i = 0
    while i < len(words):
        # A number has at most 15 digits, so at most 15 pieces: bounds the work on long runs.
        for j in range(min(len(words), i + 15), i, -1):
            cand = "".join(pieces[2 * i:2 * j - 1])
            if not _NOT_A_NUMBER.fullmatch(cand) and _is_number(cand):
                out.append(_mask_one(cand))
                break
        else:
            j = i + 1
            out.append(words[i])
        if j < len(words):
            out.append(pieces[2 * j - 1])
        i = j
    return "".join(out)


def _redact_value(v: Any, mask_numbers: bool) -> Any:
    if isinstance(v, str):
        return redact(v, mask_numbers)
    if isinstance(v, bool | int | float) or v is None:
        return v
    if isinstance(v, Mapping):
        return {str(k): _redact_value(x, mask_numbers) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_redact_value(x, mask_numbers) for x in v]
    return redact(str(v), mask_numbers)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, msg, exc, and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        mask = record.levelno > logging.DEBUG
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": redact(record.getMessage(), mask),
        }
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info), mask)
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info), mask)
        for k, v in vars(record).items():
            if k in _STD_ATTRS or k.startswith("_") or k in out:
                continue
            if mask and k in NUMBER_FIELDS:
                continue
            out[k] = _redact_value(v, mask)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic one-line format, redacted the same way as JSON."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), record.levelno > logging.DEBUG)


def setup_logging(level: str = "INFO", json_logs: bool = False,
                  secrets: Iterable[str] | None = None, stream: TextIO | None = None,
                  country_code: str | None = None) -> None:
    """Configure the root logger: one stderr handler, JSON or text, redacting secrets.

    `secrets`: values to redact; None takes them from the environment variables that carry
    URLs and tokens. `country_code`: the home code of bare numbers; None takes
    `default_country_code` from the environment (234 without it). Calling it again replaces the
    handler it installed. Raises ValueError for an unknown level.
    """
    if secrets is None:
        secrets = secrets_of(_secret_settings_from_env())
    if country_code is None:
        country_code = _settings_from_env(("default_country_code",)).get(
            "default_country_code", "234")
    set_home_country_code(country_code)
    for s in secrets:
        register_secret(s)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_FLAG, False) or isinstance(h, logging.StreamHandler):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    setattr(handler, _HANDLER_FLAG, True)
    root.addHandler(handler)
    apply_log_level(level)


def _secret_settings_from_env() -> dict[str, str]:
    return _settings_from_env(SECRET_SETTINGS)


def _settings_from_env(names: Iterable[str]) -> dict[str, str]:
    from acm_module.settings import BY_NAME

    out: dict[str, str] = {}
    for name in names:
        setting = BY_NAME.get(name)
        for var in setting.env if setting else ():
            if os.environ.get(var):
                out[name] = os.environ[var]
                break
    return out


def apply_log_level(level: str) -> str:
    """Set the root log level at runtime (MI `acm_log_level`); return the previous level name.

    Raises ValueError for a name other than DEBUG, INFO, WARNING, ERROR, CRITICAL.
    """
    name = str(level).strip().upper()
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    root = logging.getLogger()
    old = logging.getLevelName(root.level)
    root.setLevel(name)
    if old != name:
        logging.getLogger("acm.logs").info("log level %s -> %s", old, name)
    return old
