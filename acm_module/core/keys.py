"""Key names. Every key of one B-number shares the hash tag of its partition, `{acm.<p>}`, and so
does that partition's durable stream: the decision script touches only declared keys of one slot,
which Dragonfly cluster mode and Redis Cluster require, and still appends to a stream in the same
atomic step. (A tag per B-number itself would put the stream in another slot.)
"""

from __future__ import annotations

import os


def tag(partition: int) -> str:
    """Return the key prefix of a partition, hash tag included."""
    return "{acm.%d}:" % partition


def stream(partition: int) -> str:
    """Return the durable stream of a partition."""
    return tag(partition) + "s"


def counters(partition: int) -> str:
    """Return the alert counters hash of a partition (open:<SEV>, esc:<SEV>, upd)."""
    return tag(partition) + "n"


def blocks(partition: int) -> str:
    """Return a partition's copy of the block list (A-number -> "expiry|alert|severity")."""
    return tag(partition) + "k"


def streams(partitions: int) -> list[str]:
    """Return every partition's durable stream."""
    return [stream(p) for p in range(partitions)]


def for_b(b_number: str, partition: int) -> dict[str, str]:
    """Return the keys of a normalised B-number in its partition (window, episode, members,
    whitelist); the partition is the engine's `partition_of(b_number, partitions)`."""
    t = tag(partition)
    return {"window": t + "w:" + b_number, "episode": t + "e:" + b_number,
            "members": t + "ea:" + b_number, "whitelist": t + "wl:" + b_number}


def alert_prefix() -> str:
    """Return a random UUIDv4 prefix; alert ids are this plus a 12-hex-digit counter."""
    h = os.urandom(10).hex()
    return f"{h[0:8]}-{h[8:12]}-4{h[12:15]}-{'89ab'[int(h[15], 16) & 3]}{h[16:19]}"
