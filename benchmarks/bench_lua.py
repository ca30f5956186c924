"""Store-side cost of decide.lua and fanout.lua, now against a git revision, in one run.

Both versions are loaded side by side in one redis-server and timed in alternating slices of
calls (before, now, now, before, ...), each slice against a state prepared for it, so both meet
the same moments of a shared, noisy machine; the figure to read is the median of the per-pair
ratios now/before (with its interquartile range), not an absolute time. Per call, from the
store's side (the client, the network and Python are out of it): the store process's CPU
(schedstat run time of its threads over the slice, the pipelined parsing included: what the box
pays) and the store's own wall time per EVALSHA (INFO commandstats, inflated when the box
preempts the store).

Default: two workloads per script, calls that raise no alert (3 callers per B-number,
threshold 5) and calls that open and extend alerts (9 callers per B-number). `--paths`: one
decision path of decide.lua at a time (each call on a B-number of its own, brought to its state
before the timing), and `--profile` what the store runs inside the script per decision
(commands and their µs, from the same commandstats). Before any timing both versions get the
same random calls (`--check N`) and the run stops if a reply, a key, a TTL or a stream record
differs.

    .venv/bin/python benchmarks/bench_lua.py --against main --paths --profile
    .venv/bin/python benchmarks/bench_lua.py --against main --check 0 --paced 300
    .venv/bin/python benchmarks/bench_lua.py --against main --check 0 --ops
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from acm_module.core.types import SEVERITY_CRITICAL, SEVERITY_HIGH  # noqa: E402
from acm_module.decide.engine.resp_py import encode_command  # noqa: E402
from acm_module.decide.store.conn import StoreConnection, load_script  # noqa: E402
from benchmarks.loadtool import cpu_ns, redis_server  # noqa: E402

LUA = "acm_module/decide/store/lua"
T0 = 1_800_000_000_000  # ms: every call's clock starts here
THRESHOLD = 5
PIPELINE = 100  # EVALSHA per round trip: the store's figures do not depend on it


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


def decide_args(tag: str, b: str, a: str, call_id: str, ts: int, pre: str = "",
                block_ttl: int = 0) -> list[str | int]:
    """Return the KEYS count, KEYS and ARGV of one decide.lua call (as the worker builds them)."""
    keys = [f"{{acm.1}}:{x}:{tag}{b}" for x in ("w", "e", "ea", "wl")]
    keys += [f"{{acm.1}}:c:{tag}{call_id}", f"{{acm.1}}:s:{tag}", f"{{acm.1}}:n:{tag}",
             f"{{acm.1}}:k:{tag}"]
    argv = [call_id, a, b, str(ts), "5000", str(THRESHOLD), "block", pre,
            str(uuid.UUID(int=ts)), "32000", "60000", "192.0.2.1", "trunk-1", "1800000000000000",
            str(block_ttl), "carrier-1", "gw-1"]
    return [8, *keys, *argv]


def _decide_call(tag: str, n: int, callers: int) -> list[str | int]:
    b = f"+23480399{n % 50:05d}"
    keys = [f"{{acm.1}}:{x}:{tag}{b}" for x in ("w", "e", "ea", "wl")]
    keys += [f"{{acm.1}}:c:{tag}{n}", "{acm.1}:s", "{acm.1}:n", "{acm.1}:k"]
    argv = [f"c{n}", f"+2348031{n % callers:06d}", b, str(T0 + n), "5000", "5",
            "block", "", f"al{n}", "60000", "60000", "192.0.2.1", "t", "0", "0", "", ""]
    return [8, *keys, *argv]


def _fanout_call(tag: str, n: int, callers: int) -> list[str | int]:
    a = f"+2348031{n % 50:06d}"  # `callers` B-numbers per A-number here
    keys = [f"{{acm.1}}:fw:{tag}{a}", f"{{acm.1}}:fe:{tag}{a}", f"{{acm.1}}:fa:{tag}{a}",
            "{acm.1}:s", "{acm.1}:n"]
    argv = [f"c{n}", a, f"+23480399{n % callers:05d}", str(T0 + n), "5000", "5",
            f"al{n}", "60000", "", ""]
    return [5, *keys, *argv]


Cmd = list[str | int]
SIDES = ("before", "now")
# Each side's keys carry its tag; tags of one length, so neither side hashes longer names.
TAG = {"before": "B~", "now": "N~"}


class Store:
    """One redis-server with both versions loaded; times slices of commands on it."""

    def __init__(self, conn: StoreConnection, pid: int) -> None:
        self.conn = conn
        self.pid = pid

    def pipeline(self, cmds: list[Cmd]) -> list:
        """Run commands, PIPELINE per round trip; return their replies."""
        out: list = []
        for i in range(0, len(cmds), PIPELINE):
            chunk = cmds[i:i + PIPELINE]
            out += self.conn.round_trip(b"".join(encode_command(*c) for c in chunk), len(chunk),
                                        timeout=30.0)
        return out

    def prepare(self, setup: list[Cmd]) -> None:
        """Start from a fresh keyspace brought to its state by setup.

        The keyspace is first filled to FILL keys with a TTL, so neither the key table nor the
        expiry table grows (and rehashes) during the timing, whatever ran before.
        """
        self.conn.call("FLUSHALL")
        self.conn.call("EVAL", _FILL, 0, FILL)
        self.pipeline(setup)
        time.sleep(0.05)  # the store finishes any rehashing in its cron (hz 100)

    def timed(self, cmds: list[Cmd]) -> tuple[float, float, dict[str, tuple[int, int]]]:
        """Run cmds; return store CPU µs and store wall µs per EVALSHA, and what ran inside.

        The last is the commandstats of the slice: name -> (calls, usec).
        """
        self.conn.call("CONFIG", "RESETSTAT")
        c0 = cpu_ns([self.pid])
        replies = self.pipeline(cmds)
        c1 = cpu_ns([self.pid])
        bad = [r for r in replies if not isinstance(r, list)]
        if bad:
            raise SystemExit(f"the script failed: {bad[0]!r}")
        info = self.conn.call("INFO", "commandstats")
        assert isinstance(info, bytes)
        stats: dict[str, tuple[int, int]] = {}
        for line in info.decode().splitlines():
            if line.startswith("cmdstat_"):
                name, _, rest = line[8:].partition(":")
                f = dict(kv.split("=") for kv in rest.split(","))
                stats[name] = (int(f["calls"]), int(f["usec"]))
        calls, usec = stats.pop("evalsha")
        return (c1 - c0) / 1000 / len(cmds), usec / calls, stats

    def compare(self, setup: dict[str, list[Cmd]], timed: dict[str, list[Cmd]],
                slices: int, acc: Tally) -> None:
        """Prepare both sides' state, then time their calls in alternating slices."""
        self.prepare(setup["before"] + setup["now"])
        n = len(timed["now"])
        for j in range(slices):
            part = slice(j * n // slices, (j + 1) * n // slices)
            got = {}
            for side in SIDES if j % 2 == 0 else SIDES[::-1]:
                got[side] = self.timed(timed[side][part])
            acc.add(got, part.stop - part.start)
        keys = self.conn.call("DBSIZE")
        assert isinstance(keys, int)
        if keys >= 2 * _TABLE:
            raise SystemExit(f"{keys} keys: the key table grew during the timing; fewer calls")


def _quartiles(xs: list[float]) -> str:
    """Return "median [first quartile-third quartile]"."""
    a, m, b = statistics.quantiles(xs, n=4)
    return f"{m:.3f} [{a:.3f}-{b:.3f}]"


class Tally:
    """Per-slice figures of both sides: CPU and wall per call, their ratios, inner commands."""

    def __init__(self) -> None:
        self.cpu: dict[str, list[float]] = {s: [] for s in SIDES}
        self.wall: dict[str, list[float]] = {s: [] for s in SIDES}
        self.cpu_ratio: list[float] = []
        self.wall_ratio: list[float] = []
        self.inner: dict[str, dict[str, list[int]]] = {s: {} for s in SIDES}
        self.calls = {s: 0 for s in SIDES}

    def add(self, got: dict[str, tuple[float, float, dict[str, tuple[int, int]]]],
            calls: int) -> None:
        for side, (cpu, wall, stats) in got.items():
            self.cpu[side].append(cpu)
            self.wall[side].append(wall)
            self.calls[side] += calls
            for name, (k, usec) in stats.items():
                if name not in _OUTSIDE:
                    tot = self.inner[side].setdefault(name, [0, 0])
                    tot[0] += k
                    tot[1] += usec
        self.cpu_ratio.append(got["now"][0] / got["before"][0])
        self.wall_ratio.append(got["now"][1] / got["before"][1])

    def line(self, label: str) -> str:
        """Return the summary: median µs per side and median [IQR] of the pair ratios."""
        med = statistics.median
        return (f"{label:24} {med(self.cpu['now']):6.2f} {med(self.cpu['before']):6.2f}  "
                f"{_quartiles(self.cpu_ratio):21} {med(self.wall['now']):6.2f} "
                f"{med(self.wall['before']):6.2f}  {_quartiles(self.wall_ratio)}")

    def inside(self) -> list[str]:
        """Return, per side, the commands run inside the script: calls and µs per call."""
        out = []
        for side in SIDES:
            n = self.calls[side]
            rows = sorted(self.inner[side].items(), key=lambda x: -x[1][1])
            total = sum(u for _k, u in self.inner[side].values())
            out.append(f"    {side:6} {sum(k for k, _u in self.inner[side].values()) / n:4.1f} "
                       f"commands, {total / n:5.2f} µs: " + ", ".join(
                           f"{c} {k / n:g}x {u / n:.2f}" for c, (k, u) in rows))
        return out


HEADER = (f"{'':24} {'store CPU µs per call':^36}  {'store wall µs per EVALSHA':^36}\n"
          f"{'':24} {'now':>6} {'before':>6}  {'now/before [IQR]':21} {'now':>6} {'before':>6}"
          f"  now/before [IQR]")


# Keys (with a TTL) each batch starts with: past 2^15, so both tables have 2^16 slots and a
# batch may add up to 2^15 keys before either grows again.
_TABLE = 1 << 15
FILL = _TABLE + 1000
_FILL = "for i = 1, ARGV[1] do redis.call('SET', 'fill:' .. i, '', 'PX', 3600000) end"


# -- the same behaviour: both versions fed one random sequence ---------------------------------
def _key(conn: StoreConnection, k: str) -> tuple[object, object, int] | None:
    """Return a key's type, content and PTTL (None if absent)."""
    typ = conn.call("TYPE", k)
    if typ == b"none":
        return None
    if typ == b"string":
        val: object = conn.call("GET", k)
    elif typ == b"hash":
        val = sorted(_pairs(conn.call("HGETALL", k)))
    elif typ == b"zset":
        val = _pairs(conn.call("ZRANGE", k, 0, -1, "WITHSCORES"))
    elif typ == b"set":
        val = sorted(conn.call("SMEMBERS", k))  # type: ignore[type-var]
    elif typ == b"stream":  # entry ids are the store's clock: compare the fields
        val = [e[1] for e in conn.call("XRANGE", k, "-", "+")]  # type: ignore[union-attr]
    else:
        raise SystemExit(f"unexpected type {typ!r} of {k}")
    ttl = conn.call("PTTL", k)
    assert isinstance(ttl, int)
    return typ, val, ttl


def _same(x: tuple[object, object, int] | None, y: tuple[object, object, int] | None) -> bool:
    """Say whether two keys match: content exactly, TTL within 1 s (set and read apart in time)."""
    if x is None or y is None:
        return x is y
    return x[:2] == y[:2] and (x[2] == y[2] or (min(x[2], y[2]) >= 0
                                                and abs(x[2] - y[2]) <= 1000))


def _pairs(flat: object) -> list[tuple[object, object]]:
    assert isinstance(flat, list)
    return list(zip(flat[0::2], flat[1::2], strict=True))


def check(store: Store, shas: dict[str, dict[str, str]], seed: int, calls: int) -> int:
    """Feed both versions the same random calls; return the number of differences (printed).

    Replies are compared call by call, every key (content and TTL) and the stream records at
    the end. The calls mix what the scripts branch on: repeats, retransmissions, calls out of
    order by up to two windows, masking bursts, whitelisted and blocked numbers, gateway rule
    verdicts, monitor mode, blocking on detection and fan-out.
    """
    rng = random.Random(seed)
    conn = store.conn
    conn.call("FLUSHALL")
    bs = [f"+23480{rng.randrange(10**8):08d}" for _ in range(6)]
    a_pool = [f"+23481{rng.randrange(10**8):08d}" for _ in range(30)]
    t = T0
    sent: list[tuple[str, str, str, int]] = []
    diffs = 0
    for i in range(calls):
        roll = rng.random()
        b, a = rng.choice(bs), rng.choice(a_pool)
        t += rng.randrange(0, 600)
        ts = t - rng.randrange(0, 10_000) if roll < 0.1 else t
        call_id = f"c{i}"
        if roll > 0.93 and sent:  # a retransmission (its own or another timestamp)
            call_id, a, b, ts = rng.choice(sent)
            ts += rng.choice((0, 0, 250))
        sent.append((call_id, a, b, ts))
        pre = rng.choice(["", "", "", "", "drop|rate_limited", "monitor|unverifiable_cli"])
        threshold, window = rng.choice([(5, 5000), (3, 2000), (2, 8000)])
        mode, block_ttl = rng.choice(["block", "block", "monitor"]), rng.choice([0, 0, 60000])
        setup = []
        if rng.random() < 0.03:
            setup.append(["SET", "{acm.1}:wl:%" + b, "test"])
        if rng.random() < 0.02:
            setup.append(["DEL", "{acm.1}:wl:%" + b])
        if rng.random() < 0.03:
            setup.append(["HSET", "{acm.1}:k:%", a,
                          f"{ts + rng.choice((-1, 1)) * 30000}|{uuid.UUID(int=i)}|HIGH"])
        replies = {}
        for side in SIDES:
            tag = TAG[side]
            for c in setup:
                conn.call(*[x.replace("%", tag) for x in c])
            args = decide_args(tag, b, a, call_id, ts, pre, block_ttl)
            args[1 + 8 + 4], args[1 + 8 + 5], args[1 + 8 + 6] = str(window), str(threshold), mode
            r = conn.call("EVALSHA", shas["decide"][side], *args)
            fo = conn.call("EVALSHA", shas["fanout"][side], *fanout_args(
                tag, a, b, call_id, ts, threshold, window)) if roll < 0.5 else None
            replies[side] = (r, fo)
        if replies["now"] != replies["before"]:
            diffs += 1
            print(f"call {i}: now {replies['now']!r} before {replies['before']!r}")
    names: set[str] = set()
    for tag in TAG.values():
        keys = conn.call("KEYS", f"*:{tag}*")
        assert isinstance(keys, list)
        names |= {k.decode().replace(tag, "%", 1) for k in keys}
    for k in sorted(names):
        now, before = (_key(conn, k.replace("%", TAG[side])) for side in ("now", "before"))
        if not _same(now, before):
            diffs += 1
            print(f"key {k}: now {now!r}\n    before {before!r}")
    print(f"check (seed {seed}): {calls} calls, {len(names)} keys per side, {diffs} differences")
    return diffs


def fanout_args(tag: str, a: str, b: str, call_id: str, ts: int, threshold: int,
                window: int) -> list[str | int]:
    """Return the KEYS count, KEYS and ARGV of one fanout.lua call."""
    keys = [f"{{acm.1}}:{x}:{tag}{a}" for x in ("fw", "fe", "fa")]
    keys += [f"{{acm.1}}:s:{tag}", f"{{acm.1}}:n:{tag}"]
    return [5, *keys, call_id, a, b, str(ts), str(window), str(threshold),
            str(uuid.UUID(int=ts + 1)), "60000", "carrier-1", "gw-1"]


# -- one decision path at a time ------------------------------------------------------------
# A path: (setup, timed call) for instance i, each on a B-number of its own. setup returns the
# commands (EVALSHA of the side's own script, or plain writes) that bring B to the state.
Path_ = Callable[[str, str, str, int], tuple[list[Cmd], Cmd]]


def _callers(sha: str, tag: str, b: str, n: int, start: int = 0) -> list[list[str | int]]:
    return [["EVALSHA", sha, *decide_args(tag, b, f"+2348031{j:06d}", f"s{j}-{b}", T0 + j)]
            for j in range(start, start + n)]


def _path(n_before: int, a_index: int) -> Path_:
    def make(sha: str, tag: str, b: str, i: int):
        return _callers(sha, tag, b, n_before), ["EVALSHA", sha, *decide_args(
            tag, b, f"+2348031{a_index:06d}", f"t-{b}", T0 + 100)]
    return make


def _whitelisted(sha: str, tag: str, b: str, i: int):
    return ([["SET", f"{{acm.1}}:wl:{tag}{b}", "test"]],
            ["EVALSHA", sha, *decide_args(tag, b, "+2348031000000", f"t-{b}", T0 + 100)])


def _blocked(sha: str, tag: str, b: str, i: int):
    a = f"+2348099{i:06d}"
    return ([["HSET", f"{{acm.1}}:k:{tag}", a, f"{T0 + 10**6}|{uuid.UUID(int=i)}|HIGH"]],
            ["EVALSHA", sha, *decide_args(tag, b, a, f"t-{b}", T0 + 100)])


def _duplicate(sha: str, tag: str, b: str, i: int):
    call = ["EVALSHA", sha, *decide_args(tag, b, "+2348031000000", f"t-{b}", T0 + 100)]
    return [call], call


def _gateway_drop(sha: str, tag: str, b: str, i: int):
    return [], ["EVALSHA", sha, *decide_args(tag, b, "+2348031000000", f"t-{b}", T0 + 100,
                                             pre="drop|rate_limited")]


PATHS: dict[str, Path_] = {
    "clean, first call": _path(0, 0),
    "clean, repeat A": _path(1, 0),
    "clean, 3rd caller": _path(2, 2),
    "threshold crossing": _path(THRESHOLD - 1, THRESHOLD - 1),
    "open episode, new A": _path(THRESHOLD, THRESHOLD),
    "open episode, repeat A": _path(THRESHOLD, 0),
    "escalation": _path(SEVERITY_CRITICAL - 1, SEVERITY_CRITICAL - 1),
    "whitelisted": _whitelisted,
    "blocked": _blocked,
    "duplicate Call-ID": _duplicate,
    "gateway drop": _gateway_drop,
}


# Commands in the statistics that the script did not run.
_OUTSIDE = frozenset({"config|resetstat", "info"})


def run_paths(store: Store, shas: dict[str, str], rounds: int, calls: int, slices: int,
              profile: bool) -> None:
    """Print, per path, the store's CPU and wall µs per decision, now vs before."""
    print(f"\ndecide.lua one path at a time: {rounds} rounds x {slices} alternating slices of "
          f"{calls // slices} decisions per version\n{HEADER}")
    b_seq = 0
    for name, make in PATHS.items():
        acc = Tally()
        for _ in range(rounds):
            setup: dict[str, list[Cmd]] = {s: [] for s in SIDES}
            timed: dict[str, list[Cmd]] = {s: [] for s in SIDES}
            for i in range(calls):
                for side in SIDES:
                    s, t = make(shas[side], TAG[side], f"+2348{b_seq:09d}", i)
                    setup[side] += s
                    timed[side].append(t)
                b_seq += 1
            store.compare(setup, timed, slices, acc)
        print(acc.line(name))
        if profile:
            print("\n".join(acc.inside()))


def run_workloads(store: Store, shas_by_script: dict[str, dict[str, str]], rounds: int,
                  calls: int, slices: int) -> None:
    """Print the two mixed workloads per script, now vs before."""
    print(f"\nmixed workloads: {rounds} rounds x {slices} alternating slices of "
          f"{calls // slices} calls per version\n{HEADER}")
    n = 0
    for name, make in (("decide", _decide_call), ("fanout", _fanout_call)):
        shas = shas_by_script[name]
        for label, callers in (("no alert", 3), ("alerts", 9)):
            acc = Tally()
            for _ in range(rounds):
                timed = {side: [["EVALSHA", shas[side], *make(TAG[side], n + i, callers)]
                                for i in range(calls)] for side in SIDES}
                n += calls
                store.compare({s: [] for s in SIDES}, timed, slices, acc)
            print(acc.line(f"{name} {label}"))


def _paced(store: Store, make: dict[str, Callable[[int], Cmd]], rate: float, calls: int,
           block: int) -> dict[str, list[float]]:
    """Run make's commands one at a time at `rate`, taking turns every `block` calls (the
    first of each turn rotates); return each one's store CPU µs per call, block by block."""
    out: dict[str, list[float]] = {label: [] for label in make}
    order = list(make)
    t0 = time.monotonic()
    k = 0
    for j in range(calls // block):
        for label in order[j % len(order):] + order[:j % len(order)]:
            c0 = cpu_ns([store.pid])
            for _ in range(block):
                wait = t0 + k / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                store.conn.call(*make[label](k))
                k += 1
            out[label].append((cpu_ns([store.pid]) - c0) / 1000 / block)
    return out


def run_paced(store: Store, shas: dict[str, str], rate: float, seconds: float,
              block: int) -> None:
    """Print the store's CPU per decision at a paced rate, now vs before, and its floor.

    One connection, one call at a time: between calls the store sleeps and other processes
    take its caches, as at a few hundred calls per second through OpenSIPS. The versions take
    turns every `block` calls; a block's CPU includes the store's idle work (its cron at the
    default hz) in that time. The floor: a PING, and an EVALSHA of an empty script with
    decide.lua's KEYS and ARGV, at the same rate.
    """
    store.conn.call("CONFIG", "SET", "hz", "10")
    calls = int(rate * seconds)
    print(f"\ndecide.lua paced: {rate:g} calls/s, one connection, {calls} calls per row in "
          f"blocks of {block} taking turns\n{'':24} {'store CPU µs per call':^36}\n"
          f"{'':24} {'now':>6} {'before':>6}  now/before [IQR]")
    for label, callers in (("no alert", 3), ("alerts", 9)):
        store.prepare([])
        got = _paced(store, {side: lambda k, side=side, callers=callers: [
            "EVALSHA", shas[side], *_decide_call(TAG[side], k, callers)] for side in SIDES},
            rate, calls, block)
        ratio = [x / y for x, y in zip(got["now"], got["before"], strict=True)]
        print(f"{'decide ' + label:24} {statistics.median(got['now']):6.2f} "
              f"{statistics.median(got['before']):6.2f}  {_quartiles(ratio)}")
    store.prepare([])
    empty = store.conn.call("SCRIPT", "LOAD", "return {}")
    assert isinstance(empty, bytes)
    floor = _paced(store, {
        "PING": lambda k: ["PING"],
        "EVALSHA, empty script": lambda k: ["EVALSHA", empty.decode(),
                                            *_decide_call("F~", k, 3)]},
        rate, calls, block)
    for label, xs in floor.items():
        print(f"{label:24} {statistics.median(xs):6.2f}")
    store.conn.call("CONFIG", "SET", "hz", "100")


# What decide.lua does, one operation at a time: each runs OPS times in a loop inside one
# script (KEYS/ARGV of a clean decision, its window holding one caller); "nothing" is the loop.
OPS = 1000
_OPS = {
    "nothing": "x = i",
    "string.format('%.0f')": "x = string.format('%.0f', ts - 2 * window)",
    "tonumber": "x = tonumber(ARGV[4])",
    "dedup value (5 pieces)": "x = 'allow' .. '|' .. 'clean' .. '|' .. i .. '|' .. '' .. '|' .. ''",
    "reply table (7, nested)": "x = {'allow', 'clean', i, '', '', 0, {}}",
    "GET (absent)": "x = redis.call('GET', KEYS[5])",
    "EXISTS": "x = redis.call('EXISTS', KEYS[4])",
    "HGET (absent)": "x = redis.call('HGET', KEYS[8], ARGV[2])",
    "ZSCORE": "x = redis.call('ZSCORE', KEYS[1], ARGV[2])",
    "ZADD GT": "x = redis.call('ZADD', KEYS[1], 'GT', ARGV[4], ARGV[2])",
    "ZREMRANGEBYSCORE": "x = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. lo2)",
    "ZCOUNT": "x = redis.call('ZCOUNT', KEYS[1], lo, '+inf')",
    "PEXPIRE": "x = redis.call('PEXPIRE', KEYS[1], ARGV[11])",
    "SET ... PX": "x = redis.call('SET', KEYS[5], 'allow|clean|1||', 'PX', ARGV[10])",
    "XADD (decision record)": "x = redis.call('XADD', KEYS[6], '*', 'k', 'd', 'id', ARGV[1], "
    "'a', ARGV[2], 'b', ARGV[3], 'ts', ARGV[4], 'v', 'allow', 'r', 'clean', 'n', 1, 'al', '', "
    "'sv', '', 'ip', ARGV[12], 'tr', ARGV[13], 'rx', ARGV[14], 'md', ARGV[7], 'cr', ARGV[16], "
    "'gw', ARGV[17])",
}


def run_ops(store: Store, rounds: int) -> None:
    """Print the store CPU per operation decide.lua performs (hot: one script loops on it)."""
    pre = ("local ts, window = tonumber(ARGV[4]), tonumber(ARGV[5]) local x "
           "local lo, lo2 = string.format('%.0f', ts - window), "
           "string.format('%.0f', ts - 2 * window)\n")
    shas = {}
    for name, op in _OPS.items():
        sha = store.conn.call("SCRIPT", "LOAD", f"{pre}for i = 1, {OPS} do {op} end return {{}}")
        assert isinstance(sha, bytes)
        shas[name] = sha.decode()
    cpu: dict[str, list[float]] = {name: [] for name in _OPS}
    for r in range(rounds):
        for name, sha in shas.items():
            cmds = [["EVALSHA", sha, *decide_args("O~", f"+2348{r:03d}{i:06d}",
                                                  "+2348031000000", f"o{i}", T0 + 100)]
                    for i in range(20)]
            store.prepare([["ZADD", c[3], T0, "+2348031000000"] for c in cmds])
            cpu[name].append(store.timed(cmds)[0])
    empty = store.conn.call("SCRIPT", "LOAD", "return {}")
    assert isinstance(empty, bytes)
    whole = []
    for r in range(rounds):
        store.prepare([])
        whole.append(store.timed([["EVALSHA", empty.decode(), *decide_args(
            "O~", f"+2348{r:03d}{i:06d}", "+2348031000000", f"o{i}", T0)] for i in range(1000)])[0])
    base = statistics.median(cpu["nothing"])
    print(f"\none operation of decide.lua, {OPS} times in one script, median of {rounds} "
          f"rounds: store CPU ns per operation")
    for name, xs in cpu.items():
        if name != "nothing":
            print(f"{name:26} {(statistics.median(xs) - base) * 1000 / OPS:7.0f}")
    print(f"{'EVALSHA of an empty script with decide.lua KEYS and ARGV':58} "
          f"{statistics.median(whole) * 1000:7.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="main", help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=4, help="prepared states per path/workload")
    ap.add_argument("--calls", type=int, default=1000, help="calls per version per round")
    ap.add_argument("--slices", type=int, default=10, help="alternating slices per round")
    ap.add_argument("--paths", action="store_true", help="decide.lua one path at a time")
    ap.add_argument("--check", type=int, default=3000, metavar="N",
                    help="first feed both versions N random calls and stop on a difference")
    ap.add_argument("--seed", type=int, default=1, help="of --check's random calls")
    ap.add_argument("--paced", type=float, default=0, metavar="RATE",
                    help="decide.lua at RATE calls/s, one call at a time (e.g. 300)")
    ap.add_argument("--seconds", type=float, default=20, help="with --paced: per row")
    ap.add_argument("--block", type=int, default=50, help="with --paced: calls per turn")
    ap.add_argument("--ops", action="store_true",
                    help="the store CPU of each operation decide.lua performs")
    ap.add_argument("--profile", action="store_true",
                    help="with --paths: the store commands each path runs inside the script")
    args = ap.parse_args(argv)
    with redis_server(None) as (url, pid):
        assert pid is not None
        conn = StoreConnection(url, timeout=30.0)
        version = conn.call("INFO", "server")
        assert isinstance(version, bytes)
        print(next(x for x in version.decode().splitlines() if x.startswith("redis_version")),
              f"; now = this checkout, before = {args.against}")
        conn.call("CONFIG", "SET", "hz", "100")
        store = Store(conn, pid)
        shas = {name: {"now": conn.script_load(load_script(name)),
                       "before": conn.script_load(source_at(args.against, name))}
                for name in ("decide", "fanout")}
        if args.check and check(store, shas, args.seed, args.check):
            return 1
        if args.ops:
            run_ops(store, args.rounds)
        elif args.paced:
            run_paced(store, shas["decide"], args.paced, args.seconds, args.block)
        elif args.paths:
            run_paths(store, shas["decide"], args.rounds, args.calls, args.slices,
                      args.profile)
        else:
            run_workloads(store, shas, args.rounds, args.calls, args.slices)
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
