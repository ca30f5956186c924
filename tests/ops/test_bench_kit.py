"""The bundled profiling kit runs: `acm bench` end to end and the hot-path benchmark suite.

Figures are not judged here (they live in benchmarks/RESULTS.md); this pins that the kit an
engineer reaches for works on a clean checkout and reports every phase it promises.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run cmd in its own session; on a timeout kill the session, the load processes too."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_acm_bench_reports_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = _run([sys.executable, "-m", "acm_module.cli", "bench", "--seconds", "0.5", "--clients",
              "2", "--workers", "1", "--compare-io", "--compare-proxy-echo", "--curve",
              "--compare-store-floor", "--json", str(out)], 220)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    data = json.loads(out.read_text())
    phases = data["results"]
    assert set(phases) == {"reflect_1", "reflect_n", "echo_n", "echo_paced", "proxy_echo_n",
                           "floor_evalsha_1", "acm_paced", "acm_1", "acm_n", "io_1", "io_n",
                           "io_curve_1", "io_curve_n", "sf_1", "sf_n", "storefl_1",
                           "storefl_n", "storefl_paced"}
    for name, r in phases.items():
        # A store round trip past its budget on a loaded machine is the service's answer, not a
        # broken kit; any other error is.
        codes = r["extra"].get("error_codes") or {}
        assert r["rate"] > 0 and set(codes) <= {"store_unavailable"}, (name, r["extra"])
        assert r["errors"] == sum(codes.values()) + r["extra"].get("timeouts", 0), (name, r)
        assert r["extra"].get("timeouts", 0) == 0, (name, r)
        assert 0 < r["p50"] <= r["p99"] <= r["p999"], (name, r)
        if name != "floor_evalsha_1":
            # Every figure comes with what it cost the server and the load tool.
            assert r["server_cpu_us"] > 0 and r["client_cpu_us"] > 0, (name, r)
    # The store floor asks the store once per request, as acm does.
    for name in ("acm_1", "acm_n", "acm_paced", "sf_n", "storefl_1", "storefl_n"):
        assert 0 < phases[name]["store_cpu_us"] < phases[name]["server_cpu_us"], name
    assert phases["acm_paced"]["extra"]["paced"] == 1000
    meta = data["meta"]
    for key in ("in_worker_1", "in_worker_n"):
        assert meta[key]["requests"] > 0 and meta[key]["batches"] > 0
    assert meta["store"]["bytes_per_active_b"] > 0
    assert len(phases["acm_n"]["extra"]["worker_rss_kib"]) == 1
    assert {t["phases"][0] for t in data["targets"]} == {"acm_n", "acm_paced", "acm_1"}
    for line in ("floor (1 client)", "x floor", "x straightforward rate", "in-worker, acm phase",
                 "tool ceiling", "x echo-pool rate", "targets (issue #15",
                 "x acm (no CURVE) rate", "server CPU per decision / store floor pool's"):
        assert line in p.stdout, p.stdout


def test_the_installed_acm_command_runs_the_bench_from_any_directory(tmp_path: Path) -> None:
    """`acm bench` as installed (the console script), started outside the checkout, runs."""
    acm = Path(sys.executable).parent / "acm"
    assert acm.exists(), f"no console script beside {sys.executable}"
    out = tmp_path / "bench.json"
    p = _run([str(acm), "bench", "--seconds", "0.3", "--clients", "1", "--workers", "1",
              "--skip-baseline", "--paced", "0", "--json", str(out)], 150, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(out.read_text())["results"]["acm_1"]["rate"] > 0


def test_a_phase_the_load_tool_limited_is_not_reported_as_a_service_figure() -> None:
    from array import array

    from benchmarks.loadtool import Result, render, targets

    def phase(name: str, clients: int, rate_lat_us: float, srv: float, tool: float,
              util: float) -> Result:
        r = Result.of(name, clients, 1.0, array("q", [int(rate_lat_us * 1000)] * 1000), 0)
        r.server_cpu_us, r.client_cpu_us, r.client_util = srv, tool, util
        return r

    results = {"reflect_1": phase("reflector", 1, 20, 5, 6, 0.5),
               "reflect_n": phase("reflector", 16, 30, 5, 6, 0.95),
               "echo_n": phase("echo pool", 16, 40, 6, 6.5, 0.95),  # the tool was pegged
               "acm_n": phase("acm", 16, 60, 30, 7, 0.3)}
    assert results["echo_n"].client_bound and not results["acm_n"].client_bound
    # A closed loop where the tool costs more per request than the server: the tool's pace.
    assert phase("acm", 16, 60, 30, 31, 0.5).client_bound
    text = render(results, {"machine": "m", "python": "3", "hot_path": "cython", "workers": 2,
                            "transport": "ipc", "client_kind": "zmtp", "load_procs": 1,
                            "seconds": 1.0, "date": "d", "clients": 16})
    echo_line = next(x for x in text.splitlines() if x.startswith("echo pool"))
    assert "CLIENT-BOUND" in echo_line and "tool ceiling" in echo_line
    acm_line = next(x for x in text.splitlines() if x.split()[:2] == ["acm", "16"])
    assert "echo-pool rate" in acm_line  # the ratio is printed, but judged invalid below
    judged = [t for t in targets(results) if t["phases"] == ["acm_n", "echo_n"]]
    assert len(judged) == 2 and not any(t["valid"] for t in judged)  # rate and CPU
    assert "not judged: a phase was client-bound" in text


def test_the_hot_path_benchmark_suite_runs() -> None:
    p = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
              "benchmarks/test_bench_hotpath.py", "--benchmark-disable"], 200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "failed" not in p.stdout


def test_nodes_bench_drives_two_nodes_seeded_with_different_cluster_nodes(
        tmp_path: Path) -> None:
    out = tmp_path / "nodes.json"
    p = _run([sys.executable, "benchmarks/nodes_bench.py", "--seconds", "0.5", "--rounds", "1",
              "--stores", "cluster_3", "--layouts", "1x1,2x1", "--clients", "4", "--paced",
              "200", "--json", str(out)], 200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["store"], r["layout"]) for r in runs] == [
        ("-", "reflector"), ("cluster_3", "1x1"), ("cluster_3", "2x1")]
    assert runs[0]["closed"]["rate"] > 0  # the load tool's ceiling, in the same round
    for r in runs[1:]:
        for ph in ("closed", "paced"):
            f = r[ph]
            assert f["rate"] > 0 and 0 < f["p50"] <= f["p99"], (r["layout"], ph, f)
            assert f["tool_ceiling"] == runs[0]["closed"]["rate"]
            # Every figure with what it cost each process group.
            assert all(f["cpu_us"][g] > 0 for g in ("workers", "store", "tool")), f
    two = runs[2]
    assert len(set(two["seeds"])) == 2  # each node was given a different seed node
    w0, w1 = (two["closed"]["cpu_us"][f"node{i} workers"] for i in (0, 1))
    assert 0.25 < w0 / w1 < 4, (w0, w1)  # both nodes answered a share of the load
    assert "load tool ceiling" in p.stdout and "2x1 / 1x1" in p.stdout


def test_ab_bench_measures_two_services_at_once_with_the_tool_ceiling(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    # The same checkout on both sides: what is pinned is that each side is measured apart.
    p = _run([sys.executable, "benchmarks/ab_bench.py", "--before", ".", "--after", ".",
              "--before-python", sys.executable, "--after-python", sys.executable,
              "--together", "--rounds", "2", "--seconds", "0.5", "--clients", "4",
              "--json", str(out)], 200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["rounds"]) == 2
    for r in data["rounds"]:
        assert r["tool_ceiling"] > r["rate"] > 0
        for side in ("before", "after"):
            # Each side decided and each side's CPU per decision was measured on its own.
            assert r[side]["dec/s"] > 0 and r[side]["worker"] > 0 and r[side]["store"] > 0, r
    assert all(len(v) == 2 for v in data["ratios"].values())
    assert "load tool ceiling" in p.stdout and "median" in p.stdout
