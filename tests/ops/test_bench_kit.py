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


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run cmd in its own session; on a timeout kill the session, the load processes too."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
              "2", "--workers", "1", "--compare-io", "--curve", "--json", str(out)], 200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    data = json.loads(out.read_text())
    phases = data["results"]
    assert set(phases) == {"floor_echo_1", "floor_echo_n", "floor_evalsha_1", "acm_1", "acm_n",
                           "io_1", "io_n", "io_curve_1", "io_curve_n", "sf_1", "sf_n"}
    for name, r in phases.items():
        assert r["rate"] > 0 and r["errors"] == 0, (name, r)
        assert 0 < r["p50"] <= r["p99"] <= r["p999"], (name, r)
    meta = data["meta"]
    for key in ("in_worker_1", "in_worker_n"):
        assert meta[key]["requests"] > 0 and meta[key]["batches"] > 0
    assert meta["store"]["bytes_per_active_b"] > 0
    assert len(phases["acm_n"]["extra"]["worker_rss_kib"]) == 1
    for line in ("floor (1 client)", "x floor", "x straightforward rate", "in-worker, acm phase",
                 "x acm (no CURVE) rate"):
        assert line in p.stdout, p.stdout


def test_the_hot_path_benchmark_suite_runs() -> None:
    p = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
              "benchmarks/test_bench_hotpath.py", "--benchmark-disable"], 200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "failed" not in p.stdout
