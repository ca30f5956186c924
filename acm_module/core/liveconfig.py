"""Shared state outside the per-B-number script: live detection config, blocks, whitelist.

Keys (each group has its own hash tag, so every multi-key command stays in one slot):
  {acm.cfg}:detect      HASH  live detection config + `gen` (workers poll it) + `boot` +
                              `src` (boot, mi, restore); `gen` >= the publisher's clock in
                              ms, never reissued
  {acm.<p>}:k           HASH  A-number -> "expiry_ms|alert_id|severity": the block list, one
                              copy per partition so decide.lua checks it in its own slot
  {acm.<p>}:wl:<b>      STRING whitelist marker of B-number b (value: reason), TTL = expiry
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from acm_module.core import keys, numbers, settings
from acm_module.core.errors import StoreReplyError
from acm_module.core.types import RespError


class Store(Protocol):
    """The worker's StoreClient or redis-py's client (core.redis.open_redis): both have
    execute_command and pipeline, parse replies alike and raise StoreError."""

    def execute_command(self, *args: Any, **options: Any) -> Any: ...

    def pipeline(self, transaction: bool = True) -> Any: ...

CONFIG_KEY = "{acm.cfg}:detect"
DECIDER_KEYS = ("threshold", "window", "mode", "dedup_ttl", "block_ttl")
_TYPES = settings.RUNTIME_TYPES

# A generation is at least the publisher's clock in ms (as the carrier registry's version), so a
# store that lost its data (FLUSHALL, a restart without persistence, a new Dragonfly) never
# hands out a generation a worker already holds for another config.
_NEXT_GEN = """
local function next_gen(now)
  local gen = math.max(tonumber(redis.call('HGET', KEYS[1], 'gen') or '0') + 1, tonumber(now))
  redis.call('HSET', KEYS[1], 'gen', string.format('%.0f', gen))
  return gen
end
"""

# Publish a config once per supervisor boot: the first worker of a new boot writes its settings
# and moves the generation on; the others of the same boot find their boot id and leave it.
_INIT_BOOT = _NEXT_GEN + """
if redis.call('HGET', KEYS[1], 'boot') == ARGV[1] then return 0 end
local gen = next_gen(ARGV[3])
redis.call('HSET', KEYS[1], 'boot', ARGV[1], 'values', ARGV[2], 'src', 'boot')
return gen
"""

# Replace the config only if it is still the generation the writer read (no lost update).
_SET_IF_GEN = _NEXT_GEN + """
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
if gen ~= tonumber(ARGV[1]) then return -1 end
gen = next_gen(ARGV[3])
redis.call('HSET', KEYS[1], 'values', ARGV[2], 'src', 'mi')
return gen
"""

# Put a config back into a store that has none (it lost its data); 0 if one is there. The
# boot id goes back too, so a worker of the same boot that (re)starts does not publish its
# boot settings over the restored config.
_RESTORE = _NEXT_GEN + """
if redis.call('HEXISTS', KEYS[1], 'values') == 1 then return 0 end
local gen = next_gen(ARGV[3])
redis.call('HSET', KEYS[1], 'values', ARGV[2], 'src', 'restore')
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'boot', ARGV[1]) end
return gen
"""

# Add blocks to one partition's copy of the block list; drop entries expired before ARGV[1]
# (call time). A later expiry wins. The copy expires a minute after its last block would.
_BLOCK = """
local now = tonumber(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local exp = tonumber(string.match(all[i + 1], '^(%d+)|'))
  if exp and exp < now then redis.call('HDEL', KEYS[1], all[i]) end
end
local last = 0
for i = 2, #ARGV, 3 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  local old_exp = old and tonumber(string.match(old, '^(%d+)|')) or 0
  local exp = tonumber(ARGV[i + 1])
  if exp > old_exp then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. '|' .. ARGV[i + 2])
  end
  if exp > last then last = exp end
end
local ttl = math.max(last - now, 0) + 60000
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _TYPES[k](v) for k, v in values.items() if k in _TYPES}


def _now_ms() -> int:
    return int(time.time() * 1000)


def init_boot(conn: Store, boot_id: str, values: dict[str, Any]) -> int:
    """Publish `values` as the live config unless this boot already did. Return the generation
    (0 when this boot had published)."""
    r = conn.execute_command("EVAL", _INIT_BOOT, 1, CONFIG_KEY, boot_id,
                             json.dumps(values, sort_keys=True), _now_ms())
    return int(r)  # type: ignore[arg-type]


def restore(conn: Store, values: dict[str, Any], boot_id: str = "") -> int:
    """Publish `values` if the store has no live config; return the generation, 0 if it had."""
    r = conn.execute_command("EVAL", _RESTORE, 1, CONFIG_KEY, boot_id,
                             json.dumps(values, sort_keys=True), _now_ms())
    return int(r)  # type: ignore[arg-type]


def read(conn: Store) -> tuple[int, dict[str, Any] | None]:
    """Return (generation, config values) of the live config; (0, None) if none is published."""
    return parse_read(conn.execute_command("HMGET", CONFIG_KEY, "gen", "values"))


def read_origin(conn: Store) -> tuple[int, dict[str, Any] | None, str, str]:
    """Return (generation, values, boot id, source) of the live config; the source is "boot"
    (a worker's start-up settings), "mi" (a change) or "restore" ("" when unknown)."""
    r = conn.execute_command("HMGET", CONFIG_KEY, "gen", "values", "boot", "src")
    assert isinstance(r, list)
    gen, values = parse_read(r[:2])
    boot, src = (b.decode() if isinstance(b, bytes) else "" for b in r[2:])
    return gen, values, boot, src


def parse_read(r: Any) -> tuple[int, dict[str, Any] | None]:
    """Parse the reply of `HMGET CONFIG_KEY gen values` (workers pipeline it with other reads)."""
    if isinstance(r, RespError):
        raise StoreReplyError(r.message)
    if isinstance(r, StoreReplyError):  # a pipeline's error reply (raise_on_error=False)
        raise r
    assert isinstance(r, list)
    if r[0] is None or r[1] is None:
        return 0, None
    return int(r[0]), _coerce(json.loads(r[1]))


def compare_and_set(conn: Store, expected_gen: int, values: dict[str, Any]) -> int:
    """Replace the live config if it is still at expected_gen; return the new gen, or -1."""
    r = conn.execute_command("EVAL", _SET_IF_GEN, 1, CONFIG_KEY, expected_gen,
                             json.dumps(values, sort_keys=True), _now_ms())
    return int(r)  # type: ignore[arg-type]


def write_blocks(conn: Store, todo: list[tuple[str, int, str, str]],
                 now_ms: int, partitions: int) -> None:
    """Block A-numbers: (a_number, expiry_ms, alert_id, severity), in every partition's copy.

    Blocks live in call time (the requests' ts), so entries expired before now_ms (the
    detecting call's ts) are purged here rather than by a wall-clock TTL. Blocks are rare: one
    pipeline writes all copies (one buffer per master in a cluster).
    """
    if not todo:
        return
    args: list[str | int] = []
    for a, exp, alert_id, sev in todo:
        args += [a, exp, f"{alert_id}|{sev}"]
    pipe = conn.pipeline(transaction=False)
    for p in range(partitions):
        pipe.execute_command("EVAL", _BLOCK, 1, keys.blocks(p), now_ms, *args)
    pipe.execute()


def list_blocks(conn: Store, partitions: int) -> list[dict[str, Any]]:
    """Return every block entry as {a_number, expires_ms, alert_id, severity}."""
    del partitions  # every partition holds the same list: read the first copy
    out = []
    for a, v in conn.execute_command("HGETALL", keys.blocks(0)).items():
        exp, alert_id, sev = v.decode().split("|")
        out.append({"a_number": a.decode(), "expires_ms": int(exp), "alert_id": alert_id,
                    "severity": sev})
    return sorted(out, key=lambda e: e["a_number"])


def unblock(conn: Store, a_number: str, partitions: int) -> bool:
    """Release one blocked A-number in every copy; return whether it was blocked."""
    pipe = conn.pipeline(transaction=False)
    for p in range(partitions):
        pipe.execute_command("HDEL", keys.blocks(p), a_number)
    return any(v == 1 for v in pipe.execute())


def whitelist_key(b_number: str, partitions: int) -> str:
    """Return the store key of a (normalised) B-number's whitelist marker."""
    return keys.for_b(b_number, numbers.partition_of(b_number, partitions))["whitelist"]


def whitelist_set(conn: Store, b_number: str, partitions: int, reason: str,
                  ttl_ms: int | None = None) -> None:
    """Whitelist a normalised B-number in the store (ttl_ms: until it expires)."""
    key = whitelist_key(b_number, partitions)
    if ttl_ms:
        conn.execute_command("SET", key, reason or "-", "PX", ttl_ms)
    else:
        conn.execute_command("SET", key, reason or "-")


def whitelist_del(conn: Store, b_number: str, partitions: int) -> bool:
    """Remove a B-number's whitelist marker; return whether it existed."""
    return bool(conn.execute_command("DEL", whitelist_key(b_number, partitions)))
