"""Structured logs: JSON that parses, no secrets in any format, numbers only at DEBUG."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
from servers import Service, free_port, unavailable, wait_port

from acm_module.ops import logs

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
    assert logs.set_level("INFO") == "WARNING"


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
        from acm_module.client import Client

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
                        f"acm_module.ops.logs.setup_logging when log_json is on): {line!r}")
    assert any(r["level"] == "WARNING" and "store" in r["msg"] for r in records)
    assert {r["pid"] for r in records} >= {records[0]["pid"]}
