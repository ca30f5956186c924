"""A worker process: drain requests from its ROUTER socket, decide them in one store round trip,
reply. Everything process-wide (ZeroMQ context, sockets, store connection) is created here, after
fork().
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import zmq

from acm_module.core import keys, registry
from acm_module.core import liveconfig as store_config
from acm_module.core import stats as stats_mod
from acm_module.core.backoff import Backoff
from acm_module.core.errors import BOOT_ERROR, StoreError
from acm_module.core.logs import apply_log_level
from acm_module.decide.access import Access, apply_access
from acm_module.decide.engine import IMPLEMENTATION, hotpath
from acm_module.decide.gateway.context import GatewayContext
from acm_module.decide.store.cluster import StoreClient
from acm_module.decide.store.conn import load_script, script_sha
from acm_module.decide.zmtp import IN_HWM, Balance, Handoff, ZmtpServer, split_envelope

log = logging.getLogger("acm.worker")

LATENCY_STREAM = "{acm.lat}:s"
DRAIN_WINDOW_S = 0.1  # after SIGTERM, keep answering stragglers this long
BUDGET_STEP_S = 0.005  # a batch's store budget shrinks in these steps (see _store_budget)
# Latencies ride on a decision round trip at most this often (or once LATENCY_BATCH are held): one
# XADD per batch cost the store and the worker a command per call at low concurrency.
LATENCY_FLUSH_NS = 100_000_000
LATENCY_BATCH = 256
# The config poll: the live config's generation and values, and the registry's version, in one
# pipelined round trip (parsed by liveconfig.parse_read and registry.parse_version).
_POLL_COMMANDS = (hotpath.encode_command("HMGET", store_config.CONFIG_KEY, "gen", "values")
                  + hotpath.encode_command("HGET", registry.REGISTRY_KEY, "ver"))


class Worker:
    """One decision worker bound to a shared listening socket."""

    def __init__(self, settings: Any, listen_fd: int, index: int, boot_id: str,
                 heartbeat: Any = None, load: Any = None, slot: int | None = None,
                 rates: Any = None, handoff_dir: str | None = None) -> None:
        self.settings = settings
        self.listen_fd = listen_fd
        self.index = index
        # Its place in the heartbeat and load arrays: the supervisor's, as old and new workers
        # of a reload overlap (the index alone would collide); the index when run alone.
        self.slot = index if slot is None else slot
        self.boot_id = boot_id
        self.heartbeat = heartbeat
        self.load = load  # the pool's connection counts (shared memory), to spread connections
        self.rates = rates  # the pool's request rates (shared memory), to move busy connections
        self.handoff_dir = handoff_dir  # where the workers' hand-off inboxes are bound
        self.stopping = False
        self.stats = stats_mod.WorkerStats(index=index, pid=os.getpid())
        self._stats_field = f"{stats_mod.socket.gethostname()}/{boot_id[:8]}/{index}"
        self._stats_next = 0.0
        self._store_time_ns = 0
        self._latencies: list[tuple[int, int]] = []  # (rx_us of a batch, its latency in us)
        self._latency_due_ns = 0  # perf_counter_ns after which held latencies are sent
        # rx_us of batches answered store_unavailable after their scripts were sent: the store
        # may still run them and record decisions nobody was told about (see decide()).
        self._unanswered: list[int] = []
        self._store_down_until = 0.0
        # Capped low so the pool is back within a second or two of the store's return.
        self._backoff = Backoff(0.05, 1.0)
        self._failures_in_row = 0
        self._rx_ns = 0  # when the batch being decided arrived (perf_counter_ns)
        self._cfg_next = 0.0
        self._cfg_applied: tuple[int, dict[str, Any] | None] = (-1, None)  # or last refused
        self._boot_published = False
        self._gw_ver = -1
        self._gw_doc: dict[str, Any] = dict(registry.EMPTY)
        self._rules: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def boot(self) -> None:
        """Create the socket, the store connection and the decider. Raises on a boot error."""
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor owns Ctrl-C
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        s = self.settings
        max_frame = s.max_request_bytes * 4 + 1024
        access = Access.from_settings(s)
        if s.worker_io == "libzmq":
            self.io: Any = _LibzmqIO(s.endpoint, self.listen_fd, max_frame, access)
        else:
            balance = handoff = None
            if self.load is not None and self.heartbeat is not None:
                balance = Balance(self.load, self.heartbeat, self.slot, self.rates)
                if s.rebalance and self.rates is not None and self.handoff_dir:
                    try:
                        handoff = Handoff(self.handoff_dir, self.slot)
                    except OSError as e:  # serving matters more than balance: serve without
                        log.warning("worker %d: no connection hand-offs (%s)", self.index, e)
            self.io = ZmtpServer(self.listen_fd, max_frame, balance,
                                 admit=access.admit_peer if access.networks else None,
                                 handoff=handoff)
        # A reconnect must not hold the worker for long either: a black-holed store costs at
        # most 100 ms per attempt (attempts back off up to 1 s), a healthy one connects in <1 ms.
        self.store = StoreClient(s.store, timeout=s.store_timeout_ms / 1000.0,
                                     connect_timeout=max(s.store_timeout_ms / 1000.0, 0.1))
        self.script_source = load_script("decide")
        self.sha = script_sha(self.script_source)
        # The gateway context's scripts, loaded with decide.lua; called only while in use.
        self.side_scripts = {name: load_script(name) for name in ("ratelimit", "fanout")}
        self.side_shas = {name: script_sha(src) for name, src in self.side_scripts.items()}
        self._rules = {k: getattr(s, k) for k in _RULE_KEYS}
        self.decider = hotpath.Decider(
            decide_sha=self.sha, threshold=s.threshold, window=s.window, mode=s.mode,
            dedup_ttl=s.dedup_ttl, block_ttl=s.block_ttl,
            country_code=s.default_country_code, partitions=s.partitions,
            max_request_bytes=s.max_request_bytes, alert_prefix=keys.alert_prefix())
        self._try_store()
        log.info("worker %d up (pid %d, %s hot path)", self.index, os.getpid(), IMPLEMENTATION)

    def close(self) -> None:
        """Close the connections and the store connection."""
        self.store.close()
        self.io.close()

    def run(self) -> None:
        """Serve until SIGTERM; then drain what is queued and stop."""
        io = self.io
        poll_s = max(1.0, self.settings.config_poll_ms) / 1000.0
        while not self.stopping:
            self._beat()
            # poll() returns at once when requests are waiting (one epoll_wait per batch);
            # it sleeps only when there is nothing to do, at most until the next housekeeping.
            if io.poll(poll_s):
                self._serve_batch()
            self._housekeeping()
        self._drain()
        self._publish_stats(force=True)

    def _housekeeping(self) -> None:
        """Between batches: pick up config changes, publish stats, update the request rates
        (and maybe move a connection), each on its own clock."""
        self._maybe_reload_config()
        self._publish_stats()
        self.io.housekeep()

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._stats_next:
            return
        self._stats_next = now + 1.0
        st = self.stats
        st.decisions = self.decider.counts
        st.store_up = self.store.connected
        st.connections = len(getattr(self.io, "conns", ()))
        st.handoffs_sent = getattr(self.io, "handoffs_sent", 0)
        st.handoffs_received = getattr(self.io, "handoffs_received", 0)
        if not self.store.connected:
            return
        try:
            marked = len(self._unanswered)
            lat = self._latency_record(force=True)
            if lat:
                self.store.round_trip(lat, 1)
                del self._unanswered[:marked]
            stats_mod.publish(self.store, self._stats_field, st)
        except StoreError as e:
            self._store_failed(e)

    def _drain(self) -> None:
        """Answer every request already queued or arriving within DRAIN_WINDOW_S, then return.

        The socket is not unbound first: unbinding drops connections accepted through it, and
        with them requests already on their way. Requests sent after the window time out at the
        client, which applies its policy.
        """
        io = self.io
        io.stop_accepting()
        # ZMTP workers hand their connections to the siblings that stay (a SIGHUP roll, a
        # SIGTTOU): each as soon as it is quiescent, so its peer loses nothing. Left alone (the
        # whole pool stops), they are served through the window and closed.
        hand_off = getattr(io, "hand_off_idle", None)
        deadline = time.monotonic() + min(DRAIN_WINDOW_S, self.settings.graceful_timeout)
        while True:
            if hand_off is not None:
                hand_off()
                if not io.conns:
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if io.poll(min(left, 0.005) if hand_off is not None else left):
                self._serve_batch()
        while io.poll(0.0):  # whatever is still queued at the end of the window
            self._serve_batch()

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat[self.slot] = time.monotonic()

    # -- the hot loop ------------------------------------------------------------------------
    def _serve_batch(self) -> int:
        """Answer every request queued (up to max_batch); return how many there were."""
        io = self.io
        t0 = time.perf_counter_ns()  # the requests are in memory: the service starts here
        t_rx = self._rx_ns = io.rx_ns or t0  # when poll() saw them arrive, before reading
        cpu0 = time.thread_time_ns()
        peers: list[tuple[Any, list[bytes]]] = []
        frames: list[bytes] = []
        batch = io.take(self.settings.max_batch)
        for peer, msg in batch:
            env, body = split_envelope(msg)
            if body is None:
                self.stats.bad_frames += 1
                io.reply(peer, env, _BAD_FRAME)
                continue
            peers.append((peer, env))
            frames.append(body)
        if not frames:
            io.flush()
            return len(batch)
        self.stats.requests += len(frames)
        self.stats.batches += 1
        rx_us = time.time_ns() // 1000
        self._store_time_ns = 0
        try:
            replies = self.decide(frames, rx_us // 1000, rx_us)
        except Exception:
            # A worker never dies from a request: answer the batch with an error (the client
            # applies its policy) and go on serving.
            log.exception("worker %d: batch of %d failed", self.index, len(frames))
            self.stats.internal_errors += len(frames)
            self.store.close()
            err = hotpath.encode_error("internal", "internal error; see the service log")
            replies = [err] * len(frames)
        for (peer, env), reply in zip(peers, replies, strict=True):
            io.reply(peer, env, reply)
        # service: requests in memory -> replies handed to send(), store round trip excluded;
        # total: poll() saw the requests -> replies sent, everything included.
        cpu_us = (time.thread_time_ns() - cpu0) / 1000.0
        service_us = (time.perf_counter_ns() - t0 - self._store_time_ns) / 1000.0
        io.flush()
        total_us = (time.perf_counter_ns() - t_rx) / 1000.0
        if len(self._latencies) < 4096:
            self._latencies.append((rx_us, int(total_us)))
        n = len(frames)
        self.stats.total_us.add(total_us, n)
        self.stats.service_us.add(service_us, n)
        self.stats.service_cpu_us.add(cpu_us, n)
        return n

    def decide(self, frames: list[bytes], now_ms: int, rx_us: int) -> list[bytes]:
        """Decide a batch of frames; never raises (store trouble becomes error replies)."""
        d = self.decider
        d.begin(frames, now_ms, rx_us)
        sent = False
        if not self.store.connected and time.monotonic() < self._store_down_until:
            # Backing off: answer at once; the client applies its policy.
            return d.fail("store_unavailable", "detection store unavailable")
        try:
            if not self.store.connected:
                self._connect_store()
            if d.context is not None:
                # Calls from rate-limited gateways: their windows decide what decide.lua
                # records, so they take one round trip first (the whole batch's, pipelined).
                rl_payload, rl_n = d.rate_pipeline()
                if rl_n:
                    d.rate_finish(self.store.round_trip(
                        rl_payload, rl_n, self._store_budget(time.perf_counter_ns())))
            payload, n = d.pipeline()
            marked = len(self._unanswered)
            lat = self._latency_record()
            sent = bool(n)
            t1 = time.perf_counter_ns()
            budget = self._store_budget(t1)
            if lat:
                replies = self.store.round_trip(lat + payload, n + 1, budget)[1:]
                # Delivered: a mark is dropped only once a round trip carrying it succeeded.
                del self._unanswered[:marked]
            else:
                replies = self.store.round_trip(payload, n, budget) if n else []
            # Only the wait counts as store time; building the pipeline is service time.
            self._store_time_ns = time.perf_counter_ns() - t1
        except StoreError as e:
            if sent and len(self._unanswered) < 4096:
                self._unanswered.append(rx_us)
            self._store_failed(e)
            return d.fail("store_unavailable", "detection store unavailable")
        self._backoff.reset()
        self._failures_in_row = 0
        out = d.finish(replies)
        if d.noscript:
            self._reload_script()
        todo = d.blocks_to_write()
        if todo:
            self._write_blocks(todo)
        return out

    def _store_budget(self, now_ns: int) -> float:
        """Return the store timeout of this batch's round trip: what is left of store_timeout_ms
        since the batch arrived, so the reply still reaches the client within its own budget.

        Time spent before the round trip is taken off in whole BUDGET_STEP_S steps (at most one
        step late): the socket's timeout then changes, at two system calls, only for a batch
        that started late, not for every batch.
        """
        late = int((now_ns - self._rx_ns) / 1e9 / BUDGET_STEP_S) * BUDGET_STEP_S
        return max(BUDGET_STEP_S, self.store.timeout - late)

    def _latency_record(self, force: bool = False) -> bytes:
        """Return the XADD of the latencies held (or b'').

        Unless `force` (the stats tick) or a mark of `u` is pending, latencies are held until
        LATENCY_FLUSH_NS after the last record or LATENCY_BATCH of them: the QuestDB sink waits
        for them (latency_wait_ms), and the tick sends what an idle worker holds.

        A reply's latency is known only after it is sent, so it rides on a later round trip:
        each {acm.lat}:s entry lists `rx:latency` pairs, one per batch, keyed by the batch's `rx`
        that its decisions carry.
        The stream is capped; latencies are best effort, decisions are not. Field `u` lists the
        `rx` of batches answered store_unavailable after their scripts were sent: a decision
        the store recorded for one of them never reached its caller (the QuestDB sink marks its
        call_events row STORE_UNAVAILABLE).
        """
        if not self._latencies and not self._unanswered:
            return b""
        if not (force or self._unanswered or self._rx_ns >= self._latency_due_ns
                or len(self._latencies) >= LATENCY_BATCH):
            return b""
        self._latency_due_ns = self._rx_ns + LATENCY_FLUSH_NS
        pairs = ",".join(f"{rx}:{us}" for rx, us in self._latencies)
        self._latencies.clear()
        fields: list[str] = ["k", "l", "v", pairs]
        if self._unanswered:  # kept until a round trip carrying them succeeds (decide())
            fields += ["u", ",".join(map(str, self._unanswered))]
        return hotpath.encode_command("XADD", LATENCY_STREAM, "MAXLEN", "~", "1000000", "*",
                                      *fields)

    # -- store health ------------------------------------------------------------------------
    def _connect_store(self) -> None:
        self.store.connect()
        self.store.script_load(self.script_source)
        for src in self.side_scripts.values():
            self.store.script_load(src)
        if not self._boot_published:
            # Once per process: on a reconnect the store may have come back empty, and the
            # boot settings would overwrite what MI changed since (the control plane restores
            # the live config instead; this worker keeps deciding with what it holds).
            store_config.init_boot(self.store, self.boot_id, self.settings.detection())
            self._boot_published = True

    def _try_store(self) -> None:
        try:
            self._connect_store()
            self._maybe_reload_config(force=True)
        except StoreError as e:
            self._store_failed(e)

    def _store_failed(self, e: Exception) -> None:
        self.stats.store_failures += 1
        self.store.close()
        self._failures_in_row += 1
        if self._failures_in_row == 1 and isinstance(e.__cause__, TimeoutError):
            # One slow round trip on a live store (a busy machine, a stalled store thread): the
            # next batch reconnects at once. Backing off here would answer every request of the
            # back-off period store_unavailable, each a call let through unchecked. A store
            # that is really gone fails again at once (refused) or times out again: back-off.
            log.info("worker %d: store round trip timed out: %s (reconnecting)", self.index, e)
            return
        now = time.monotonic()
        delay = self._backoff.next()
        if now >= self._store_down_until:
            log.warning("worker %d: store failure: %s (retry in %.2fs)", self.index, e, delay)
        self._store_down_until = now + delay

    def _reload_script(self) -> None:
        try:
            self.store.script_load(self.script_source)
            for src in self.side_scripts.values():
                self.store.script_load(src)
        except StoreError as e:
            self._store_failed(e)

    def _write_blocks(self, todo: list[tuple[str, int, str, str]]) -> None:
        try:
            now_ms = min(exp for _, exp, _, _ in todo) - self.decider.block_ttl_ms
            store_config.write_blocks(self.store, todo, now_ms, self.settings.partitions)
        except StoreError as e:
            self._store_failed(e)

    def _maybe_reload_config(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._cfg_next:
            return
        self._cfg_next = now + self.settings.config_poll_ms / 1000.0
        if not self.store.connected:
            if now < self._store_down_until:
                return
            try:
                self._connect_store()
            except StoreError as e:
                self._store_failed(e)
                return
        try:
            # One round trip for both: the live config and the registry's version.
            r = self.store.round_trip(_POLL_COMMANDS, 2)
            self._failures_in_row = 0
            gen, values = store_config.parse_read(r[0])
            gw_ver = registry.parse_version(r[1])
            if gw_ver != self._gw_ver:
                self._load_registry(gw_ver)
        except StoreError as e:
            self._store_failed(e)
            return
        # No config (the store lost it): keep the one in force until it is restored. Content
        # counts as well as the generation, so a config is never skipped for its number alone.
        if values is None or (gen, values) == self._cfg_applied:
            return
        self._cfg_applied = (gen, values)
        try:
            self.decider.configure(**{k: values[k] for k in store_config.DECIDER_KEYS})
            if "store_timeout_ms" in values:
                self.store.set_timeout(values["store_timeout_ms"] / 1000.0)
            if values.get("log_level"):
                apply_log_level(values["log_level"])
            rules = {k: values.get(k, self._rules[k]) for k in _RULE_KEYS}
            if rules != self._rules:
                self._rules = rules
                self._rebuild_context()
        except (KeyError, ValueError, TypeError) as e:
            log.error("worker %d: ignoring invalid config generation %s: %s", self.index, gen, e)
            return
        self.stats.config_generation = gen
        log.debug("worker %d: config generation %d applied", self.index, gen)


    def _load_registry(self, polled_ver: int) -> None:
        """Read the published registry and rebuild the gateway context. Raises StoreError."""
        old = self._gw_doc
        try:
            ver, doc = registry.read(self.store)
        except ValueError as e:  # not JSON: the control plane only publishes validated ones
            ver, doc = polled_ver, None
            log.error("worker %d: ignoring unreadable carrier registry version %s: %s",
                      self.index, ver, e)
        if ver == 0 and self._gw_ver > 0:
            # Version 0: the key is gone (a flushed or failed-over store), not emptied (an
            # empty registry is published as a document). Keep deciding with the last one until
            # the control plane publishes it again.
            log.warning("worker %d: carrier registry missing from the store; keeping version %d",
                        self.index, self._gw_ver)
            self._gw_ver = 0
            return
        if doc is not None:
            try:
                self._gw_doc = doc
                self._rebuild_context()
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                log.error("worker %d: ignoring invalid carrier registry version %s: %s",
                          self.index, ver, e)
                self._gw_doc = old
                self._rebuild_context()
        self._gw_ver = ver  # a bad version is not retried until the next publish
        self.stats.registry_version = ver
        log.debug("worker %d: carrier registry version %d applied", self.index, ver)

    def _rebuild_context(self) -> None:
        """Give the decider a gateway context, or None when nothing needs one."""
        ctx = GatewayContext(
            self._gw_doc, cli_origin_rule=self._rules["cli_origin_rule"],
            fanout_threshold=self._rules["fanout_threshold"],
            fanout_window=self._rules["fanout_window"],
            country_code=self.settings.default_country_code,
            partitions=self.settings.partitions, rl_sha=self.side_shas["ratelimit"],
            fanout_sha=self.side_shas["fanout"])
        self.decider.context = ctx if ctx.active else None


_RULE_KEYS = ("cli_origin_rule", "fanout_threshold", "fanout_window")


_BAD_FRAME = hotpath.encode_error("bad_frame", "a request is exactly one message frame")


class _LibzmqIO:
    """The worker's connections through a libzmq ROUTER socket (worker_io = libzmq).

    The same interface as ZmtpServer; every receive and reply crosses libzmq's I/O thread.
    libzmq bounds each connection (RCVHWM, SNDHWM, then socket backpressure) and fair-queues
    them; ROUTER_MANDATORY tells which peers do not take their replies, and their requests are
    then dropped undecided (a reply nobody reads is a decision made for nobody).
    """

    STALL_S = 1.0  # a peer whose replies do not fit is skipped this long, then tried again
    MAX_STALLED = 4096

    def __init__(self, endpoint: str, listen_fd: int, max_frame: int,
                 access: Access | None = None) -> None:
        self.ctx = zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.USE_FD, listen_fd)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        self.sock.setsockopt(zmq.RCVHWM, IN_HWM)
        self.sock.setsockopt(zmq.SNDHWM, IN_HWM)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Before bind: no connection may be accepted before its checks are in place.
        self.zap = apply_access(self.ctx, self.sock, access) if access else None
        self.sock.bind(endpoint)
        self.rx_ns = 0
        self.stalled: dict[bytes, float] = {}  # routing id -> skip its requests until then
        self.skipped = 0

    def poll(self, timeout: float) -> int:
        if self.sock.poll(int(timeout * 1000)):
            self.rx_ns = time.perf_counter_ns()
            return 1
        return 0

    def take(self, n: int) -> list[tuple[bytes, list[bytes]]]:
        out = []
        stalled = self.stalled
        for _ in range(n):  # skipped requests count too: a flood of them must not hold us here
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if stalled and parts[0] in stalled:
                if time.monotonic() < stalled[parts[0]]:
                    self.skipped += 1
                    continue
                del stalled[parts[0]]
            out.append((parts[0], parts[1:]))
        return out

    def reply(self, peer: bytes, env: list[bytes], body: bytes) -> None:
        try:
            self.sock.send_multipart([peer, *env, body], zmq.NOBLOCK)
        except zmq.ZMQError:
            # Gone (EHOSTUNREACH) or not reading (EAGAIN: SNDHWM replies unread): the client
            # times out and applies its policy; what it still has queued is not decided.
            if len(self.stalled) >= self.MAX_STALLED:
                self.stalled.pop(next(iter(self.stalled)))
            self.stalled[peer] = time.monotonic() + self.STALL_S

    def flush(self) -> None:
        pass

    def housekeep(self) -> None:
        pass  # libzmq owns its connections: they never move to another worker

    def stop_accepting(self) -> None:
        # Unbinding would drop connections accepted through the socket, and with them
        # requests already on their way: the socket stays bound until close().
        pass

    def close(self) -> None:
        self.sock.close(linger=1000)
        if self.zap is not None:
            self.zap.close()
        self.ctx.term()


def worker_main(settings: Any, listen_fd: int, index: int, boot_id: str,
                heartbeat: Any = None, load: Any = None, slot: int | None = None,
                rates: Any = None, handoff_dir: str | None = None) -> int:
    """Entry point of a forked worker; return its exit code."""
    w = Worker(settings, listen_fd, index, boot_id, heartbeat, load, slot, rates, handoff_dir)
    try:
        w.boot()
    except Exception:
        log.exception("worker %d failed to boot", index)
        return BOOT_ERROR
    try:
        if os.environ.get("ACM_PROFILE"):
            import cProfile
            pr = cProfile.Profile()
            pr.enable()
            try:
                w.run()
            finally:
                pr.disable()
                pr.dump_stats(os.environ["ACM_PROFILE"] + f".{index}")
        else:
            w.run()
    finally:
        w.close()
    return 0
