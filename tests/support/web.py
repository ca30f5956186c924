"""`acm serve` with its web API for the tests: a running service, HTTP clients that are always
closed, users of every role."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx

from tests.support.servers import Service, free_port, wait_port

BOOT_TOKEN = "boot-token-0123456789abcdef"
ROLES = ("viewer", "analyst", "admin")
PASSWORD = "correct horse battery"


class Web:
    """A running `acm serve` with its API on loopback, and ways to call it."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.url = f"http://{svc.web_http}"
        self.tokens: dict[str, str] = {}  # role -> an API token of a user with that role
        self._clients: list[httpx.Client] = []

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        """Return an HTTP client of the API (closed with the fixture)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=15.0, **kw)
        self._clients.append(c)
        return c

    def as_role(self, role: str) -> httpx.Client:
        return self.client(self.tokens[role])

    @property
    def boot(self) -> httpx.Client:
        return self.client(BOOT_TOKEN)

    def make_users(self, suffix: str = "") -> None:
        """Create one user per role (with an API token each) through the API."""
        boot = self.boot
        for role in ROLES:
            name = f"{role}{suffix}"
            r = boot.post("/api/v1/users", json={"name": name, "role": role,
                                                 "password": PASSWORD})
            assert r.status_code == 201, r.text
            r = boot.post(f"/api/v1/users/{name}/tokens", json={"name": "tests"})
            assert r.status_code == 201, r.text
            self.tokens[role] = r.json()["token"]

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()


@contextlib.contextmanager
def running_web(store_url: str, env: dict[str, str] | None = None, workers: int = 2,
                curve: Any = None) -> Iterator[Web]:
    """Start `acm serve` with the API (bootstrap token set); always stopped."""
    svc = Service(store_url, workers=workers, curve=curve,
                  extra_env={"ACM_WEB_HTTP": f"127.0.0.1:{free_port()}",
                             "ACM_API_TOKEN": BOOT_TOKEN, **(env or {})})
    web = Web(svc)
    try:
        svc.start()
        assert wait_port(int(svc.web_http.rpartition(":")[2]), 20.0), svc.read_log()
        yield web
    finally:
        web.close()
        svc.cleanup()
