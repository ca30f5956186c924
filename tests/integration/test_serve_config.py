"""`acm serve` given a bad configuration: one clear line and exit 2, never a traceback.

Each case is a real `acm serve` subprocess; the store, when one is needed, is a real
redis-server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from acm_module.decide.client import Client
from tests.support.servers import REPO, RedisServer, Service, free_port, wait_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

PASSWORD = "right-Pa55word"


def serve(args: list[str], env: dict[str, str] | None = None, timeout: float = 20.0
          ) -> subprocess.CompletedProcess[str]:
    """Run `acm [--config ...] serve ...` to its end; the side endpoints are off."""
    with tempfile.TemporaryDirectory(prefix="acm-cfg-") as d:
        full_env = {**os.environ, "ACM_MI_HTTP": "", "ACM_MI_DATAGRAM": "",
                    "ACM_METRICS_HTTP": "", "ACM_STATE_DIR": f"{d}/state", **(env or {})}
        return subprocess.run([sys.executable, "-m", "acm_module.cli", *args], env=full_env,
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_config_error(r: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 2, one `configuration error` line naming the fragments, no traceback."""
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if "configuration error" in ln]
    assert len(lines) == 1, out
    for f in fragments:
        assert f in lines[0], out


def test_an_http_store_url_is_a_configuration_error() -> None:
    r = serve(["serve", "--workers", "1", "--store", "http://127.0.0.1:6379/0",
               "--endpoint", "tcp://127.0.0.1:0"])
    assert_config_error(r, "store", "http")


def test_an_endpoint_under_a_regular_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    r = serve(["serve", "--workers", "1", "--store", "redis://127.0.0.1:1/0",
               "--endpoint", f"ipc://{tmp_path}/file/acm.sock"])
    assert_config_error(r, "endpoint", f"{tmp_path}/file/acm.sock")


def test_a_tcp_endpoint_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = serve(["serve", "--workers", "1", "--store", "redis://127.0.0.1:1/0",
                   "--endpoint", f"tcp://127.0.0.1:{port}"])
    assert_config_error(r, "endpoint", str(port), "in use")


def test_a_config_file_that_is_not_utf8_is_a_configuration_error(tmp_path: Path) -> None:
    cfg = tmp_path / "acm.toml"
    cfg.write_bytes(b'# caf\xe9\nthreshold = 5\n')
    r = serve(["--config", str(cfg), "serve", "--workers", "1"])
    assert_config_error(r, str(cfg), "UTF-8")


def test_every_documented_serve_flag_is_accepted_and_applies(store_url: str) -> None:
    """--mi-http/--mi-datagram/--mi-token (listed in docs/SETTINGS.md) work on `acm serve`."""
    http, dgram = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    svc = Service(store_url, workers=1, extra_env={"ACM_MI_HTTP": "", "ACM_MI_DATAGRAM": ""},
                  args=["--mi-http", http, "--mi-datagram", dgram,
                        "--mi-token", "flag-token-0123456789abcdef0123"])
    try:
        svc.start()
        assert wait_port(int(http.rsplit(":", 1)[1]), 10), svc.read_log()
        import json
        import urllib.request

        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "acm_set",
                           "params": {"threshold": 4}}).encode()
        req = urllib.request.Request(f"http://{http}/mi", body,
                                     {"Content-Type": "application/json",
                                      "Authorization": "Bearer flag-token-0123456789abcdef0123"})
        with urllib.request.urlopen(req, timeout=10) as rep:
            assert "result" in json.loads(rep.read())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(10)
            s.sendto(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "acm_get_config"}
                                ).encode(), (dgram.rsplit(":", 1)[0], int(dgram.rsplit(":")[1])))
            assert json.loads(s.recv(65535))["result"]["live"]["threshold"] == 4
    finally:
        svc.cleanup()


def test_every_documented_flag_is_accepted_by_the_commands_the_doc_names() -> None:
    """The CLI-flag column of docs/SETTINGS.md names the commands; each of them parses it."""
    import argparse

    from acm_module.cli import build_parser, flag_commands
    from acm_module.core import settings

    commands = flag_commands()
    doc = (REPO / "docs" / "SETTINGS.md").read_text()
    parser = build_parser()
    for s in settings.SETTINGS:
        if not s.cli:
            continue
        assert commands.get(s.cli), f"{s.cli} ({s.name}) is accepted by no command"
        assert f"`{s.cli}` ({', '.join(commands[s.cli])})" in doc
        for command in commands[s.cli]:
            sub = _subparser(parser, command.split())
            # Whatever else the command requires, given a dummy value.
            extra = []
            for a in sub._actions:
                if not a.option_strings and not isinstance(a, argparse._SubParsersAction):
                    extra.append("1")
                elif a.required and a.option_strings:
                    extra += [a.option_strings[0], "1"]
            args = parser.parse_args([*command.split(), s.cli, "1", *extra])
            if command == "serve":
                assert getattr(args, s.name) == "1", s.cli
    for flag in ("--mi-http", "--mi-datagram", "--mi-token", "--state-dir"):
        assert "serve" in commands[flag], flag


def _subparser(parser: object, path: list[str]) -> object:
    import argparse

    for name in path:
        action = next(a for a in parser._actions  # type: ignore[attr-defined]
                      if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


# -- the store's password (item 12) --------------------------------------------------------
@pytest.fixture(scope="module")
def password_redis() -> Iterator[RedisServer]:
    srv = RedisServer(password=PASSWORD).start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.mark.parametrize("auth", [":wrong-password@", "", "someuser:wrong-password@"],
                         ids=["wrongpass", "noauth", "wrong-user"])
def test_a_wrong_store_password_stops_the_start_with_exit_2(password_redis: RedisServer,
                                                             auth: str) -> None:
    url = f"redis://{auth}127.0.0.1:{password_redis.port}/0"
    r = serve(["serve", "--workers", "1", "--store", url, "--endpoint",
               f"tcp://127.0.0.1:{free_port()}"])
    assert_config_error(r, "store", "password")
    assert "wrong-password" not in r.stdout + r.stderr  # the secret stays out of the line


def test_the_right_store_password_serves(password_redis: RedisServer) -> None:
    svc = Service(password_redis.url, workers=1)
    try:
        svc.start()
        with Client(svc.endpoint, timeout=5) as c:
            assert c.decide("pw-ok", "+2348030000001", "+2348039999999")["verdict"] == "allow"
    finally:
        svc.cleanup()


def test_a_store_down_at_start_is_served_as_store_unavailable_not_refused() -> None:
    port = free_port()  # nothing listens there
    svc = Service(f"redis://127.0.0.1:{port}/0", workers=1)
    try:
        svc.start(wait=False)
        import time

        deadline = time.monotonic() + 15
        reply = None
        while time.monotonic() < deadline and reply is None:
            assert svc.proc is not None and svc.proc.poll() is None, svc.read_log()
            if os.path.exists(svc.endpoint[len("ipc://"):]):
                with Client(svc.endpoint, timeout=1) as c:
                    try:
                        reply = c.decide("down-1", "+2348030000001", "+2348039999999")
                    except TimeoutError:
                        pass
        assert reply is not None and reply.get("error") == "store_unavailable", svc.read_log()
        assert svc.proc.poll() is None
    finally:
        svc.cleanup()
