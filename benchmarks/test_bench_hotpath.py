"""pytest-benchmark suites of the hot-path pieces, compiled and pure-Python twin side by side.

    .venv/bin/python -m pytest benchmarks/test_bench_hotpath.py --benchmark-group-by=func \
        --benchmark-columns=median,iqr,ops

Each test runs once per implementation; compare the rows of a group. ACM_BENCH_BASELINE names
a compiled `_hotpath` module built from another checkout (say the commit before a change):
it then runs as a third row, `baseline`, in the same run, so "did the change make it slower?"
is a ratio measured under the same load:

    py=$PWD/.venv/bin/python; git worktree add ../acm-base <commit> && \
        (cd ../acm-base && $py setup.py build_ext --inplace)
    ACM_BENCH_BASELINE=$(ls ../acm-base/acm_module/_hotpath.*.so) .venv/bin/python -m pytest \
        benchmarks/test_bench_hotpath.py --benchmark-group-by=func --benchmark-columns=median,iqr
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import msgpack
import pytest

IMPLS = {"cython": "acm_module._hotpath", "python": "acm_module.engine.hotpath_py"}
BASELINE = os.environ.get("ACM_BENCH_BASELINE", "")
if BASELINE:
    IMPLS["baseline"] = BASELINE

REQ = msgpack.packb({"call_id": "a84b4c76e66710@pc33.atlanta.example.com",
                     "a": "sip:+2348031234567@10.1.2.3;user=phone", "b": "08039999999",
                     "src_ip": "192.0.2.10", "trunk": "IGW-LAGOS-1"})


def _load(target: str) -> ModuleType:
    if not target.endswith((".so", ".pyd")):
        return importlib.import_module(target)
    # Its own name, so it loads beside (never instead of) this checkout's acm_module._hotpath;
    # the last part must stay `_hotpath`, the name of the module's init function.
    spec = importlib.util.spec_from_file_location("acm_bench_baseline._hotpath", target)
    assert spec is not None and spec.loader is not None, target
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(params=list(IMPLS.values()), ids=list(IMPLS))
def hp(request):
    return _load(request.param)


def test_normalise(benchmark, hp) -> None:
    assert benchmark(hp.normalise, "sip:+234 803-123-4567@10.1.2.3;user=phone") == \
        "+2348031234567"


def test_decode_request(benchmark, hp) -> None:
    r = benchmark(hp.decode_request, REQ, 4096, 1_800_000_000_000)
    assert r.call_id.startswith("a84b")


def test_encode_reply(benchmark, hp) -> None:
    out = benchmark(hp.encode_reply, "drop", "masking", 7,
                    "9623aee9-f715-46e8-8f32-000000000005", "CRITICAL")
    assert msgpack.unpackb(out)["severity"] == "CRITICAL"


def test_encode_command(benchmark, hp) -> None:
    out = benchmark(hp.encode_command, b"XADD", b"{acm.3}:s", b"*", b"id", "c-1@host", b"ts",
                    1_800_000_000_000)
    assert out.startswith(b"*7\r\n$4\r\nXADD\r\n")


def test_parse_reply(benchmark, hp) -> None:
    buf = b"*7\r\n$4\r\ndrop\r\n$7\r\nmasking\r\n:7\r\n$36\r\n9623aee9-f715-46e8-8f32-" \
          b"000000000005\r\n$8\r\nCRITICAL\r\n:0\r\n*0\r\n"
    value, end = benchmark(hp.parse_reply, buf, 0)
    assert end == len(buf) and value[2] == 7


def _store_reply(n: int) -> list:
    return [[b"allow", b"clean", 1, b"", b"", 0, []] for _ in range(n)]


@pytest.mark.parametrize("batch", [1, 8])
def test_decide_batch(benchmark, hp, batch: int) -> None:
    """begin + pipeline + finish of a batch: all the worker's per-request CPU but the I/O."""
    d = hp.Decider(decide_sha="0" * 40)
    frames = [REQ] * batch
    replies = _store_reply(batch)

    def run():
        d.begin(frames, 1_800_000_000_000, 1_800_000_000_000_000)
        d.pipeline()
        return d.finish(replies)

    out = benchmark(run)
    assert len(out) == batch
