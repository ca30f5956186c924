"""A request endpoint reachable beyond loopback answers only authenticated clients.

Every address of this machine is loopback, so "beyond loopback" is decided by the bind address:
the services here bind 0.0.0.0 and the clients connect through 127.0.0.1.

- Without CURVE keys and without an allow-list, `acm serve` refuses to start (exit 2, one line),
  unless allow_insecure_tcp, which it logs as a WARNING.
- With CURVE (keys from `acm keys generate`), a client without the keys, with the wrong server
  key, or (with curve_client_keys) with a key not authorised gets no verdict, and its calls do
  not count toward detection; a client with the right keys gets verdicts.
- allow_networks refuses the addresses outside it in both worker I/O modes.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import zmq

from acm_module.decide.client import Client, CurveKeys
from tests.support.opensips_script import load_acm_opensips
from tests.support.servers import REPO, Service, free_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

B = "+2348039990000"


def acm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "ACM_MI_HTTP": "", "ACM_MI_DATAGRAM": "", "ACM_METRICS_HTTP": "",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "acm_module.cli", *args], env=full_env,
                          capture_output=True, text=True, timeout=30, cwd=REPO)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """server.key(_secret), client.key(_secret), and clients/ holding client.key only."""
    from acm_module.decide.access import generate_keypair  # what `acm keys generate` runs

    d = tmp_path_factory.mktemp("keys")
    for name in ("server", "client", "stranger"):
        generate_keypair(d, name)
    (d / "clients").mkdir()
    (d / "clients" / "client.key").write_bytes((d / "client.key").read_bytes())
    return d


def forged_calls_get_no_verdict(endpoint: str, curve: CurveKeys | None, n: int = 5) -> None:
    """Send n forged calls to B, each on its own REQ socket; none may be answered."""
    ctx = zmq.Context()
    try:
        socks = []
        for i in range(n):
            s = ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                curve.apply(s)
            s.connect(endpoint)
            s.send(msgpack.packb({"call_id": f"forged-{i}", "a": f"+23480311{i:05d}", "b": B}))
            socks.append(s)
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        assert poller.poll(1500) == [], "a forged call got an answer"
    finally:
        ctx.destroy(linger=0)


def genuine_call_is_clean(svc: Service, curve: CurveKeys | None) -> None:
    """A genuine caller to B is not dropped: the forged calls did not count."""
    with Client(svc.endpoint, timeout=5.0, curve=curve) as c:
        r = c.decide("genuine-1", "+2348030000001", B)
    assert (r["verdict"], r["reason"], r["distinct"]) == ("allow", "clean", 1), r


def start(services: list[Service], store_url: str, *args: str, curve: CurveKeys | None = None,
          wait: bool = True, env: dict[str, str] | None = None) -> Service:
    svc = Service(store_url, workers=1, bind=f"tcp://0.0.0.0:{free_port()}", curve=curve,
                  args=list(args), extra_env=env)
    services.append(svc)
    svc.start(wait=wait)
    if not wait:
        svc.wait_log("worker 0 up")
    return svc


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:{port}", "tcp://[::]:{port}",
                                  "tcp://*:{port}"])
def test_an_exposed_endpoint_without_keys_or_allow_list_refuses_to_start(bind: str,
                                                                        store_url: str) -> None:
    r = acm("serve", "--workers", "1", "--store", store_url, "--endpoint",
            bind.format(port=free_port()))
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if "configuration error" in ln]
    assert len(lines) == 1, out
    for word in ("curve_server_key", "allow_networks", "allow_insecure_tcp"):
        assert word in lines[0]


def test_allow_insecure_tcp_serves_and_warns_at_start(services: list[Service],
                                                      store_url: str) -> None:
    svc = start(services, store_url, "--allow-insecure-tcp", "true")
    assert "WARNING" in svc.read_log() and "WITHOUT authentication" in svc.read_log()
    genuine_call_is_clean(svc, None)


def test_keys_are_generated_with_a_private_secret_file(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive caller: the mode must not come from it
    try:
        r = acm("keys", "generate", "--dir", str(tmp_path), "--name", "acm-server")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "acm-server.key_secret").st_mode) == 0o600
    public = (tmp_path / "acm-server.key").read_text()
    assert "public-key" in public and "secret-key" not in public
    before = (tmp_path / "acm-server.key_secret").read_bytes()
    r = acm("keys", "generate", "--dir", str(tmp_path), "--name", "acm-server")
    assert r.returncode == 2 and "exists" in r.stderr  # a key is never overwritten silently
    assert (tmp_path / "acm-server.key_secret").read_bytes() == before


def test_curve_answers_only_clients_with_the_right_keys(services: list[Service], store_url: str,
                                                        keys: Path) -> None:
    right = CurveKeys.load(str(keys / "server.key"), str(keys / "client.key_secret"))
    svc = start(services, store_url, "--curve-server-key", str(keys / "server.key_secret"),
                curve=right)
    assert "libzmq I/O" in svc.read_log()
    forged_calls_get_no_verdict(svc.endpoint, None)  # no CURVE at all
    wrong_server = CurveKeys.load(str(keys / "stranger.key"))
    forged_calls_get_no_verdict(svc.endpoint, wrong_server)
    genuine_call_is_clean(svc, right)


def test_curve_client_keys_admit_only_the_authorised_clients(services: list[Service],
                                                             store_url: str, keys: Path) -> None:
    right = CurveKeys.load(str(keys / "server.key"), str(keys / "client.key_secret"))
    svc = start(services, store_url, "--curve-server-key", str(keys / "server.key_secret"),
                "--curve-client-keys", str(keys / "clients"), curve=right)
    # The server's public key alone is not enough: a stranger's own key pair is refused.
    stranger = CurveKeys.load(str(keys / "server.key"), str(keys / "stranger.key_secret"))
    forged_calls_get_no_verdict(svc.endpoint, stranger)
    genuine_call_is_clean(svc, right)
    assert "CURVE client key not in curve_client_keys" in svc.read_log()


@pytest.mark.parametrize("io", ["zmtp", "libzmq"])
def test_allow_networks_refuses_other_addresses(services: list[Service], store_url: str,
                                                io: str) -> None:
    env = {"ACM_WORKER_IO": io}
    svc = start(services, store_url, "--allow-networks", "192.0.2.0/24, 10.0.0.0/8", wait=False,
                env=env)
    forged_calls_get_no_verdict(svc.endpoint, None)
    svc.wait_log("refused a connection from 127.0.0.1")
    ok = start(services, store_url, "--allow-networks", "192.0.2.0/24,127.0.0.0/8", env=env)
    genuine_call_is_clean(ok, None)


def test_an_allow_list_does_not_let_a_client_without_keys_past_curve(services: list[Service],
                                                                     store_url: str,
                                                                     keys: Path) -> None:
    right = CurveKeys.load(str(keys / "server.key"), str(keys / "client.key_secret"))
    svc = start(services, store_url, "--curve-server-key", str(keys / "server.key_secret"),
                "--allow-networks", "127.0.0.1", curve=right)
    forged_calls_get_no_verdict(svc.endpoint, None)
    genuine_call_is_clean(svc, right)


def test_a_loopback_tcp_endpoint_needs_nothing(store_url: str) -> None:
    svc = Service(store_url, workers=1, bind=f"tcp://127.0.0.1:{free_port()}")
    try:
        svc.start()
        genuine_call_is_clean(svc, None)
        assert "WITHOUT authentication" not in svc.read_log()
    finally:
        svc.cleanup()


def test_the_opensips_client_speaks_curve_with_its_settings(services: list[Service],
                                                            store_url: str, keys: Path) -> None:
    """acm_opensips.py with curve_server_key/curve_client_key gets verdicts; without, none."""
    mod = load_acm_opensips("acm_opensips_curve")
    right = CurveKeys.load(str(keys / "server.key"), str(keys / "client.key_secret"))
    svc = start(services, store_url, "--curve-server-key", str(keys / "server.key_secret"),
                "--curve-client-keys", str(keys / "clients"), curve=right)
    base = {"ACM_OPENSIPS_CONFIG": "", "ACM_ENDPOINT": svc.endpoint, "ACM_TIMEOUT_MS": "2000"}
    conf = keys / "acm_opensips.conf"
    conf.write_text(f"curve_server_key = {keys / 'server.key'}\n"
                    f"curve_client_key = {keys / 'client.key_secret'}\n")
    with_keys = mod.AcmClient(mod.Config.load(str(conf), environ=base))
    without = mod.AcmClient(mod.Config.load(None, environ=base))
    try:
        v = with_keys.check("os-curve-1", "+2348030000001", B)
        assert (v.verdict, v.reason, v.policy) == ("allow", "clean", False), v
        v = without.check("os-curve-2", "+2348030000002", B)
        assert (v.reason, v.policy) == ("service_unavailable", True), v
    finally:
        with_keys.close()
        without.close()
    with pytest.raises(mod.ConfigError):
        mod.Config.load(None, environ={**base, "ACM_CURVE_SERVER_KEY": str(keys / "nope.key")})
