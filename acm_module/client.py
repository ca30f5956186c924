"""A plain Python client of the decision service, for tests, benchmarks and non-OpenSIPS callers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import zmq


@dataclass(frozen=True)
class CurveKeys:
    """A CurveZMQ client's keys: the service's public key and this client's pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key_file: str, client_key_file: str | None = None) -> CurveKeys:
        """Read the service's public key file and this client's .key_secret file.

        Without a client file the pair is made up on the spot: enough when the service does
        not restrict client keys (curve_client_keys). Raises OSError or ValueError.
        """
        from zmq.auth.certs import load_certificate

        server, _ = load_certificate(server_key_file)
        if client_key_file:
            public, secret = load_certificate(client_key_file)
            if secret is None:
                raise ValueError(f"{client_key_file} holds no secret key")
        else:
            public, secret = zmq.curve_keypair()
        return cls(server, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make sock a CURVE client of the service (before connect)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


class ServiceTimeout(TimeoutError):
    """The service did not answer within the timeout."""


class Client:
    """One REQ socket to the service; rebuilt after a timeout (a REQ socket is stuck after one)."""

    def __init__(self, endpoint: str, timeout: float = 1.0, context: zmq.Context | None = None,
                 curve: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.timeout_ms = int(timeout * 1000)
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock: zmq.Socket | None = None
        self._connect()

    def _connect(self) -> None:
        s = self.ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(s)
        s.connect(self.endpoint)
        self.sock = s

    def request_raw(self, frame: bytes | list[bytes]) -> bytes:
        """Send one raw frame (or a multipart message) and return the raw reply."""
        assert self.sock is not None
        if isinstance(frame, list):
            self.sock.send_multipart(frame)
        else:
            self.sock.send(frame)
        if not self.sock.poll(self.timeout_ms):
            self.sock.close(linger=0)
            self._connect()
            raise ServiceTimeout(f"no reply from {self.endpoint} within {self.timeout_ms} ms")
        return self.sock.recv()

    def request(self, payload: Any) -> dict[str, Any]:
        """Send any msgpack-able payload and return the decoded reply map."""
        return msgpack.unpackb(self.request_raw(msgpack.packb(payload)), raw=False)

    def decide(self, call_id: str, a: str | None, b: str | None, ts: float | None = None,
               src_ip: str | None = None, trunk: str | None = None) -> dict[str, Any]:
        """Ask for a verdict on one call."""
        req: dict[str, Any] = {"call_id": call_id, "a": a, "b": b}
        if ts is not None:
            req["ts"] = ts
        if src_ip is not None:
            req["src_ip"] = src_ip
        if trunk is not None:
            req["trunk"] = trunk
        return self.request(req)

    def close(self) -> None:
        """Close the socket (and the context if this client made it)."""
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
