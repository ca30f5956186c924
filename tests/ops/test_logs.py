"""Structured logs: JSON that parses, no secrets in any format, numbers only at DEBUG."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from acm_module.core import logs
from tests.support.servers import Service, free_port, unavailable, wait_port

pytestmark = pytest.mark.timeout(60)

PASSWORD = "s3cr3t-Pa55word"


@pytest.fixture
def capture() -> Iterator[io.StringIO]:
    """Route the root logger to a buffer in JSON; restore the previous handlers afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    buf = io.StringIO()
    logs.setup_logging("INFO", json_logs=True, secrets=[PASSWORD], stream=buf)
    try:
        yield buf
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in buf.getvalue().splitlines() if x]


def test_json_lines_parse_and_carry_the_fields(capture: io.StringIO) -> None:
    log = logging.getLogger("acm.test")
    log.info("worker %d up", 3, extra={"worker": 3, "store": f"redis://:{PASSWORD}@h:1/0"})
    try:
        raise ValueError(f"connect redis://u:{PASSWORD}@db:6379/0 failed")
    except ValueError:
        log.exception("boom")
    out = [x for x in lines(capture) if x["logger"] == "acm.test"]
    assert out[0]["msg"] == "worker 3 up" and out[0]["level"] == "INFO"
    assert out[0]["logger"] == "acm.test" and out[0]["worker"] == 3 and out[0]["pid"] > 0
    assert out[0]["ts"].endswith("Z")
    assert out[0]["store"] == "redis://:***@h:1/0"
    assert "ValueError" in out[1]["exc"]
    assert PASSWORD not in capture.getvalue()


def test_secrets_are_redacted_in_every_shape() -> None:
    logs.register_secret("standalone-token-xyz")
    cases = {
        "postgresql://acm:hunter2@yb:5433/acm": "postgresql://acm:***@yb:5433/acm",
        "http::addr=q:9000;username=admin;password=qdbpw;": "password=***;",
        "Authorization: Bearer abc.def.ghi": "Bearer ***",
        "mi_token=abcd1234 ok": "mi_token=*** ok",
        "the token is standalone-token-xyz": "the token is ***",
    }
    for raw, expected in cases.items():
        assert expected in logs.redact(raw), raw


def test_a_url_password_is_masked_whole_in_logs_errors_and_acm_settings() -> None:
    from acm_module.core.storeurl import safe_url

    raw = "redis://admin:p@ss-w0rd@store.example:6379/0"
    for shown in (logs.redact(f"connect {raw} failed"), safe_url(raw)):
        assert "p@ss" not in shown and "ss-w0rd" not in shown, shown
        assert "redis://admin:***@store.example:6379/0" in shown, shown
    env = {**os.environ, "ACM_STORE_URL": raw}
    r = subprocess.run([sys.executable, "-m", "acm_module.cli", "settings"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("store = "))
    assert "ss-w0rd" not in line and "store.example:6379" in line, line


def test_phone_numbers_only_at_debug(capture: io.StringIO) -> None:
    log = logging.getLogger("acm.test")
    logs.apply_log_level("DEBUG")
    log.debug("call from +2348031234567 to 08039999999", extra={"b_number": "+2348039999999"})
    log.info("call from +2348031234567 to 08039999999 at 1800000000000",
             extra={"b_number": "+2348039999999"})
    debug, info = [x for x in lines(capture) if x["logger"] == "acm.test"]
    assert "+2348031234567" in debug["msg"] and debug["b_number"] == "+2348039999999"
    assert "+2348031234567" not in info["msg"] and "08039999999" not in info["msg"]
    assert "+234********67" in info["msg"] and "0803*****99" in info["msg"]
    assert "1800000000000" in info["msg"]  # timestamps are not numbers to mask
    assert "b_number" not in info


def test_apply_log_level_at_runtime(capture: io.StringIO) -> None:
    log = logging.getLogger("acm.test")
    assert logs.apply_log_level("warning") == "INFO"
    log.info("hidden")
    log.warning("shown")
    assert [x["msg"] for x in lines(capture) if x["logger"] == "acm.test"] == ["shown"]
    with pytest.raises(ValueError):
        logs.apply_log_level("LOUD")
    assert logs.apply_log_level("INFO") == "WARNING"


@pytest.mark.server
@pytest.mark.timeout(90)
def test_live_service_json_logs_never_show_the_store_password(zctx) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed")
    port = free_port()
    d = tempfile.mkdtemp(prefix="acm-redis-pw-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", d, "--requirepass", PASSWORD],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    svc = Service(url, workers=2, extra_env={"ACM_LOG_JSON": "1", "ACM_LOG_LEVEL": "DEBUG",
                                             "ACM_METRICS_HTTP": ""})
    try:
        assert wait_port(port)
        svc.start()
        proc.terminate()  # the workers now log store failures, URL included
        proc.wait(5)
        from acm_module.decide.client import Client

        c = Client(svc.endpoint, timeout=2.0, context=zctx)
        try:
            r = c.decide("pw-1", "+2348031000001", "+2348039999999", ts=1.8e9)
            assert r["error"] == "store_unavailable"
        finally:
            c.close()
        svc.stop()
        text = svc.read_log()
    finally:
        svc.cleanup()
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        shutil.rmtree(d, ignore_errors=True)
    assert PASSWORD not in text
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line (acm serve must log through "
                        f"acm_module.core.logs.setup_logging when log_json is on): {line!r}")
    assert any(r["level"] == "WARNING" and "store" in r["msg"] for r in records)
    assert {r["pid"] for r in records} >= {records[0]["pid"]}


# Every spelling the normaliser accepts (acm_module/decide/engine/hotpath_py.py normalise), each
# with the digits that must not survive in a log line above DEBUG.
NUMBER_SPELLINGS = [
    "+2348031234567", "2348031234567", "08031234567", "002348031234567",
    "+234 803 123 4567", "+234-803-123-4567", "+234.803.123.4567", "+234 (803) 123-4567",
    "0803 123 4567", "0803-123-4567", "(0803) 123 4567", "00 234 803 123 4567",
    "sip:+2348031234567@10.0.0.1", "sips:08031234567@sbc.example.com;transport=tls",
    "tel:+234-803-123-4567;phone-context=+234", "<sip:2348031234567@10.0.0.1>",
    "+447700900123", "+12025550123", "00447700900123", "+23480312345",
]


def test_every_accepted_number_spelling_is_masked_and_identifiers_are_not() -> None:
    from acm_module.core.keys import alert_prefix
    from acm_module.decide.engine import hotpath

    for raw in NUMBER_SPELLINGS:
        e164 = hotpath.normalise(raw, "234")
        assert e164, raw  # the list holds numbers the normaliser accepts
        line = logs.redact(f"call from {raw} rejected", mask_numbers=True)
        assert e164[-9:-2] not in re.sub(r"[ .()-]", "", line), (raw, line)
        assert line.startswith("call from ") and line.endswith(" rejected"), line
    # Alert ids as the workers make them (a random prefix + a 12-hex-digit counter: mostly
    # digits), other identifiers, and times: all unchanged.
    ids = [f"{alert_prefix()}-{n:012x}" for n in (*range(0, 3000, 7), 10**9, 2**47)]
    ids += ["4dd57a26-7a33-4f78-a5c4-000012345611", "12345678-1234-4234-8234-123456789012",
            "a84b4c76e66710@pc33.atlanta.com", "3848276298220188511@atlanta.example.com",
            "deadbeef0123456789", "0123456789abcdef", "NCC-OPR-20261129-000123",
            "1800000000000-0", "1800000000000", "198.51.100.7:5060", "234.56.78.90",
            "2026-11-29T19:27:50.123Z", "0.12345678901", "m12345678901"]
    for ident in ids:
        line = f"alert {ident} for +2348031234567: notified"
        out = logs.redact(line, mask_numbers=True)
        assert out == f"alert {ident} for +234********67: notified", (ident, out)
    # Masking keeps the spelling: the first digits and the last two stay, to tell calls apart.
    masked = {raw: logs.redact(raw, mask_numbers=True) for raw in NUMBER_SPELLINGS[:12]}
    assert masked["+234 803 123 4567"] == "+234 *** *** **67"
    assert masked["0803-123-4567"] == "0803-***-**67"
    assert masked["08031234567"] == "0803*****67"
    assert masked["002348031234567"] == "00234********67"
    assert masked["2348031234567"] == "234********67"
    # Two numbers in a row are two numbers; a time next to a number stays.
    assert logs.redact("08031234567 1800000000000", mask_numbers=True) == \
        "0803*****67 1800000000000"


@pytest.mark.server
@pytest.mark.timeout(60)
def test_alert_ids_in_a_live_workers_log_are_whole(service_factory) -> None:  # type: ignore[no-untyped-def]
    env = {"ACM_LOG_LEVEL": "INFO", "ACM_LOG_JSON": "1", "ACM_METRICS_HTTP": ""}
    with service_factory(env=env) as (_svc, client):
        replies = [client.decide(f"ids-{i}", f"+23480310{i:05d}", "+2348039999999",
                                 ts=1.8e9 + i * 0.2) for i in range(6)]
    alert_id = replies[-1]["alert_id"]
    assert alert_id
    root = logging.getLogger("acm.test")
    buf = io.StringIO()
    saved, level = logging.getLogger().handlers[:], logging.getLogger().level
    logs.setup_logging("INFO", json_logs=True, secrets=[], stream=buf)
    try:
        root.info("alert %s on %s: HIGH", alert_id, "+2348039999999")
    finally:
        logging.getLogger().handlers[:] = saved
        logging.getLogger().setLevel(level)
    (rec,) = [x for x in lines(buf) if x["logger"] == "acm.test"]
    assert rec["msg"] == f"alert {alert_id} on +234********99: HIGH"
