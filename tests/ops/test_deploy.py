"""Deployment files parse, say what production needs, and the dashboard uses real metric names."""

from __future__ import annotations

import configparser
import json
import re
import time
from pathlib import Path

import pytest

from acm_module.core import liveconfig as store_config
from acm_module.core import settings
from acm_module.core import stats as stats_mod
from acm_module.decide.store.conn import StoreConnection
from acm_module.ops import metrics
from tests.support.servers import REPO, unavailable

pytestmark = pytest.mark.timeout(30)

DEPLOY = REPO / "deploy"


def load_yaml(path: Path) -> object:
    try:
        import yaml
    except ImportError:
        unavailable("PyYAML is not installed (pip install pyyaml)")
    return yaml.safe_load(path.read_text())


def unit(name: str) -> configparser.ConfigParser:
    # systemd allows repeated keys (Environment=); configparser keeps the last one.
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((DEPLOY / "systemd" / name).read_text())
    return cp


@pytest.mark.parametrize("name", ["acm-serve.service", "acm-writer.service"])
def test_systemd_units_are_hardened(name: str) -> None:
    u = unit(name)
    svc = u["Service"]
    assert svc["User"] == "acm" and svc["Group"] == "acm"
    assert svc["EnvironmentFile"] == "/etc/acm/acm.env"
    assert svc["Restart"] == "on-failure"
    assert svc["KillSignal"] == "SIGTERM" and int(svc["TimeoutStopSec"]) >= 10
    assert int(svc["LimitNOFILE"]) >= 65536
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert svc["CapabilityBoundingSet"] == ""
    assert svc["ExecStart"].startswith("/opt/acm/venv/bin/acm ")
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_serve_unit_owns_the_socket_directory() -> None:
    svc = unit("acm-serve.service")["Service"]
    assert svc["RuntimeDirectory"] == "acm"
    assert "/run/acm" in svc["ReadWritePaths"]
    text = (DEPLOY / "systemd" / "acm-serve.service").read_text()
    assert "ACM_ENDPOINT=ipc:///run/acm/acm.sock" in text
    assert "RestartPreventExitStatus=2 3" in text  # boot failures stop instead of looping


def test_compose_stack_is_complete_and_dragonfly_correct() -> None:
    doc = load_yaml(DEPLOY / "compose.yaml")
    assert isinstance(doc, dict)
    services = doc["services"]
    assert {"dragonfly", "yugabyte", "questdb", "clickhouse", "acm-serve",
            "acm-writer"} <= set(services)
    flags = services["dragonfly"]["command"]
    assert any(f.startswith("--proactor_threads=") for f in flags)
    assert "--cache_mode=false" in flags and "--lock_on_hashtags" in flags
    assert not any("allow-undeclared-keys" in f for f in flags)
    known_env = {e for s in settings.SETTINGS for e in s.env}
    for name in ("acm-serve", "acm-writer"):
        env = services[name]["environment"]
        assert env["DRAGONFLY_URL"].split("@")[1].startswith("dragonfly:6379")
        assert "yugabyte:5433" in env["DATABASE_URL"]
        assert "questdb:9000" in env["QUESTDB_URL"]
        assert "clickhouse:8123" in env["CLICKHOUSE_URL"]
        unknown = set(env) - known_env
        assert not unknown, f"{name}: env vars no setting reads: {unknown}"
    assert services["acm-serve"]["command"] == ["acm", "serve"]
    assert "acm writer" in " ".join(services["acm-writer"]["command"])
    assert services["acm-serve"]["environment"]["ACM_MI_TOKEN"]  # MI binds 0.0.0.0 there
    assert services["acm-serve"]["environment"]["ACM_API_TOKEN"]  # and so does the API
    for f in ("prometheus/prometheus.yml", "grafana/provisioning/dashboards/acm.yaml",
              "grafana/provisioning/datasources/prometheus.yaml"):
        assert isinstance(load_yaml(DEPLOY / f), dict), f


def exposed_names(url: str) -> set[str]:
    """Return every sample name the exporter produces when the store has one of everything."""
    c = StoreConnection(url, timeout=2.0)
    try:
        st = stats_mod.WorkerStats(index=0, pid=1)
        st.decisions = {"allow:clean": 1, "dup": 1, "error": 1, "@igw|drop:rate_limited": 1}
        st.total_us.add(50.0)
        st.service_us.add(20.0)
        stats_mod.publish(c, "h/boot/0", st)
        c.call("HSET", metrics.WRITER_STATS_KEY, "w", json.dumps({
            "writer": "w", "updated": time.time(),
            "sinks": {"pg": {"state": "up", "decisions": 1, "alerts": 0, "last_ok": 1.0}}}))
        store_config.init_boot(c, "boot", {"threshold": 5, "window": 5.0, "mode": "block",
                                           "block_ttl": 0.0, "dedup_ttl": 32.0})
        c.call("XADD", "{acm.0}:s", "*", "k", "d")
        c.call("XGROUP", "CREATE", "{acm.0}:s", "acm.pg", "0")
    finally:
        c.close()
    scanner = metrics.AlertScanner(url, 16)
    collector = metrics.PoolCollector(url, 16, scanner)
    try:
        return {s.name for fam in collector.collect() for s in fam.samples}
    finally:
        collector.close()
        scanner.stop()


def test_grafana_dashboard_uses_only_exposed_metrics(store_url: str) -> None:
    dash = json.loads((DEPLOY / "grafana" / "acm-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = {m for e in exprs for m in re.findall(r"\bacm_[a-z0-9_]+", e)}
    names = exposed_names(store_url)
    assert used - names == set(), f"dashboard queries unknown metrics: {used - names}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24


def test_production_guide_covers_the_essentials() -> None:
    text = (REPO / "docs" / "PRODUCTION.md").read_text()
    for needle in ("workers", "bytes per active B", "--proactor_threads", "--lock_on_hashtags",
                   "--cache_mode=false", "script_name", "ACM_TIMEOUT_MS", "ACM_FAIL_POLICY",
                   "children", "acm replay"):
        assert needle in text, needle


def test_prometheus_alerts_on_unchecked_calls(store_url: str) -> None:
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert isinstance(prom, dict)
    assert prom["rule_files"] == ["/etc/prometheus/acm-alerts.yml"]
    compose = load_yaml(DEPLOY / "compose.yaml")
    assert isinstance(compose, dict)
    assert ("./prometheus/acm-alerts.yml:/etc/prometheus/acm-alerts.yml:ro"
            in compose["services"]["prometheus"]["volumes"])
    doc = load_yaml(DEPLOY / "prometheus" / "acm-alerts.yml")
    assert isinstance(doc, dict)
    rules = [r for g in doc["groups"] for r in g["rules"]]
    by_name = {r["alert"]: r for r in rules}
    assert {"AcmUncheckedCalls", "AcmUncheckedCallsHigh"} <= set(by_name)
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["for"]
        assert r["expr"].count("(") == r["expr"].count(")"), r["expr"]
    # The alert reads the unchecked-call counter against all requests, at the 0.01 % target.
    expr = by_name["AcmUncheckedCalls"]["expr"]
    assert "acm_unchecked_calls_total" in expr and "acm_requests_total" in expr
    assert re.search(r">\s*0\.0001\b", expr), expr
    used = {m for r in rules for m in re.findall(r"\bacm_[a-z0-9_]+", r["expr"])}
    names = exposed_names(store_url)
    assert used - names == set(), f"alert rules query unknown metrics: {used - names}"


def test_the_call_path_outranks_the_writer_for_the_cpu() -> None:
    # Measured (benchmarks/RESULTS.md, co-located load): a busy writer and its sinks on the
    # same host stall the call path unless it runs at a higher priority.
    serve, writer = unit("acm-serve.service")["Service"], unit("acm-writer.service")["Service"]
    assert int(serve["Nice"]) < 0 < int(writer["Nice"])  # within a unit / without cgroups
    assert int(serve["CPUWeight"]) > 100 > int(writer["CPUWeight"])  # between units
