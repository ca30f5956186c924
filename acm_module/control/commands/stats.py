"""The pool's health: acm_stats (decisions, errors and latency per worker, per node and per
carrier, and whether every worker applies the live config)."""

from __future__ import annotations

from typing import Any

from acm_module.control.audit import Caller, iso_ms
from acm_module.control.commands.base import Command, Domain
from acm_module.core import liveconfig as store_config
from acm_module.core import stats as stats_mod


class Stats(Domain):
    """Read the workers' published stats snapshots."""

    def declare(self) -> list[Command]:
        """Return the command declarations."""
        return [
            Command("acm_stats", self.acm_stats, False,
                    "Decisions by verdict:reason, errors and latency, per worker and total; "
                    "decisions per carrier."),
        ]

    def acm_stats(self, caller: Caller) -> dict[str, Any]:
        """Return totals and per-worker stats (snapshots are at most ~1 s old)."""
        gen, _ = store_config.read(self.plane.conn)
        snaps = stats_mod.read_all(self.plane.conn)
        workers = []
        for snap in snaps:
            one = stats_mod.summarize([snap])
            one["decisions"] = _split_carriers(one["decisions"])[0]
            workers.append({
                "index": snap["index"], "pid": snap["pid"], "host": snap["host"],
                "started": iso_ms(snap["started"] * 1000),
                "updated": iso_ms(snap["updated"] * 1000),
                "config_generation": snap["config_generation"],
                "store_up": snap["store_up"], "connections": snap.get("connections", 0),
                "handoffs_sent": snap.get("handoffs_sent", 0),
                "handoffs_received": snap.get("handoffs_received", 0),
                **{k: one[k] for k in ("requests", "batches", "store_failures", "bad_frames",
                                       "decisions", "service_us", "total_us")},
            })
        total = stats_mod.summarize(snaps)
        total["decisions"], carriers = _split_carriers(total["decisions"])
        # Per node (one `acm serve` of the deployment): does every worker apply the live config?
        nodes: dict[str, dict[str, Any]] = {}
        for snap, w in zip(snaps, workers, strict=True):
            n = nodes.setdefault(snap["node"], {"node": snap["node"], "host": snap["host"],
                                                "workers": 0, "config_generations": set()})
            n["workers"] += 1
            n["config_generations"].add(w["config_generation"])
        for n in nodes.values():
            n["config_generations"] = sorted(n["config_generations"])
            n["in_sync"] = n["config_generations"] == [gen]
        return {"generation": gen,
                "in_sync": bool(snaps) and all(w["config_generation"] == gen for w in workers),
                "nodes": sorted(nodes.values(), key=lambda n: n["node"]),
                "total": total, "workers": workers, "carriers": carriers}


def _split_carriers(decisions: dict[str, int]) -> tuple[dict[str, int], dict[str, Any]]:
    """Split worker counters into the global ones and {carrier: {verdict:reason: n, "total"}}
    (the per-carrier keys are `@<carrier>|<verdict>:<reason>`, docs/GATEWAY.md)."""
    plain: dict[str, int] = {}
    carriers: dict[str, dict[str, int]] = {}
    for k, n in decisions.items():
        if not k.startswith("@"):
            plain[k] = n
            continue
        carrier, _, vr = k[1:].partition("|")
        c = carriers.setdefault(carrier, {"total": 0})
        c[vr] = c.get(vr, 0) + n
        c["total"] += n
    return plain, dict(sorted(carriers.items()))
