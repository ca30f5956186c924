"""MI test helpers (a module of its own so tests can import it by a unique name)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensips.mi import OpenSIPSMI, OpenSIPSMIException

from tests.support.servers import Service


def free_udp_port() -> int:
    """Return a free UDP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MIService:
    """A running service and how to reach its MI endpoints."""

    svc: Service
    http_port: int
    dgram_port: int
    state_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/mi"

    def http(self) -> OpenSIPSMI:
        return OpenSIPSMI(conn="http", url=self.url)

    def datagram(self) -> OpenSIPSMI:
        # python-opensips waits 0.1 s for a datagram reply by default; a loaded CI box is slower.
        return OpenSIPSMI(conn="datagram", datagram_ip="127.0.0.1",
                          datagram_port=self.dgram_port, datagram_timeout=5)

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """POST raw bytes to /mi and decode the JSON-RPC response."""
        req = urllib.request.Request(self.url, body,
                                     {"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def send_datagram(self, body: bytes, wait: float = 5.0) -> dict[str, Any] | None:
        """Send one datagram; return the decoded reply, or None if none came within `wait`."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(wait)
            s.sendto(body, ("127.0.0.1", self.dgram_port))
            try:
                return json.loads(s.recv(65535))
            except TimeoutError:
                return None

    def live(self) -> dict[str, Any]:
        return dict(self.http().execute("acm_get_config")["live"])

    def generation(self) -> int:
        return int(self.http().execute("acm_get_config")["generation"])


def mi_error(exc: OpenSIPSMIException) -> tuple[int, str]:
    """Return (code, message) of the JSON-RPC error behind an OpenSIPSMI exception."""
    cause = exc.__cause__
    assert cause is not None and hasattr(cause, "code"), exc
    return int(cause.code), str(cause.message)  # type: ignore[attr-defined]


def wait_mi(url: str, timeout: float = 15.0) -> None:
    """Wait until the MI HTTP endpoint answers."""
    deadline = time.monotonic() + timeout
    mi = OpenSIPSMI(conn="http", url=url)
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            mi.execute("acm_get_config")
            return
        except OpenSIPSMIException as e:
            last = e
            time.sleep(0.05)
    raise RuntimeError(f"MI endpoint {url} not ready: {last}")


def wait_in_sync(mi: MIService, gen: int | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Wait until every worker's published stats show the live config generation."""
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = mi.http().execute("acm_stats")
        if st["in_sync"] and len(st["workers"]) == mi.svc.workers and (
                gen is None or st["generation"] == gen):
            return st
        time.sleep(0.1)
    raise AssertionError(f"workers not in sync with generation {gen}: {st}")


