"""Who may talk to the request endpoint: CurveZMQ keys and an allow-list of client networks.

A tcp:// endpoint bound beyond loopback (0.0.0.0, ::, or any other non-127/::1 address) needs
at least one of them; `allow_insecure_tcp` overrides that, with a WARNING at every start.

- CURVE (`curve_server_key`, optionally `curve_client_keys`): libzmq's CurveZMQ, so workers use
  libzmq I/O when it is on (the ZMTP workers speak the NULL mechanism only). A ZAP handler in
  each worker admits only the client public keys of `curve_client_keys` when it is set.
- `allow_networks`: ZMTP workers close a connection from elsewhere right after accept(); libzmq
  workers refuse it through ZAP (RFC 27/ZAP) before the handshake completes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from acm_module.errors import ConfigError
from acm_module.settings import Network, parse_networks

log = logging.getLogger("acm.access")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"acm"
REFUSAL_LOG_INTERVAL = 10.0  # seconds between two log lines about refused connections

def is_exposed(endpoint: str) -> bool:
    """Say whether a tcp:// endpoint binds beyond loopback (a host name: any of its addresses)."""
    if not endpoint.startswith("tcp://"):
        return False
    host = urlparse(endpoint).hostname or ""
    if host in ("", "*"):
        return True
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return True  # cannot tell: the strict answer (binding fails anyway)
    return any(not ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _load_certificate(path: str, what: str) -> tuple[bytes, bytes | None]:
    from zmq.auth.certs import load_certificate

    try:
        return load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: cannot read a CURVE key from {path} ({e})") from e


@dataclass(frozen=True)
class Access:
    """The endpoint's access rules, read from the settings (key files included)."""

    networks: tuple[Network, ...] = ()
    server_public: bytes | None = None
    server_secret: bytes | None = None
    client_keys: frozenset[bytes] | None = None  # None: any client with the server's key

    @property
    def curve(self) -> bool:
        return self.server_secret is not None

    @property
    def needs_zap(self) -> bool:
        """Say whether libzmq must ask a ZAP handler about each new connection."""
        return bool(self.networks) or self.client_keys is not None

    @classmethod
    def from_settings(cls, s: Any) -> Access:
        """Read the access settings and key files. Raises ConfigError."""
        networks = parse_networks(s.allow_networks)
        if networks and not s.endpoint.startswith("tcp://"):
            raise ConfigError(f"allow_networks applies to tcp:// endpoints, not {s.endpoint}")
        public = secret = None
        if s.curve_server_key:
            public, secret = _load_certificate(s.curve_server_key, "curve_server_key")
            if secret is None:
                raise ConfigError(f"curve_server_key: {s.curve_server_key} holds no secret "
                                  "key (give the .key_secret file of `acm keys generate`)")
        clients = None
        if s.curve_client_keys:
            if secret is None:
                raise ConfigError("curve_client_keys needs curve_server_key")
            clients = _load_client_keys(s.curve_client_keys)
        return cls(networks, public, secret, clients)

    def allows_address(self, host: str) -> bool:
        """Say whether a peer address is in allow_networks (or no allow-list is set)."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def admit_peer(self, addr: Any) -> bool:
        """Say whether to serve a peer accepted from addr (socket.accept()'s); log a refusal."""
        host = addr[0] if isinstance(addr, tuple) and addr else ""
        if self.allows_address(host):
            return True
        _refusals(host, "not in allow_networks")
        return False

    def describe(self) -> str:
        """Return the rules as a phrase for the start log."""
        parts = []
        if self.curve:
            keys = ("any client key" if self.client_keys is None
                    else f"{len(self.client_keys)} authorised client key(s)")
            parts.append(f"CURVE ({keys})")
        if self.networks:
            parts.append(f"clients from {', '.join(str(n) for n in self.networks)}")
        return " and ".join(parts) or "no authentication"


def _load_client_keys(directory: str) -> frozenset[bytes]:
    from zmq.auth.certs import load_certificates

    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"curve_client_keys: {directory} is not a directory")
    try:
        keys = frozenset(load_certificates(directory))
    except (OSError, ValueError) as e:
        raise ConfigError(f"curve_client_keys: {e}") from e
    if not keys:
        raise ConfigError(f"curve_client_keys: no public key file (*.key) in {directory}")
    return keys


def prepare(s: Any) -> Access:
    """Check the endpoint's protection at start; pick the worker I/O CURVE needs.

    Raises ConfigError when a non-loopback tcp:// endpoint has neither CURVE nor an allow-list
    (and allow_insecure_tcp is off). Logs what protects the endpoint.
    """
    access = Access.from_settings(s)
    exposed = is_exposed(s.endpoint)
    if exposed and not access.curve and not access.networks:
        if not s.allow_insecure_tcp:
            raise ConfigError(
                f"endpoint {s.endpoint} is reachable beyond loopback without authentication: "
                "set curve_server_key (see `acm keys generate`) and/or allow_networks, or "
                "allow_insecure_tcp = true to accept that anyone who reaches the port can "
                "make calls count")
        log.warning("endpoint %s is reachable beyond loopback WITHOUT authentication "
                    "(allow_insecure_tcp): anyone who reaches the port gets verdicts and makes "
                    "calls count", s.endpoint)
    elif exposed or access.curve or access.networks:
        log.info("endpoint %s: %s", s.endpoint, access.describe())
    if access.curve and s.worker_io != "libzmq":
        log.info("curve_server_key is set: workers use libzmq I/O (worker_io = libzmq; the ZMTP "
                 "workers speak the NULL mechanism only)")
        s.values["worker_io"] = "libzmq"
    return access


class RefusalLog:
    """Count refused connections; log at most one line per interval."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.interval = interval
        self.count = 0
        self._held = 0
        self._last = -interval

    def __call__(self, peer: str, why: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            self._held += 1
            return
        more = f" ({self._held} more since the last line)" if self._held else ""
        self._held = 0
        self._last = now
        log.warning("refused a connection from %s: %s%s", peer or "?", why, more)


_refusals = RefusalLog()


def apply_access(ctx: Any, sock: Any, access: Access) -> ZapHandler | None:
    """Make a libzmq server socket (before bind) a CURVE server and/or ask a ZAP handler.

    Return the handler started in ctx, if the rules need one.
    """
    import zmq

    zap = None
    if access.needs_zap:
        zap = ZapHandler(ctx, access)
        # NULL connections go through ZAP only with a domain set; CURVE ones always do.
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    if access.curve:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, access.server_secret)
    return zap


class ZapHandler:
    """A ZAP handler (RFC 27) in a thread of the worker, for its libzmq socket's context.

    Admits a connection when its address is in allow_networks and, with curve_client_keys,
    its CURVE public key is authorised. Anything unexpected is a refusal: a handler that
    cannot decide must not let a connection in.
    """

    def __init__(self, ctx: Any, access: Access) -> None:
        import zmq

        self.access = access
        self.refused = _refusals
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="acm-zap", daemon=True)
        self._thread.start()

    def decide(self, msg: list[bytes]) -> tuple[bytes, bytes, bytes]:
        """Return (status code, status text, user id) for one ZAP request."""
        if len(msg) < 6 or msg[0] != b"1.0":
            return b"400", b"bad ZAP request", b""
        address = msg[3].decode("ascii", "replace")
        mechanism = msg[5]
        if not self.access.allows_address(address):
            self.refused(address, "not in allow_networks")
            return b"400", b"address not allowed", b""
        if mechanism == b"CURVE":
            if len(msg) < 7 or len(msg[6]) != 32:
                return b"400", b"bad CURVE credentials", b""
            if self.access.client_keys is not None:
                from zmq.utils import z85

                key = z85.encode(msg[6])
                if key not in self.access.client_keys:
                    self.refused(address, "CURVE client key not in curve_client_keys")
                    return b"400", b"client key not authorised", b""
                return b"200", b"OK", key
            return b"200", b"OK", b""
        if mechanism == b"NULL" and not self.access.curve:
            return b"200", b"OK", b""
        self.refused(address, f"mechanism {mechanism.decode('ascii', 'replace')}")
        return b"400", b"mechanism not allowed", b""

    def _run(self) -> None:
        import zmq

        sock = self._sock
        while not self._stop.is_set():
            try:
                if not sock.poll(200):
                    continue
                msg = sock.recv_multipart()
            except zmq.ZMQError:
                return  # the context is terminating
            try:
                status, text, user = self.decide(msg)
            except Exception:  # refuse rather than let the thread die
                log.exception("ZAP handler: refusing a connection after an error")
                status, text, user = b"500", b"internal error", b""
            version = msg[0] if msg else b"1.0"
            request_id = msg[1] if len(msg) > 1 else b""
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart([version, request_id, status, text, user, b""])

    def close(self) -> None:
        """Stop the thread and close its socket (before the context terminates)."""
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close(linger=0)


def generate_keypair(directory: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public, 0644) and NAME.key_secret (both keys, 0600) into directory.

    Raises FileExistsError rather than overwrite a key unless force.
    """
    import zmq
    from zmq.auth.certs import create_certificates

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    if not force:
        for p in (public, secret):
            if p.exists():
                raise FileExistsError(f"{p} exists (use --force to replace it)")
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support")
    for p in (public, secret):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        create_certificates(d, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret
