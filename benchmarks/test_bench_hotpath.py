"""pytest-benchmark suites of the hot-path pieces, compiled and pure-Python twin side by side.

    .venv/bin/python -m pytest benchmarks/test_bench_hotpath.py --benchmark-group-by=func \
        --benchmark-columns=median,iqr,ops

Each test runs once per implementation; compare the two rows of a group.
"""

from __future__ import annotations

import importlib

import msgpack
import pytest

IMPLS = ["acm_module._hotpath", "acm_module.engine.hotpath_py"]

REQ = msgpack.packb({"call_id": "a84b4c76e66710@pc33.atlanta.example.com",
                     "a": "sip:+2348031234567@10.1.2.3;user=phone", "b": "08039999999",
                     "src_ip": "192.0.2.10", "trunk": "IGW-LAGOS-1"})


@pytest.fixture(params=IMPLS, ids=["cython", "python"])
def hp(request):
    return importlib.import_module(request.param)


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
