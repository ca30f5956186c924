"""Fixtures of the control-plane tests: `acm serve` with MI over HTTP and datagrams."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from acm_module.decide.client import Client
from tests.support.mi_helpers import MIService, free_udp_port, mi_error, wait_in_sync, wait_mi  # noqa: F401
from tests.support.servers import Service, free_port


@pytest.fixture
def mi_factory(store_url: str, tmp_path: Path, zctx: zmq.Context):
    """Start `acm serve` with MI on free loopback ports; yields (MIService, Client)."""

    @contextlib.contextmanager
    def start(workers: int = 2, env: dict[str, str] | None = None,
              state_dir: Path | None = None, http_host: str = "127.0.0.1",
              dgram_host: str = "127.0.0.1", wait: bool = True
              ) -> Iterator[tuple[MIService, Client]]:
        http_port, dgram_port = free_port(), free_udp_port()
        state = state_dir or tmp_path / "state"
        e = {"ACM_MI_HTTP": f"{http_host}:{http_port}",
             "ACM_MI_DATAGRAM": f"{dgram_host}:{dgram_port}",
             "ACM_STATE_DIR": str(state), **(env or {})}
        svc = Service(store_url, workers=workers, extra_env=e)
        c = None
        try:
            svc.start(wait=wait)
            mi = MIService(svc, http_port, dgram_port, state)
            if wait:
                wait_mi(mi.url)
            c = Client(svc.endpoint, timeout=2.0, context=zctx)
            yield mi, c
        finally:
            if c is not None:
                c.close()
            svc.cleanup()

    return start
