"""Stream records written the way decide.lua and fanout.lua append them (docs/GATEWAY.md), for
tests that need exact control over carriers, gateways, reasons and alert types.

`attributed=False` writes a record as it was before gateway attribution (no cr/gw/typ fields).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from acm_module.core import keys
from acm_module.core import records as rec
from acm_module.decide.engine import hotpath
from acm_module.decide.store.conn import StoreConnection
from acm_module.write.writer import DLQ_KEY
from tests.support.pgqdb import stream_records

PARTITIONS = 16
Record = tuple[str, dict[str, str]]  # (stream key, fields)


def _stream_of(number: str) -> str:
    return keys.stream(hotpath.partition_of(number, PARTITIONS))


def decision(call_id: str, a: str, b: str, ts_ms: int, *, verdict: str = "allow",
             reason: str = "clean", distinct: int = 1, alert_id: str = "", severity: str = "",
             carrier: str = "", gateway: str = "", mode: str = "block",
             attributed: bool = True) -> Record:
    """Return a `k=d` record in B's partition stream."""
    f = {"k": "d", "id": call_id, "a": a, "b": b, "ts": str(ts_ms), "v": verdict, "r": reason,
         "n": str(distinct), "al": alert_id, "sv": severity, "ip": "198.51.100.7",
         "tr": "tg-101", "rx": str(ts_ms * 1000), "md": mode}
    if attributed:
        f |= {"cr": carrier, "gw": gateway}
    return _stream_of(b), f


def masking_alert(alert_id: str, b: str, a_numbers: list[str], t0_ms: int, t1_ms: int, *,
                  ver: int = 1, severity: str = "HIGH", carrier: str = "", gateway: str = "",
                  attributed: bool = True) -> Record:
    """Return a masking `k=a` record in B's partition stream."""
    f = {"k": "a", "al": alert_id, "op": "open" if ver == 1 else "update", "b": b,
         "sv": severity, "n": str(len(a_numbers)), "an": ",".join(a_numbers),
         "t0": str(t0_ms), "t1": str(t1_ms), "ver": str(ver), "wms": "5000", "blk": "0"}
    if attributed:
        f |= {"typ": "masking", "cr": carrier, "gw": gateway}
    return _stream_of(b), f


def fanout_alert(alert_id: str, a: str, b_numbers: list[str], t0_ms: int, t1_ms: int, *,
                 ver: int = 1, severity: str = "HIGH", carrier: str = "", gateway: str = ""
                 ) -> Record:
    """Return a fan-out `k=a` record in A's partition stream (fanout.lua's field order)."""
    return _stream_of(a), {
        "k": "a", "al": alert_id, "op": "open" if ver == 1 else "update", "typ": "fanout",
        "a": a, "b": "", "sv": severity, "n": str(len(b_numbers)), "an": ",".join(b_numbers),
        "t0": str(t0_ms), "t1": str(t1_ms), "ver": str(ver), "wms": "60000", "blk": "0",
        "cr": carrier, "gw": gateway}


def xadd(store_url: str, records: Iterable[Record | tuple[str, Mapping[str, str]]]
         ) -> list[str]:
    """Append the records (pipelined, in order); return their entry ids."""
    cmds = [hotpath.encode_command("XADD", stream, "*", *[x for kv in f.items() for x in kv])
            for stream, f in records]
    if not cmds:
        return []
    c = StoreConnection(store_url, timeout=5.0)
    try:
        out = c.round_trip(b"".join(cmds), len(cmds), 10.0)
    finally:
        c.close()
    ids = []
    for r in out:
        if isinstance(r, hotpath.RespError):
            raise AssertionError(f"XADD failed: {r.message}")
        ids.append(r.decode() if isinstance(r, bytes) else str(r))
    return ids


def parsed(store_url: str) -> tuple[list[rec.Decision], list[rec.AlertChange]]:
    """Return every record still in the partition streams, parsed the writer's strict way."""
    decisions: list[rec.Decision] = []
    changes: list[rec.AlertChange] = []
    for s, eid, f in stream_records(store_url):
        if f["k"] == "d":
            decisions.append(rec.parse_decision(f"{s}/{eid}", f))
        else:
            changes.append(rec.parse_alert(f"{s}/{eid}", f))
    return decisions, changes


def dead_letters(store_url: str) -> list[dict[str, str]]:
    """Return the fields of every dead-letter entry."""
    c = StoreConnection(store_url, timeout=5.0)
    try:
        return [{f[i].decode(): f[i + 1].decode() for i in range(0, len(f), 2)}
                for _, f in c.call("XRANGE", DLQ_KEY, "-", "+")]  # type: ignore[union-attr]
    finally:
        c.close()
