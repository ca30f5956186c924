"""The decider in pure Python: a batch of request frames in, one store round trip, replies out.

The pure-Python twin of ext/decider.pyx and its readable reference. No I/O here. A worker hands
a batch of request frames to `Decider.begin()`, sends the bytes `pipeline()` returns to the
store in one round trip, and hands the parsed store replies to `Decider.finish()`, which
returns one reply frame per request, in order. With a gateway context whose `resolves` is set,
`rate_pipeline()`/`rate_finish()` run one round trip before `pipeline()`.
"""

from __future__ import annotations

from acm_module.core.numbers import normalise, partition_of
from acm_module.core.types import Attribution, GatewayContext, Request, RequestError, RespError
from acm_module.decide.engine.request_py import decode_request, encode_error, encode_reply
from acm_module.decide.engine.resp_py import encode_command

__all__ = ["Decider"]

# What a pending slot in a batch is waiting for.
_READY = 0     # reply already encoded (error, invalid number)
_SCRIPT = 1    # decide.lua result
_RECORD = 2    # plain XADD of a decision that changes no state (result ignored)


class _Slot:
    """One request of a batch and what the decider knows of it so far."""

    __slots__ = ("a", "att", "b", "kind", "pre", "reply", "req")

    def __init__(self, kind: int, reply: bytes, req: Request | None = None, a: str | None = None,
                 b: str | None = None, att: Attribution | None = None, pre: bytes = b"") -> None:
        self.kind = kind
        self.reply = reply  # _READY/_RECORD: the reply frame
        self.req = req
        self.a = a  # normalised A-number, or None
        self.b = b  # normalised B-number, or None
        self.att = att  # the gateway context's attribution, or None
        self.pre = pre  # decide.lua ARGV[8]: the gateway rules' verdict, or b""


class Decider:
    """Decide a batch of request frames with one store round trip per batch."""

    def __init__(self, *, decide_sha: str, threshold: int = 5, window: float = 5.0,
                 mode: str = "block", dedup_ttl: float = 32.0, block_ttl: float = 0.0,
                 country_code: str = "234", partitions: int = 16,
                 max_request_bytes: int = 4096, alert_prefix: str = "00000000-0000-4000-8000",
                 context: GatewayContext | None = None) -> None:
        self.sha = decide_sha.encode()
        self.country_code = country_code
        self.partitions = partitions
        self.max_request_bytes = max_request_bytes
        self.alert_prefix = alert_prefix
        self.counter = 0
        self.configure(threshold=threshold, window=window, mode=mode, dedup_ttl=dedup_ttl,
                       block_ttl=block_ttl)
        self._slots: list[_Slot] = []
        self._blocks: list[tuple[str, int, str, str]] = []
        self._rx_us = 0
        self.noscript = False
        self.counts: dict[str, int] = {}  # "verdict:reason", "dup", "error", store errors
        # The gateway context while a registry is loaded or fan-out is on (the worker swaps
        # it at runtime); None keeps the decision path exactly as without it.
        self.context: GatewayContext | None = context
        self._rated: list[_Slot] = []  # slots whose rate-limit check is in flight

    def configure(self, *, threshold: int, window: float, mode: str, dedup_ttl: float,
                  block_ttl: float) -> None:
        """Apply detection settings to the next batch, all or nothing."""
        threshold = int(threshold)
        window_ms = int(round(window * 1000))
        dedup_ttl_ms = int(round(dedup_ttl * 1000))
        block_ttl_ms = int(round(block_ttl * 1000))
        self.threshold = threshold
        self.window_ms = window_ms
        self.mode = mode
        self.dedup_ttl_ms = dedup_ttl_ms
        self.block_ttl_ms = block_ttl_ms
        self.state_ttl_ms = 2 * window_ms + 1000

    # -- phase 1 ---------------------------------------------------------------------------
    def begin(self, frames: list[bytes], now_ms: int, rx_us: int) -> None:
        """Decode a batch of request frames; afterwards call rate_pipeline(), pipeline()."""
        slots: list[_Slot] = []
        ctx = self.context
        for frame in frames:
            try:
                req = decode_request(frame, self.max_request_bytes, now_ms)
            except RequestError as e:
                slots.append(_Slot(_READY, encode_error(e.code, e.message)))
                continue
            b = None if req.b is None else normalise(req.b, self.country_code)
            a = None if req.a is None else normalise(req.a, self.country_code)
            att = None
            if ctx is not None and ctx.resolves:
                att = ctx.resolve(req.src_ip, req.trunk)
            if b is None or a is None:
                reason = "invalid_b" if b is None else "unverifiable_cli"
                slots.append(_Slot(_RECORD, encode_reply("allow", reason, 0), req, a, b, att))
                continue
            pre = b"" if att is None else ctx.pre_verdict(att, a)  # type: ignore[union-attr]
            slots.append(_Slot(_SCRIPT, b"", req, a, b, att, pre))
        self._slots = slots
        self._rx_us = rx_us

    def rate_pipeline(self) -> tuple[bytes, int]:
        """Return (rate-limit checks of the batch, count); (b"", 0) when none is needed.

        Calls from rate-limited gateways need one round trip before pipeline(): the verdict of
        the sliding window decides what decide.lua records. A call the CLI-origin rule drops
        anyway is not checked, so it takes no capacity.
        """
        ctx = self.context
        self._rated = []
        if ctx is None or not ctx.resolves:
            return b"", 0
        out = []
        for s in self._slots:
            att = s.att
            if s.kind == _SCRIPT and att is not None and att.rl_key is not None \
                    and not s.pre.startswith(b"drop|"):
                out.append(ctx.rate_command(att, s.req.call_id,  # type: ignore[union-attr]
                                            self._rx_us // 1000))
                self._rated.append(s)
        return b"".join(out), len(out)

    def rate_finish(self, replies: list) -> None:
        """Apply the rate-limit replies (in rate_pipeline() order) to the batch.

        A store error on a check admits the call (counted as `rate_error`): the limiter
        protects capacity, it must not take calls down with it.
        """
        for s, r in zip(self._rated, replies, strict=True):
            if r == 0:
                s.pre = b"drop|rate_limited"
            elif r != 1:
                self._store_reply_error(r, "rate_error")

    def pipeline(self) -> tuple[bytes, int]:
        """Return (commands for the batch's store round trip, number of replies to read)."""
        out: list[bytes] = []
        for s in self._slots:
            kind = s.kind
            if kind == _READY:
                continue
            req: Request = s.req  # type: ignore[assignment]
            a, b, att = s.a, s.b, s.att
            if kind == _RECORD:
                # A decision that touches no state still reaches the durable stream.
                num = b if b is not None else (req.b or "")
                p = partition_of(num, self.partitions)
                reason = "invalid_b" if b is None else "unverifiable_cli"
                out.append(encode_command(
                    b"XADD", b"{acm.%d}:s" % p, b"*", b"k", b"d", b"id", req.call_id,
                    b"a", a if a is not None else (req.a or ""), b"b", num, b"ts", req.ts_ms,
                    b"v", b"allow", b"r", reason, b"n", b"0", b"al", b"", b"sv", b"",
                    b"ip", req.src_ip, b"tr", req.trunk, b"rx", self._rx_us, b"md", self.mode,
                    b"cr", att.carrier if att is not None else b"",
                    b"gw", att.gateway if att is not None else b""))
                continue
            assert a is not None and b is not None  # a _SCRIPT slot has both numbers
            p = partition_of(b, self.partitions)
            tag = b"{acm.%d}:" % p
            bb = b.encode()
            self.counter += 1
            out.append(encode_command(
                b"EVALSHA", self.sha, b"8",
                tag + b"w:" + bb, tag + b"e:" + bb, tag + b"ea:" + bb, tag + b"wl:" + bb,
                tag + b"c:" + req.call_id.encode(), tag + b"s", tag + b"n", tag + b"k",
                req.call_id, a, bb, req.ts_ms, self.window_ms, self.threshold, self.mode,
                s.pre, "%s-%012x" % (self.alert_prefix, self.counter), self.dedup_ttl_ms,
                self.state_ttl_ms, req.src_ip, req.trunk, self._rx_us, self.block_ttl_ms,
                att.carrier if att is not None else b"", att.gateway if att is not None else b""))
            ctx = self.context
            if ctx is not None and ctx.fanout:
                self.counter += 1
                out.append(ctx.fanout_command(
                    req.call_id, a, b, req.ts_ms, "%s-%012x" % (self.alert_prefix, self.counter),
                    self.state_ttl_ms, att))
        return b"".join(out), len(out)

    def _store_reply_error(self, r: object, key: str) -> None:
        """Count a side script's error reply (rate limit, fan-out); note a lost script."""
        if isinstance(r, RespError) and r.message.startswith("NOSCRIPT"):
            self.noscript = True
        self.counts[key] = self.counts.get(key, 0) + 1

    # -- phase 2 ---------------------------------------------------------------------------
    def finish(self, replies: list) -> list[bytes]:
        """Turn the store's replies (in pipeline order) into one reply frame per request.

        A store error for one request becomes an error reply for that request alone.
        """
        out: list[bytes] = []
        i = 0
        self.noscript = False
        self._blocks = []
        counts = self.counts
        ctx = self.context
        fanout = ctx is not None and ctx.fanout
        for s in self._slots:
            kind = s.kind
            if kind == _READY:
                out.append(s.reply)
                counts["error"] = counts.get("error", 0) + 1
                continue
            r = replies[i]
            i += 1
            if kind == _SCRIPT and fanout:
                f = replies[i]
                i += 1
                if isinstance(f, RespError) or not isinstance(f, list):
                    self._store_reply_error(f, "fanout_error")
            att = s.att
            if kind == _RECORD:
                if isinstance(r, RespError):
                    out.append(encode_error("store_error", r.message))
                    counts["store_error"] = counts.get("store_error", 0) + 1
                else:
                    out.append(s.reply)
                    key = "allow:invalid_b" if s.b is None else "allow:unverifiable_cli"
                    counts[key] = counts.get(key, 0) + 1
                    if att is not None:
                        key = "@" + att.carrier + "|" + key
                        counts[key] = counts.get(key, 0) + 1
                continue
            if isinstance(r, RespError) or not isinstance(r, list) or len(r) != 7:
                msg = r.message if isinstance(r, RespError) else "unexpected store reply"
                if msg.startswith("NOSCRIPT"):
                    self.noscript = True
                out.append(encode_error("store_error", msg))
                counts["store_error"] = counts.get("store_error", 0) + 1
                continue
            verdict, reason = r[0].decode(), r[1].decode()
            alert_id = r[3].decode()
            sev = r[4].decode()
            out.append(encode_reply(verdict, reason, r[2], alert_id, sev))
            key = "dup" if r[5] else verdict + ":" + reason
            counts[key] = counts.get(key, 0) + 1
            if att is not None:
                key = "@" + att.carrier + "|" + key
                counts[key] = counts.get(key, 0) + 1
            if r[6]:
                exp = s.req.ts_ms + self.block_ttl_ms  # type: ignore[union-attr]
                for m in r[6]:
                    self._blocks.append((m.decode(), exp, alert_id, sev))
        return out

    def fail(self, code: str, message: str) -> list[bytes]:
        """Return the batch's replies when its store round trip failed as a whole."""
        err = encode_error(code, message)
        out: list[bytes] = []
        for s in self._slots:
            if s.kind == _READY:
                out.append(s.reply)
                self.counts["error"] = self.counts.get("error", 0) + 1
            else:
                out.append(err)
                self.counts[code] = self.counts.get(code, 0) + 1
        self._blocks = []
        return out

    def blocks_to_write(self) -> list[tuple[str, int, str, str]]:
        """Return (a_number, expiry_ms, alert_id, severity) that the last batch asks to block."""
        return self._blocks
