"""The store for a URL: one standalone server, or a Redis Cluster (Dragonfly in cluster mode).

`StoreClient` detects which at connect(). Standalone, it is a StoreConnection and nothing more:
its round_trip() is the connection's own. In a cluster it holds one StoreConnection per master,
splits every pipelined payload by the slot of each command's key (one buffer per node, all sent
before any is read), follows MOVED and ASK, and reloads the slot map when it moved. A node that
fails or times out fails the whole round trip (StoreError), so the caller answers
store_unavailable at once and reconnects: the reconnect reloads the map from any live seed,
which after a failover names the promoted replica.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from acm_module.core.errors import StoreError, StoreReplyError
from acm_module.core.storeurl import StoreAddress, parse_seeds, safe_url
from acm_module.decide.engine import hotpath
from acm_module.decide.store.conn import RedisInterface, StoreConnection

log = logging.getLogger("acm.store")

SLOTS = 16384
MAX_REDIRECTS = 8

# Commands without a key: sent to every master (script cache, flushes) or to any one.
_EVERY_MASTER = {b"SCRIPT", b"FLUSHDB", b"FLUSHALL"}
_ANY_NODE = {b"PING", b"INFO", b"TIME", b"CLUSTER", b"ECHO", b"AUTH", b"SELECT", b"DBSIZE",
             b"CONFIG", b"READONLY", b"ASKING", b"DEBUG", b"WAIT"}


def _crc16_table() -> list[int]:
    out = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) if c & 0x8000 else c << 1
        out.append(c & 0xFFFF)
    return out


_CRC = _crc16_table()


def key_slot(key: bytes) -> int:
    """Return the cluster slot of a key (CRC16/XMODEM of its hash tag, as Redis computes it)."""
    s = key.find(b"{")
    if s >= 0:
        e = key.find(b"}", s + 1)
        if e > s + 1:
            key = key[s + 1:e]
    crc = 0
    for b in key:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC[((crc >> 8) ^ b) & 0xFF]
    return crc & (SLOTS - 1)


def command_key(args: list) -> bytes | None:
    """Return the key that routes a command (its first key), or None for a keyless one."""
    name = args[0].upper()
    if name in (b"EVALSHA", b"EVAL", b"FCALL", b"EVALSHA_RO", b"EVAL_RO"):
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    if name in (b"XREADGROUP", b"XREAD"):
        i = [a.upper() for a in args].index(b"STREAMS")
        return args[i + 1]
    if name in (b"XGROUP", b"XINFO", b"OBJECT", b"MEMORY"):
        return args[2] if len(args) > 2 else None
    if name in _EVERY_MASTER or name in _ANY_NODE or name == b"SCAN" or len(args) < 2:
        return None
    return args[1]


class StoreClient(RedisInterface):
    """A connection to the store a URL names, standalone or cluster (detected at connect()).

    The interface of StoreConnection: connect, close, connected, call, round_trip,
    script_load, set_timeout, safe_url.
    """

    def __init__(self, url: str, timeout: float = 0.02, connect_timeout: float = 1.0,
                 conn_class: Any = StoreConnection) -> None:
        self.url = url
        # The class of each node's connection: StoreConnection on the hot path, the writer's
        # StreamConnection (hiredis, big replies) there.
        self._conn_class = conn_class
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._seeds = parse_seeds(url)
        self.cluster = False
        self._single: Any = None
        self._nodes: dict[tuple[str, int], Any] = {}
        self._masters: list[tuple[str, int]] = []
        self._slot_node: list[tuple[str, int] | None] = [None] * SLOTS
        self._tag_slot: dict[bytes, int] = {}
        self._scripts: dict[str, str] = {}  # sha -> source, loaded on every new node
        self.map_reloads = 0
        self.redirects = 0

    # -- connection management -------------------------------------------------------------
    def connect(self) -> None:
        """Connect through the first seed that answers; detect standalone vs cluster.

        In a cluster every master of the seed's map must connect, else the next seed's map is
        tried: during a failover some nodes still name the old master. Raises StoreError when
        no seed gives a map whose masters all answer.
        """
        self.close()
        self._single = None
        err: StoreError | None = None
        give_up = time.monotonic() + self.connect_timeout
        for c, addr, shards in self._seed_maps():
            if shards is None:
                self.cluster = False
                self._single = c
                # Standalone: the connection's own methods, no routing in between.
                self.round_trip = c.round_trip  # type: ignore[method-assign]
                return
            self.cluster = True
            self.__dict__.pop("round_trip", None)
            self._nodes[(addr.host, addr.port)] = c
            self._apply_map(shards, addr)
            try:
                for host_port in self._masters:
                    self._node(host_port)
                return
            except StoreError as e:
                err = e
                self.close()
                if time.monotonic() > give_up:
                    break  # a caller waits for this: try again on its next attempt
        raise err or StoreError(f"store {self.safe_url()}: no seed answered")

    def _seed_maps(self) -> Iterator[tuple[Any, StoreAddress, list | None]]:
        """Yield (connection, address, slot map or None) of every seed that answers.

        Raises StoreError (the last seed's) when none does.
        """
        err: StoreError | None = None
        # The URL's seeds first, then every master of the last map: a cluster whose seed died
        # is still found through the nodes it had.
        known = [self._seeds[0].at(*hp) for hp in self._masters]
        answered = False
        for addr in [*self._seeds, *(a for a in known if a not in self._seeds)]:
            c = self._conn(addr)
            try:
                c.connect()
                shards = _read_map(c)
            except StoreError as e:
                c.close()
                err = e
                continue
            answered = True
            yield c, addr, shards
        if not answered:
            assert err is not None
            raise err

    def _conn(self, addr: StoreAddress) -> StoreConnection:
        return self._conn_class(self.url, self.timeout, self.connect_timeout, address=addr)

    def _node(self, host_port: tuple[str, int]) -> Any:
        """Return the connection to a node, opening it (and loading the scripts) if new."""
        c = self._nodes.get(host_port)
        if c is None:
            c = self._conn(self._seeds[0].at(*host_port))
            self._nodes[host_port] = c
        if not c.connected:
            c.connect()
            for src in self._scripts.values():
                c.call("SCRIPT", "LOAD", src)
        return c

    def _apply_map(self, shards: list[tuple[list[tuple[int, int]], tuple[str, int]]],
                   seed: StoreAddress) -> None:
        slot_node: list[tuple[str, int] | None] = [None] * SLOTS
        masters = []
        for ranges, (host, port) in shards:
            hp = (host or seed.host, port)  # an empty or "?" endpoint: the seed's address
            masters.append(hp)
            for a, b in ranges:
                slot_node[a:b + 1] = [hp] * (b + 1 - a)
        self._slot_node = slot_node
        self._masters = masters
        self.map_reloads += 1
        for hp in list(self._nodes):
            if hp not in masters:  # demoted or gone
                self._nodes.pop(hp).close()

    def reload_map(self) -> None:
        """Read the slot map again from any node that answers. Raises StoreError."""
        err: StoreError | None = None
        cands = [c for c in self._nodes.values() if c.connected]
        for c in cands:
            try:
                shards = _read_map(c)
            except StoreError as e:
                err = e
                continue
            if shards is not None:
                self._apply_map(shards, self._seeds[0])
                return
        for c, addr, shards in self._seed_maps():
            c.close()
            if shards is not None:
                self._apply_map(shards, addr)
                return
        raise err or StoreError(f"store {self.safe_url()}: no node gave the slot map")

    @property
    def connected(self) -> bool:
        """Say whether the connection (every master's, in a cluster) is open."""
        if self._single is not None:
            return self._single.connected
        return bool(self._nodes) and all(c.connected for c in self._nodes.values())

    def close(self) -> None:
        """Close every connection."""
        if self._single is not None:
            self._single.close()
        for c in self._nodes.values():
            c.close()
        self._nodes.clear()

    def safe_url(self) -> str:
        """Return the URL without its password, for logs."""
        return safe_url(self.url)

    def set_timeout(self, timeout: float) -> None:
        """Change the per-round-trip timeout."""
        self.timeout = timeout
        for c in [self._single, *self._nodes.values()]:
            if c is not None:
                c.set_timeout(timeout)

    def masters(self) -> list[tuple[str, int]]:
        """Return (host, port) of every master (the one server when standalone)."""
        if self._single is not None or not self.cluster:
            a = self._seeds[0]
            return [(a.host, a.port)]
        return list(self._masters)

    def master_of_slot(self, slot: int) -> tuple[str, int]:
        """Return (host, port) of the master owning a slot, as the last map says."""
        hp = self._slot_node[slot]
        if hp is None:
            raise StoreError(f"store {self.safe_url()}: slot {slot} has no master")
        return hp

    def on_each_master(self, *args: bytes | str | int, timeout: float | None = None) -> list:
        """Run one command on every master (the one server when standalone); return replies."""
        if not self.cluster:
            return [self.call(*args, timeout=timeout)]
        out = []
        for hp in list(self._masters):
            r = self._node(hp).round_trip(hotpath.encode_command(*args), 1,
                                          timeout if timeout is not None else self.timeout)[0]
            if isinstance(r, hotpath.RespError):
                raise StoreReplyError(r.message)
            out.append(r)
        return out

    # -- I/O -------------------------------------------------------------------------------
    def call(self, *args: bytes | str | int, timeout: float | None = None) -> object:
        """Run one command; raise StoreReplyError for an error reply."""
        if not self.cluster or self._single is not None:
            if self._single is None:
                self.connect()
                if self.cluster:
                    return self.call(*args, timeout=timeout)
            assert self._single is not None
            return self._single.call(*args, timeout=timeout)
        name = (args[0].encode() if isinstance(args[0], str) else bytes(args[0])).upper() \
            if not isinstance(args[0], int) else b""
        if name in _EVERY_MASTER:
            return self.on_each_master(*args, timeout=timeout)[0]
        (reply,) = self.round_trip(hotpath.encode_command(*args), 1, timeout)
        if isinstance(reply, hotpath.RespError):
            raise StoreReplyError(reply.message)
        return reply

    def round_trip(self, payload: bytes, n: int, timeout: float | None = None) -> list:
        """Send n pipelined commands, each to the master of its key's slot; return n replies.

        Error replies come back as RespError (MOVED and ASK are followed first); a node that
        fails or times out raises StoreError and closes every connection.
        """
        if not self.cluster or not self._nodes:
            self.connect()  # the first use, or the first after a failure closed the nodes
            if not self.cluster:
                return self.round_trip(payload, n, timeout)
        budget = self.timeout if timeout is None else timeout
        cmds: list[tuple[list, int, int]] | None = None
        try:
            if len(self._masters) == 1:
                # One master owns every slot: the payload goes as it is, nothing to split
                # unless a reply redirects (a slot moved since).
                out = self._node(self._masters[0]).round_trip(payload, n, budget)
            else:
                cmds = _split(payload, n)
                groups: dict[tuple[str, int], list[int]] = {}
                route = self._route
                for i, (args, _, _) in enumerate(cmds):
                    groups.setdefault(route(args), []).append(i)
                out = [None] * n
                self._exchange(payload, cmds, groups, out, budget, asking=False)
            give_up = time.monotonic() + budget
            redirects = 0
            while redirects < MAX_REDIRECTS:
                moved: dict[tuple[str, int], list[int]] = {}
                ask: dict[tuple[str, int], list[int]] = {}
                retry: dict[tuple[str, int], list[int]] = {}
                for i, r in enumerate(out):
                    if not isinstance(r, hotpath.RespError):
                        continue
                    if r.message[:4] in ("MOVE", "ASK "):
                        kind, _, target = r.message.split(" ", 2)
                        h, _, p = target.rpartition(":")
                        (moved if kind == "MOVED" else ask).setdefault(
                            (h or self._seeds[0].host, int(p)), []).append(i)
                    elif r.message.startswith("TRYAGAIN"):
                        # A slot being migrated holds some of a script's keys: again shortly.
                        if cmds is None:
                            cmds = _split(payload, n)
                        retry.setdefault(self._route(cmds[i][0]), []).append(i)
                if not moved and not ask and not retry:
                    break
                if retry:
                    # Until the keys are all on one side, within the round trip's budget (the
                    # request then gets the TRYAGAIN as its store_error).
                    if time.monotonic() + 0.002 >= give_up:
                        break
                    time.sleep(0.002)
                    self._exchange(payload, cmds, retry, out, budget, asking=False)
                    continue
                redirects += 1
                self.redirects += 1
                if cmds is None:
                    cmds = _split(payload, n)
                if moved:
                    self.reload_map()
                    self._exchange(payload, cmds, moved, out, budget, asking=False)
                if ask:
                    self._exchange(payload, cmds, ask, out, budget, asking=True)
            return out
        except StoreError:
            self.close()
            raise

    def _route(self, args: list) -> tuple[str, int]:
        name = args[0]
        # The hot path's commands first, without the general lookup.
        key = args[3] if name == b"EVALSHA" and args[2] != b"0" else args[1] \
            if name == b"XADD" else command_key(args)
        if key is None:
            return self._masters[0]
        s = key.find(b"{")
        tag = key if s < 0 else key[s:key.find(b"}", s) + 1]
        slot = self._tag_slot.get(tag)
        if slot is None:
            slot = self._tag_slot[tag] = key_slot(key)
        hp = self._slot_node[slot]
        if hp is None:
            raise StoreError(f"store {self.safe_url()}: slot {slot} has no master")
        return hp

    def _exchange(self, payload: bytes, cmds: list[tuple[list, int, int]],
                  groups: dict[tuple[str, int], list[int]], out: list, budget: float,
                  asking: bool) -> None:
        """Send each node its commands in one buffer, then read every node's replies."""
        sent = []
        asking_cmd = hotpath.encode_command("ASKING")
        for hp, idx in groups.items():
            conn = self._node(hp)
            if len(idx) == len(cmds) and not asking:
                buf = payload  # one node takes the whole batch: no copy
            else:
                parts = []
                for i in idx:
                    if asking:
                        parts.append(asking_cmd)
                    parts.append(payload[cmds[i][1]:cmds[i][2]])
                buf = b"".join(parts)
            sent.append((conn, idx, conn.send(buf, budget)))
        for conn, idx, deadline in sent:
            replies = conn.read(len(idx) * (2 if asking else 1), deadline)
            if asking:
                replies = replies[1::2]
            for i, r in zip(idx, replies, strict=True):
                out[i] = r

    def script_load(self, source: str) -> str:
        """Load a Lua script (on every master) and return its SHA1."""
        sha = _bytes(self.call("SCRIPT", "LOAD", source))
        assert isinstance(sha, bytes)
        self._scripts[sha.decode()] = source
        return sha.decode()

    def scan_iter(self, match: str = "*", count: int = 1000) -> Iterable[bytes]:
        """Yield every key matching a pattern, on every master (redis-py's name)."""
        return self.scan_keys(match, count)

    def scan_keys(self, pattern: str, count: int = 1000,
                  timeout: float | None = None) -> Iterable[bytes]:
        """Yield every key matching pattern, on every master."""
        if self._single is None and not self._nodes:
            self.connect()
        for hp in self.masters():
            conn = self._single if not self.cluster else self._node(hp)
            assert conn is not None
            cursor: bytes | int = 0
            while True:
                r = conn.call("SCAN", cursor, "MATCH", pattern, "COUNT", count, timeout=timeout)
                assert isinstance(r, list)
                cursor = r[0]
                yield from r[1]
                if cursor in (b"0", 0, "0"):
                    break


def _split(payload: bytes, n: int) -> list[tuple[list, int, int]]:
    """Split pipelined commands into (args, start, end): a request is a RESP array too."""
    out = []
    pos = 0
    for _ in range(n):
        args, end = hotpath.parse_reply(payload, pos)
        out.append((args, pos, end))
        pos = end
    return out


def _bytes(v: Any) -> Any:
    """Return a reply with str (a hiredis connection's) as bytes, like StoreConnection's."""
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, list):
        return [_bytes(x) for x in v]
    return v


def _read_map(c: Any) -> list[tuple[list[tuple[int, int]], tuple[str, int]]] | None:
    """Return [(slot ranges, master (host, port))], or None for a standalone server.

    CLUSTER SHARDS (Redis 7, Dragonfly), else CLUSTER SLOTS. Raises StoreError.
    """
    # Bounded like a connect: a worker's reconnect must not hold its clients much longer.
    r = _bytes(c.round_trip(hotpath.encode_command("CLUSTER", "SHARDS"), 1,
                            c.connect_timeout)[0])
    if isinstance(r, hotpath.RespError):
        msg = r.message.lower()
        if "disabled" in msg or "not enabled" in msg or "cluster mode" in msg \
                or "cluster support" in msg:
            return None
        return _read_slots(c)
    out = []
    for shard in r:
        d = dict(zip(shard[::2], shard[1::2], strict=True))
        slots = d.get(b"slots") or []
        ranges = [(int(slots[i]), int(slots[i + 1])) for i in range(0, len(slots), 2)]
        for node in d.get(b"nodes") or []:
            nd = dict(zip(node[::2], node[1::2], strict=True))
            if nd.get(b"role") == b"master" and nd.get(b"health", b"online") == b"online":
                host = (nd.get(b"ip") or nd.get(b"endpoint") or b"").decode()
                if host == "?":
                    host = ""
                out.append((ranges, (host, int(nd[b"port"]))))
                break
    return [s for s in out if s[0]]


def _read_slots(c: Any) -> list[tuple[list[tuple[int, int]], tuple[str, int]]] | None:
    r = _bytes(c.round_trip(hotpath.encode_command("CLUSTER", "SLOTS"), 1,
                            c.connect_timeout)[0])
    if isinstance(r, hotpath.RespError):
        return None  # no cluster support: a standalone server
    by_master: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for rng in r:
        host = (rng[2][0] or b"").decode()
        by_master.setdefault((host if host != "?" else "", int(rng[2][1])), []).append(
            (int(rng[0]), int(rng[1])))
    return [(ranges, hp) for hp, ranges in by_master.items()]
