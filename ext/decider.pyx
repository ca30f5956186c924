# Included by _hotpath.pyx: one extension module, one C namespace (see its docstring).
"""The decider, compiled: a batch of request frames in, one store round trip, replies out.

The twin of acm_module/engine/decider_py.py. Per-request state lives in _Slot objects (a cdef
class extending the decoder's _Req) reused from batch to batch; the whole RESP pipeline of a
batch is written into one reusable C buffer, with the arguments every EVALSHA of the batch
shares encoded once.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

from cbuf cimport (
    PyUnicode_AsUTF8AndSize,
    PyUnicode_DATA,
    PyUnicode_GET_LENGTH,
    _ascii,
    _Buf,
    _fmt_ll,
    _grow,
    _int_ll,
    _put,
    _put_arg_raw,
    _put_bulk,
    _put_bulk_ll,
    _put_hdr,
)


cdef extern from "Python.h":
    PyObject* PyDict_GetItemWithError(object, object) except? NULL


cdef const char* _HEX = b"0123456789abcdef"

# What a pending slot in a batch is waiting for.
cdef enum:
    _READY = 0     # reply already encoded (error, invalid number)
    _SCRIPT = 1    # decide.lua result
    _RECORD = 2    # plain XADD of a decision that changes no state (result ignored)

_REPLY_INVALID_B = encode_reply("allow", "invalid_b", 0)
_REPLY_UNVERIFIABLE = encode_reply("allow", "unverifiable_cli", 0)


cdef class _Slot(_Req):
    """One request of the batch (reused from batch to batch)."""
    cdef int kind
    cdef object reply    # _READY/_RECORD: the reply frame
    cdef object na, nb   # normalised A/B numbers, or None
    cdef object att      # gateway.context.Attribution, or None
    cdef bytes pre       # decide.lua ARGV[8]: the gateway rules' verdict, or b""


cdef int _bump_any(object counts, object key) except -1:
    """counts[key] = counts.get(key, 0) + 1"""
    cdef PyObject* cur
    if type(counts) is dict:
        cur = PyDict_GetItemWithError(counts, key)
        PyDict_SetItem(counts, key, 1 if cur == NULL else <object>cur + 1)
    else:
        counts[key] = counts.get(key, 0) + 1
    return 0


cdef inline bint _is(const char* p, Py_ssize_t n, const char* lit, Py_ssize_t ln) noexcept:
    return n == ln and memcmp(p, lit, ln) == 0


cdef inline int _put_tag_key(_Buf* b, const char* tag, Py_ssize_t tn, const char* mid,
                             Py_ssize_t mn, const char* p, Py_ssize_t n) except -1:
    """A bulk string tag + mid + p: the store keys of one B-number."""
    _put_hdr(b, b'$', tn + mn + n)
    if b.n + tn + mn + n + 2 > b.cap:
        _grow(b, tn + mn + n + 2)
    memcpy(b.p + b.n, tag, tn)
    memcpy(b.p + b.n + tn, mid, mn)
    memcpy(b.p + b.n + tn + mn, p, n)
    b.n += tn + mn + n
    b.p[b.n] = b'\r'
    b.p[b.n + 1] = b'\n'
    b.n += 2
    return 0


cdef class Decider:
    """Decide a batch of request frames with one store round trip per batch."""

    cdef public object sha, country_code, partitions, max_request_bytes, alert_prefix
    cdef public long long counter
    cdef public object threshold, window_ms, mode, dedup_ttl_ms, block_ttl_ms, state_ttl_ms
    cdef public bint noscript
    cdef public object counts
    cdef public object context  # types.GatewayContext, or None (see the twin)
    cdef list _pool        # _Slot objects, reused
    cdef Py_ssize_t _n     # slots in use by the current batch
    cdef list _blocks
    cdef list _rated       # slots whose rate-limit check is in flight
    cdef object _rx_us
    cdef _Buf _out         # the pipeline/command buffer, reused
    cdef _Buf _const       # per-batch constant pieces of the EVALSHA commands
    cdef Py_ssize_t _k_pre, _k_t1, _k_t2, _k_t3  # where each piece ends in _const
    cdef bytes _prefix     # alert_prefix, UTF-8

    def __cinit__(self):
        self._out.p = <char*>malloc(8192)
        self._const.p = <char*>malloc(1024)
        if self._out.p == NULL or self._const.p == NULL:
            raise MemoryError()
        self._out.cap = 8192
        self._const.cap = 1024
        self._out.heap = self._const.heap = True
        self._out.n = self._const.n = 0

    def __dealloc__(self):
        free(self._out.p)
        free(self._const.p)

    def __init__(self, *, decide_sha, threshold=5, window=5.0, mode="block", dedup_ttl=32.0,
                 block_ttl=0.0, country_code="234", partitions=16, max_request_bytes=4096,
                 alert_prefix="00000000-0000-4000-8000", context=None):
        self.sha = decide_sha.encode()
        self.country_code = country_code
        self.partitions = partitions
        self.max_request_bytes = max_request_bytes
        self.alert_prefix = alert_prefix
        self.counter = 0
        self.configure(threshold=threshold, window=window, mode=mode, dedup_ttl=dedup_ttl,
                       block_ttl=block_ttl)
        self._pool = []
        self._n = 0
        self._blocks = []
        self._rx_us = None
        self.noscript = False
        self.counts = {}  # "verdict:reason", "dup", "error", store errors
        self.context = context
        self._rated = []

    def configure(self, *, threshold, window, mode, dedup_ttl, block_ttl):
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
    def begin(self, frames, long long now_ms, rx_us):
        """Decode a batch of request frames; afterwards call pipeline()."""
        cdef const unsigned char* p
        cdef Py_ssize_t n, i = 0
        cdef _Slot s
        cdef list pool = self._pool
        max_bytes = self.max_request_bytes
        cc = self.country_code
        ctx = self.context
        cdef bint resolves = ctx is not None and ctx.resolves
        self._n = 0
        for frame in frames:
            if i == PyList_GET_SIZE(pool):
                pool.append(_Slot())
            s = <_Slot>PyList_GET_ITEM(pool, i)
            i += 1
            self._n = i
            s.na = s.nb = s.att = None
            s.pre = b""
            _view(frame, &p, &n)
            if _too_large(n, max_bytes, s) or _decode(p, n, s):
                s.kind = _READY
                s.reply = encode_error(s.err_code, s.err_msg)
                s.err_code = s.err_msg = None
                continue
            if not s.has_ts:
                s.ts_ms = now_ms
            s.nb = None if s.b is None else _normalise(s.b, cc)
            s.na = None if s.a is None else _normalise(s.a, cc)
            if resolves:
                s.att = ctx.resolve(s.src_ip, s.trunk)
                if s.att is not None and s.nb is not None and s.na is not None:
                    s.pre = ctx.pre_verdict(s.att, s.na)
            if s.nb is None:
                s.kind = _RECORD
                s.reply = _REPLY_INVALID_B
            elif s.na is None:
                s.kind = _RECORD
                s.reply = _REPLY_UNVERIFIABLE
            else:
                s.kind = _SCRIPT
                s.reply = None
        # Drop what the unused slots still hold so old requests are not kept alive.
        for i in range(self._n, PyList_GET_SIZE(pool)):
            s = <_Slot>PyList_GET_ITEM(pool, i)
            s.call_id = s.a = s.b = s.src_ip = s.trunk = s.reply = s.na = s.nb = s.att = None
        self._rx_us = rx_us

    def rate_pipeline(self):
        """Return (rate-limit checks of the batch, count); (b"", 0) when none is needed."""
        cdef _Slot s
        cdef Py_ssize_t k
        ctx = self.context
        self._rated = []
        if ctx is None or not ctx.resolves:
            return b"", 0
        out = []
        for k in range(self._n):
            s = <_Slot>PyList_GET_ITEM(self._pool, k)
            if s.kind == _SCRIPT and s.att is not None and s.att.rl_key is not None \
                    and not s.pre.startswith(b"drop|"):
                out.append(ctx.rate_command(s.att, s.call_id, self._rx_us // 1000))
                self._rated.append(s)
        return b"".join(out), len(out)

    def rate_finish(self, replies):
        """Apply the rate-limit replies (in rate_pipeline() order) to the batch."""
        cdef _Slot s
        for s, r in zip(self._rated, replies, strict=True):
            if r == 0:
                s.pre = b"drop|rate_limited"
            elif r != 1:
                self._store_reply_error(r, "rate_error")

    def _store_reply_error(self, r, key):
        """Count a side script's error reply (rate limit, fan-out); note a lost script."""
        if isinstance(r, RespError) and r.message.startswith("NOSCRIPT"):
            self.noscript = True
        _bump_any(self.counts, key)

    cdef int _consts(self) except -1:
        """Encode the arguments every EVALSHA of the batch shares, once per batch.

        Done at the batch's first EVALSHA (not before), so a bad attribute raises where the
        twin's encode_command() would.
        """
        cdef _Buf* c = &self._const
        c.n = 0
        _put_hdr(c, b'*', 28)
        _put_bulk(c, "EVALSHA", 7)
        _put_arg(c, self.sha)
        _put_bulk(c, "8", 1)
        self._k_pre = c.n
        _put_arg(c, self.window_ms)
        _put_arg(c, self.threshold)
        _put_arg(c, self.mode)
        self._k_t1 = c.n
        _put_arg(c, self.dedup_ttl_ms)
        _put_arg(c, self.state_ttl_ms)
        self._k_t2 = c.n
        _put_arg(c, self._rx_us)
        _put_arg(c, self.block_ttl_ms)
        self._k_t3 = c.n
        self._prefix = ("%s" % (self.alert_prefix,)).encode()
        return 0

    def pipeline(self):
        """Return (commands for the batch's store round trip, number of replies to read)."""
        cdef _Buf* b = &self._out
        cdef _Buf* c = &self._const
        cdef _Slot s
        cdef Py_ssize_t i, count = 0, pn, bn, cn, tn
        cdef long long parts = 0
        cdef const char* pp = NULL
        cdef const char* bp
        cdef const char* cp
        cdef const char* tp
        cdef char tag[32]
        cdef char hexbuf[40]
        cdef int hn
        cdef unsigned long long ctr
        cdef bint fast_parts = _int_ll(self.partitions, &parts) and parts > 0
        cdef bint consts = False
        ctx = self.context
        cdef bint fanout = ctx is not None and ctx.fanout
        b.n = 0
        for i in range(self._n):
            s = <_Slot>PyList_GET_ITEM(self._pool, i)
            if s.kind == _READY:
                continue
            count += 1
            if s.kind == _RECORD:
                self._put_record(s)
                continue
            if not consts:
                self._consts()
                consts = True
                pp = PyBytes_AS_STRING(self._prefix)
                pn = PyBytes_GET_SIZE(self._prefix)
            # nb is an ASCII str ("+" and digits) made by the normaliser.
            bp = <const char*>PyUnicode_DATA(s.nb)
            bn = PyUnicode_GET_LENGTH(s.nb)
            if fast_parts:
                memcpy(tag, b"{acm.", 5)
                tn = 5 + _fmt_ll(tag + 5, _fnv1a(bp, bn) % parts)
                tag[tn] = b'}'
                tag[tn + 1] = b':'
                tn += 2
                tp = tag
            else:
                tag_obj = b"{acm.%d}:" % _partition(s.nb, self.partitions)
                tp = PyBytes_AS_STRING(tag_obj)
                tn = PyBytes_GET_SIZE(tag_obj)
            self.counter += 1
            _put(b, c.p, self._k_pre)
            _put_tag_key(b, tp, tn, "w:", 2, bp, bn)
            _put_tag_key(b, tp, tn, "e:", 2, bp, bn)
            _put_tag_key(b, tp, tn, "ea:", 3, bp, bn)
            _put_tag_key(b, tp, tn, "wl:", 3, bp, bn)
            cp = PyUnicode_AsUTF8AndSize(s.call_id, &cn)
            _put_tag_key(b, tp, tn, "c:", 2, cp, cn)
            _put_tag_key(b, tp, tn, "s", 1, "", 0)
            _put_tag_key(b, tp, tn, "n", 1, "", 0)
            _put_tag_key(b, tp, tn, "k", 1, "", 0)
            _put_bulk(b, cp, cn)
            _put_arg(b, s.na)
            _put_bulk(b, bp, bn)
            _put_bulk_ll(b, s.ts_ms)
            _put(b, c.p + self._k_pre, self._k_t1 - self._k_pre)
            _put_arg(b, s.pre)  # ARGV[8]
            if self.counter >= 0:
                # "%s-%012x" % (alert_prefix, counter), without building the str
                ctr = <unsigned long long>self.counter
                hn = 0
                while ctr or hn < 12:
                    hexbuf[39 - hn] = _HEX[ctr & 15]
                    ctr >>= 4
                    hn += 1
                _put_hdr(b, b'$', pn + 1 + hn)
                _put(b, pp, pn)
                _put(b, "-", 1)
                _put(b, hexbuf + 40 - hn, hn)
                _put(b, "\r\n", 2)
            else:
                _put_arg(b, "%s-%012x" % (self.alert_prefix, self.counter))
            _put(b, c.p + self._k_t1, self._k_t2 - self._k_t1)
            _put_arg(b, s.src_ip)
            _put_arg(b, s.trunk)
            _put(b, c.p + self._k_t2, self._k_t3 - self._k_t2)
            if s.att is None:
                _put_bulk(b, "", 0)
                _put_bulk(b, "", 0)
            else:
                _put_arg(b, s.att.carrier)
                _put_arg(b, s.att.gateway)
            if fanout:
                self.counter += 1
                _put_arg_raw(b, ctx.fanout_command(
                    s.call_id, s.na, s.nb, s.ts_ms, "%s-%012x" % (self.alert_prefix, self.counter),
                    self.state_ttl_ms, s.att))
                count += 1
        return PyBytes_FromStringAndSize(b.p, b.n), count

    cdef int _put_record(self, _Slot s) except -1:
        # A decision that touches no state still reaches the durable stream.
        cdef _Buf* b = &self._out
        num = s.nb if s.nb is not None else (s.b or "")
        p = _partition(num, self.partitions)
        _put_hdr(b, b'*', 35)
        _put_bulk(b, "XADD", 4)
        _put_arg(b, b"{acm.%d}:s" % p)
        _put_bulk(b, "*", 1)
        _put_bulk(b, "k", 1)
        _put_bulk(b, "d", 1)
        _put_bulk(b, "id", 2)
        _put_arg(b, s.call_id)
        _put_bulk(b, "a", 1)
        _put_arg(b, s.na if s.na is not None else (s.a or ""))
        _put_bulk(b, "b", 1)
        _put_arg(b, num)
        _put_bulk(b, "ts", 2)
        _put_bulk_ll(b, s.ts_ms)
        _put_bulk(b, "v", 1)
        _put_bulk(b, "allow", 5)
        _put_bulk(b, "r", 1)
        if s.nb is None:
            _put_bulk(b, "invalid_b", 9)
        else:
            _put_bulk(b, "unverifiable_cli", 16)
        _put_bulk(b, "n", 1)
        _put_bulk(b, "0", 1)
        _put_bulk(b, "al", 2)
        _put_bulk(b, "", 0)
        _put_bulk(b, "sv", 2)
        _put_bulk(b, "", 0)
        _put_bulk(b, "ip", 2)
        _put_arg(b, s.src_ip)
        _put_bulk(b, "tr", 2)
        _put_arg(b, s.trunk)
        _put_bulk(b, "rx", 2)
        _put_arg(b, self._rx_us)
        _put_bulk(b, "md", 2)
        _put_arg(b, self.mode)
        _put_bulk(b, "cr", 2)
        _put_arg(b, s.att.carrier if s.att is not None else b"")
        _put_bulk(b, "gw", 2)
        _put_arg(b, s.att.gateway if s.att is not None else b"")
        return 0

    # -- phase 2 ---------------------------------------------------------------------------
    @cython.boundscheck(True)
    @cython.wraparound(True)
    def finish(self, replies):
        """Turn the store's replies (in pipeline order) into one reply frame per request.

        A store error for one request becomes an error reply for that request alone.
        """
        cdef list out = []
        cdef Py_ssize_t i = 0, k
        cdef _Slot s
        cdef const char* v
        cdef const char* r
        cdef const char* al
        cdef const char* sv
        cdef Py_ssize_t vn, rn, aln, svn
        cdef long long dist = 0
        self.noscript = False
        self._blocks = []
        counts = self.counts
        ctx = self.context
        cdef bint fanout = ctx is not None and ctx.fanout
        for k in range(self._n):
            s = <_Slot>PyList_GET_ITEM(self._pool, k)
            if s.kind == _READY:
                out.append(s.reply)
                _bump_any(counts, "error")
                continue
            rep = replies[i]
            i += 1
            if s.kind == _SCRIPT and fanout:
                f = replies[i]
                i += 1
                if isinstance(f, RespError) or not isinstance(f, list):
                    self._store_reply_error(f, "fanout_error")
            if s.kind == _RECORD:
                if isinstance(rep, RespError):
                    out.append(encode_error("store_error", rep.message))
                    _bump_any(counts, "store_error")
                else:
                    out.append(s.reply)
                    key = "allow:invalid_b" if s.nb is None else "allow:unverifiable_cli"
                    _bump_any(counts, key)
                    if s.att is not None:
                        _bump_any(counts, "@" + s.att.carrier + "|" + key)
                continue
            # Fast path: the shape decide.lua returns, ASCII strings, an int64 count.
            if type(rep) is list and PyList_GET_SIZE(rep) == 7:
                r0 = <object>PyList_GET_ITEM(rep, 0)
                r1 = <object>PyList_GET_ITEM(rep, 1)
                r2 = <object>PyList_GET_ITEM(rep, 2)
                r3 = <object>PyList_GET_ITEM(rep, 3)
                r4 = <object>PyList_GET_ITEM(rep, 4)
                r6 = <object>PyList_GET_ITEM(rep, 6)
                if (type(r0) is bytes and type(r1) is bytes and type(r3) is bytes
                        and type(r4) is bytes and type(r6) is list and _int_ll(r2, &dist)):
                    v = PyBytes_AS_STRING(r0)
                    vn = PyBytes_GET_SIZE(r0)
                    r = PyBytes_AS_STRING(r1)
                    rn = PyBytes_GET_SIZE(r1)
                    al = PyBytes_AS_STRING(r3)
                    aln = PyBytes_GET_SIZE(r3)
                    sv = PyBytes_AS_STRING(r4)
                    svn = PyBytes_GET_SIZE(r4)
                    if (_ascii(<const unsigned char*>v, vn) and _ascii(<const unsigned char*>r, rn)
                            and _ascii(<const unsigned char*>al, aln)
                            and _ascii(<const unsigned char*>sv, svn)
                            and vn <= _STR32_MAX and rn <= _STR32_MAX and aln <= _STR32_MAX
                            and svn <= _STR32_MAX):
                        out.append(_reply(v, vn, r, rn, dist, al, aln, sv, svn, aln > 0))
                        if <object>PyList_GET_ITEM(rep, 5):
                            key = "dup"
                        elif _is(v, vn, "allow", 5) and _is(r, rn, "clean", 5):
                            key = "allow:clean"
                        elif _is(v, vn, "drop", 4) and _is(r, rn, "masking", 7):
                            key = "drop:masking"
                        elif _is(v, vn, "drop", 4) and _is(r, rn, "blocked", 7):
                            key = "drop:blocked"
                        elif _is(v, vn, "allow", 5) and _is(r, rn, "whitelisted", 11):
                            key = "allow:whitelisted"
                        else:
                            key = r0.decode() + ":" + r1.decode()
                        _bump_any(counts, key)
                        if s.att is not None:
                            _bump_any(counts, "@" + s.att.carrier + "|" + key)
                        if PyList_GET_SIZE(r6):
                            self._add_blocks(s, r6, r3.decode(), r4.decode())
                        continue
            # The twin's code for everything else.
            if isinstance(rep, RespError) or not isinstance(rep, list) or len(rep) != 7:
                msg = rep.message if isinstance(rep, RespError) else "unexpected store reply"
                if msg.startswith("NOSCRIPT"):
                    self.noscript = True
                out.append(encode_error("store_error", msg))
                _bump_any(counts, "store_error")
                continue
            verdict, reason = rep[0].decode(), rep[1].decode()
            alert_id = rep[3].decode()
            sev = rep[4].decode()
            out.append(encode_reply(verdict, reason, rep[2], alert_id, sev))
            key = "dup" if rep[5] else verdict + ":" + reason
            _bump_any(counts, key)
            if s.att is not None:
                _bump_any(counts, "@" + s.att.carrier + "|" + key)
            if rep[6]:
                self._add_blocks(s, rep[6], alert_id, sev)
        return out

    cdef int _add_blocks(self, _Slot s, object members, object alert_id, object sev) except -1:
        exp = s.ts_ms + self.block_ttl_ms
        for m in members:
            self._blocks.append((m.decode(), exp, alert_id, sev))
        return 0

    def fail(self, code, message):
        """Return the batch's replies when its store round trip failed as a whole."""
        cdef _Slot s
        cdef Py_ssize_t k
        err = encode_error(code, message)
        out = []
        for k in range(self._n):
            s = <_Slot>PyList_GET_ITEM(self._pool, k)
            if s.kind == _READY:
                out.append(s.reply)
                _bump_any(self.counts, "error")
            else:
                out.append(err)
                _bump_any(self.counts, code)
        self._blocks = []
        return out

    def blocks_to_write(self):
        """Return (a_number, expiry_ms, alert_id, severity) that the last batch asks to block."""
        return self._blocks
