"""The SIPp driver's highest sustained rate: a step counts only if it failed no call and held
its rate (the rule the ramp steps by)."""

from __future__ import annotations

from benchmarks.sipp.run import summarize


def _run(mode: str, rate: int, cps: float, failed: int = 0, late_180: int = 0) -> dict:
    return {"kind": "ramp", "mode": mode, "rate": rate, "cps_achieved": cps, "failed": failed,
            "failed_late_180": late_180}


def test_a_step_that_fell_behind_its_rate_is_not_sustained() -> None:
    results = [
        _run("off", 2800, 2801.0), _run("acm", 2800, 2802.0, failed=20, late_180=20),
        _run("off", 3000, 2808.9),  # no failed call, but 6 % short of the rate
        _run("acm", 3000, 3001.0), _run("acm", 3200, 3190.0, failed=3),
    ]
    s = summarize(results, ["off", "acm"])
    # Late-180 aborts are not failures (the 200 was received); a short rate is.
    assert s["highest_rate_0_failed"] == {"off": 2800, "acm": 3000}
    assert s["acm_vs_off"]["highest_rate_ratio"] == 1.07
