# Included by _hotpath.pyx: one extension module, one C namespace (see its docstring).
"""Request and reply frames, compiled: a strict msgpack subset decoder, reply encoders.

The twin of acm_module/engine/request_py.py. The decoder parses straight from the frame's bytes
with C pointers and makes no Python object until the request is known to be valid; the reply
maps are encoded by hand with msgpack.packb's smallest-encoding choices into one fresh bytes
object, and left to packb() for inputs the hand encoder does not handle.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport Py_TYPE, PyTypeObject
from libc.math cimport floor
from libc.string cimport memcmp, memcpy

from cbuf cimport PyUnicode_DecodeUTF8, _ascii, _int_ll, _utf8

import msgpack  # only for the rare replies the hand encoder leaves to packb()

# ---------------------------------------------------------------------------------------------
# Request frames: a strict msgpack subset decoder
# ---------------------------------------------------------------------------------------------

cdef enum:
    _MAX_DEPTH = 32  # types.MAX_DEPTH, as a C constant (tests/unit/test_twins.py checks both)
cdef unsigned long long _MAX_TS_INT = 100000000000ULL  # 1e11 seconds: year 5138
cdef Py_ssize_t _STR32_MAX = 0xFFFFFFFF  # longer strings: packb() decides (it raises)

# What one decoded msgpack object is, as far as request validation cares.
cdef enum:
    _K_NONE = 0
    _K_INT = 1
    _K_FLOAT = 2
    _K_STR = 3
    _K_OTHER = 4  # bool, bin, ext, array, map: never a valid field value or key

# Why a frame is not valid msgpack.
cdef enum:
    _E_TRUNC = 1
    _E_C1 = 2
    _E_DEPTH = 3

cdef struct _Val:
    int kind
    bint neg                   # _K_INT: negative (then u is unused)
    unsigned long long u       # _K_INT: the value when not negative
    double f                   # _K_FLOAT
    const unsigned char* p     # _K_STR: the raw bytes
    Py_ssize_t n

# Field ids, in FIELDS order.
cdef enum:
    _F_CALL_ID = 0
    _F_A = 1
    _F_B = 2
    _F_TS = 3
    _F_SRC_IP = 4
    _F_TRUNK = 5

cdef Py_ssize_t _MAX_LEN[6]
_MAX_LEN[:] = [256, 256, 256, 0, 64, 128]
_NAMES = tuple(f.decode() for f in FIELDS)
_MSG_NOT_STR = tuple(f"field '{n}' must be a string" for n in _NAMES)
_MSG_TOO_LONG = tuple(f"field '{n}' longer than {m} bytes"
                      for n, m in zip(_NAMES, (256, 256, 256, 0, 64, 128), strict=True))
_MSG_NOT_UTF8 = tuple(f"field '{n}' is not valid UTF-8" for n in _NAMES)
_MSG_DUP = tuple(f"duplicate field '{n}'" for n in _NAMES)
_MSG_MISSING = tuple(f"missing field '{n}'" for n in _NAMES)
_MSG_BAD = (None, "invalid msgpack: truncated", "invalid msgpack: reserved byte 0xc1",
            f"invalid msgpack: nesting deeper than {_MAX_DEPTH}")


cdef inline int _field_id(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    if n == 1:
        if p[0] == b'a':
            return _F_A
        if p[0] == b'b':
            return _F_B
    elif n == 2:
        if memcmp(p, b"ts", 2) == 0:
            return _F_TS
    elif n == 5:
        if memcmp(p, b"trunk", 5) == 0:
            return _F_TRUNK
    elif n == 6:
        if memcmp(p, b"src_ip", 6) == 0:
            return _F_SRC_IP
    elif n == 7:
        if memcmp(p, b"call_id", 7) == 0:
            return _F_CALL_ID
    return -1


cdef inline unsigned long long _be(const unsigned char* p, int w) noexcept nogil:
    cdef unsigned long long v = 0
    cdef int i
    for i in range(w):
        v = (v << 8) | p[i]
    return v


cdef Py_ssize_t _skip(const unsigned char* d, Py_ssize_t n, Py_ssize_t pos, int depth,
                      _Val* v, int* err) noexcept nogil:
    """Decode one object at pos into *v (containers validated and skipped).

    Return its end, or -1 with *err set. Mirrors the twin's _skip() check for check, in the
    same order, so the same frame fails with the same message.
    """
    cdef unsigned char t
    cdef unsigned long long m
    cdef long long sv
    cdef int w
    cdef unsigned int f32
    cdef float fv
    cdef unsigned long long u64
    cdef double dv
    if pos + 1 > n:
        err[0] = _E_TRUNC
        return -1
    t = d[pos]
    pos += 1
    v.kind = _K_OTHER
    if t <= 0x7F:
        v.kind = _K_INT
        v.neg = False
        v.u = t
        return pos
    if t >= 0xE0:
        v.kind = _K_INT
        v.neg = True
        return pos
    if 0xA0 <= t <= 0xBF:
        m = t & 0x1F
        if pos + <Py_ssize_t>m > n:
            err[0] = _E_TRUNC
            return -1
        v.kind = _K_STR
        v.p = d + pos
        v.n = <Py_ssize_t>m
        return pos + <Py_ssize_t>m
    if t <= 0x8F:
        return _container(d, n, pos, (t & 0x0F) * 2, depth, err)
    if t <= 0x9F:
        return _container(d, n, pos, t & 0x0F, depth, err)
    if t == 0xC0:
        v.kind = _K_NONE
        return pos
    if t == 0xC2 or t == 0xC3:
        return pos  # bool: not an int for the twin (type(v) is not int)
    if t == 0xC1:
        err[0] = _E_C1
        return -1
    if t == 0xC4 or t == 0xC5 or t == 0xC6 or t == 0xD9 or t == 0xDA or t == 0xDB:
        w = 1 if (t == 0xC4 or t == 0xD9) else (2 if (t == 0xC5 or t == 0xDA) else 4)
        if pos + w > n:
            err[0] = _E_TRUNC
            return -1
        m = _be(d + pos, w)
        pos += w
        if pos + <Py_ssize_t>m > n:
            err[0] = _E_TRUNC
            return -1
        if t >= 0xD9:
            v.kind = _K_STR
            v.p = d + pos
            v.n = <Py_ssize_t>m
        return pos + <Py_ssize_t>m
    if t == 0xC7 or t == 0xC8 or t == 0xC9:
        w = 1 if t == 0xC7 else (2 if t == 0xC8 else 4)
        if pos + w > n:
            err[0] = _E_TRUNC
            return -1
        m = _be(d + pos, w)
        pos += w
        if pos + <Py_ssize_t>m + 1 > n:
            err[0] = _E_TRUNC
            return -1
        return pos + <Py_ssize_t>m + 1
    if t == 0xCA:
        if pos + 4 > n:
            err[0] = _E_TRUNC
            return -1
        f32 = <unsigned int>_be(d + pos, 4)
        memcpy(&fv, &f32, 4)
        v.kind = _K_FLOAT
        v.f = <double>fv
        return pos + 4
    if t == 0xCB:
        if pos + 8 > n:
            err[0] = _E_TRUNC
            return -1
        u64 = _be(d + pos, 8)
        memcpy(&dv, &u64, 8)
        v.kind = _K_FLOAT
        v.f = dv
        return pos + 8
    if 0xCC <= t <= 0xCF:
        w = 1 << (t - 0xCC)
        if pos + w > n:
            err[0] = _E_TRUNC
            return -1
        v.kind = _K_INT
        v.neg = False
        v.u = _be(d + pos, w)
        return pos + w
    if 0xD0 <= t <= 0xD3:
        w = 1 << (t - 0xD0)
        if pos + w > n:
            err[0] = _E_TRUNC
            return -1
        m = _be(d + pos, w)
        if w == 1:
            sv = <signed char>m
        elif w == 2:
            sv = <short>m
        elif w == 4:
            sv = <int>m
        else:
            sv = <long long>m
        v.kind = _K_INT
        v.neg = sv < 0
        v.u = <unsigned long long>sv
        return pos + w
    if 0xD4 <= t <= 0xD8:
        w = 1 << (t - 0xD4)
        if pos + w + 1 > n:
            err[0] = _E_TRUNC
            return -1
        return pos + w + 1
    # 0xDC-0xDF: array16/32, map16/32
    w = 2 if (t == 0xDC or t == 0xDE) else 4
    if pos + w > n:
        err[0] = _E_TRUNC
        return -1
    m = _be(d + pos, w)
    pos += w
    return _container(d, n, pos, m * 2 if t >= 0xDE else m, depth, err)


cdef Py_ssize_t _container(const unsigned char* d, Py_ssize_t n, Py_ssize_t pos,
                           unsigned long long items, int depth, int* err) noexcept nogil:
    cdef _Val tmp
    cdef unsigned long long i
    if depth >= _MAX_DEPTH:
        err[0] = _E_DEPTH
        return -1
    if items > <unsigned long long>(n - pos):  # every item takes at least one byte
        err[0] = _E_TRUNC
        return -1
    for i in range(items):
        pos = _skip(d, n, pos, depth + 1, &tmp, err)
        if pos < 0:
            return -1
    return pos


cdef class _Req:
    """A request being decoded (the Decider's batch slots extend it)."""
    cdef object call_id, a, b, src_ip, trunk  # str (a, b may be None)
    cdef bint has_ts
    cdef long long ts_ms
    cdef object err_code, err_msg             # set when the frame is refused

    cdef int fail(self, str code, str msg) noexcept:
        self.err_code = code
        self.err_msg = msg
        return 1


cdef inline object _str_or_none(const unsigned char* p, Py_ssize_t n):
    """Decode UTF-8 strictly; None when invalid (the caller reports it)."""
    if _ascii(p, n):
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    except UnicodeDecodeError:
        return None


cdef int _decode(const unsigned char* d, Py_ssize_t n, _Req r) except -1:
    """Decode and validate a frame whose size is already checked; 0 if valid, else 1 with
    r.err_code/err_msg set. The twin's decode_request(), without raising."""
    # Every pair after the sixth is refused (unknown or duplicate key) before anything later
    # is looked at, so the first seven pairs are all validation ever needs.
    cdef _Val keys[7]
    cdef _Val vals[7]
    cdef _Val tmp
    cdef unsigned char t
    cdef unsigned long long cnt = 0, i, m
    cdef Py_ssize_t pos
    cdef int err = 0, w, fid, seen = 0
    cdef _Val* k
    cdef _Val* v
    r.call_id = r.a = r.b = r.src_ip = r.trunk = None
    r.has_ts = False
    if n == 0:
        return r.fail("bad_msgpack", "empty frame")
    t = d[0]
    if t <= 0x8F and t >= 0x80 or t == 0xDE or t == 0xDF:
        if t <= 0x8F:
            cnt = t & 0x0F
            pos = 1
        else:
            w = 2 if t == 0xDE else 4
            if n < 1 + w:
                return r.fail("bad_msgpack", "invalid msgpack: truncated")
            cnt = _be(d + 1, w)
            pos = 1 + w
        if cnt * 2 > <unsigned long long>(n - pos):
            return r.fail("bad_msgpack", "invalid msgpack: truncated")
        for i in range(cnt):
            pos = _skip(d, n, pos, 1, &keys[i] if i < 7 else &tmp, &err)
            if pos < 0:
                return r.fail("bad_msgpack", _MSG_BAD[err])
            pos = _skip(d, n, pos, 1, &vals[i] if i < 7 else &tmp, &err)
            if pos < 0:
                return r.fail("bad_msgpack", _MSG_BAD[err])
        if pos != n:
            return r.fail("bad_msgpack", "invalid msgpack: trailing bytes")
    else:
        pos = _skip(d, n, 0, 0, &tmp, &err)
        if pos < 0:
            return r.fail("bad_msgpack", _MSG_BAD[err])
        if pos != n:
            return r.fail("bad_msgpack", "invalid msgpack: trailing bytes")
        return r.fail("not_a_map", "request must be a msgpack map")

    if cnt > 7:
        cnt = 7
    for i in range(cnt):
        k = &keys[i]
        v = &vals[i]
        if k.kind != _K_STR:
            return r.fail("unknown_field", "map keys must be strings")
        fid = _field_id(k.p, k.n)
        if fid < 0:
            return r.fail("unknown_field", "unknown field '%s'" % PyUnicode_DecodeUTF8(
                <const char*>k.p, k.n if k.n < 32 else 32, "replace"))
        if seen & (1 << fid):
            return r.fail("duplicate_field", _MSG_DUP[fid])
        seen |= 1 << fid
        if fid == _F_TS:
            if v.kind == _K_NONE:
                continue
            if v.kind == _K_INT:
                if v.neg or v.u >= _MAX_TS_INT:
                    return r.fail("bad_value", "field 'ts' must be finite seconds >= 0")
                r.ts_ms = <long long>floor(<double>v.u * 1000.0)
            elif v.kind == _K_FLOAT:
                if not (v.f >= 0 and v.f < 1e11):  # also refuses NaN
                    return r.fail("bad_value", "field 'ts' must be finite seconds >= 0")
                r.ts_ms = <long long>floor(v.f * 1000.0)
            else:
                return r.fail("bad_type", "field 'ts' must be a number")
            r.has_ts = True
            continue
        if v.kind == _K_NONE:
            if fid == _F_CALL_ID:
                return r.fail("bad_type", "field 'call_id' must be a string")
            continue
        if v.kind != _K_STR:
            return r.fail("bad_type", _MSG_NOT_STR[fid])
        if v.n > _MAX_LEN[fid]:
            return r.fail("bad_value", _MSG_TOO_LONG[fid])
        s = _str_or_none(v.p, v.n)
        if s is None:
            return r.fail("bad_value", _MSG_NOT_UTF8[fid])
        if fid == _F_CALL_ID:
            if v.n == 0:
                return r.fail("bad_value", "field 'call_id' must not be empty")
            r.call_id = s
        elif fid == _F_A:
            r.a = s
        elif fid == _F_B:
            r.b = s
        elif fid == _F_SRC_IP:
            r.src_ip = s
        else:
            r.trunk = s
    for fid in range(3):  # call_id, a, b
        if not (seen & (1 << fid)):
            return r.fail("missing_field", _MSG_MISSING[fid])
    if r.src_ip is None:
        r.src_ip = ""
    if r.trunk is None:
        r.trunk = ""
    return 0


cdef int _too_large(Py_ssize_t n, object max_bytes, _Req r) except -1:
    """The twin's size check (any max_bytes the twin would accept); 1 if refused."""
    cdef long long mb = 0
    if _int_ll(max_bytes, &mb):
        if n <= mb:
            return 0
    elif not (n > max_bytes):
        return 0
    return r.fail("too_large", f"request of {n} bytes exceeds {max_bytes}")


cdef inline int _view(object data, const unsigned char** p, Py_ssize_t* n) except -1:
    if type(data) is bytes:
        p[0] = <const unsigned char*>PyBytes_AS_STRING(data)
        n[0] = PyBytes_GET_SIZE(data)
    elif type(data) is bytearray:
        p[0] = <const unsigned char*>PyByteArray_AS_STRING(data)
        n[0] = PyByteArray_GET_SIZE(data)
    else:
        raise TypeError(f"a request frame must be bytes or bytearray, not {type(data).__name__}")
    return 0


# types.Request is the __slots__ class both twins share. decode_request() allocates one and
# fills its slots through their member descriptors' C setters: what `req.a = v` ends up
# calling, without the attribute lookup (and without the Python-level __init__ call).
cdef object _D_CALL_ID = Request.__dict__["call_id"]
cdef object _D_A = Request.__dict__["a"]
cdef object _D_B = Request.__dict__["b"]
cdef object _D_TS_MS = Request.__dict__["ts_ms"]
cdef object _D_SRC_IP = Request.__dict__["src_ip"]
cdef object _D_TRUNK = Request.__dict__["trunk"]


cdef extern from "Python.h":
    object _alloc "PyType_GenericAlloc" (PyTypeObject*, Py_ssize_t)


cdef inline int _set(object descr, object obj, object value) except -1:
    return Py_TYPE(descr).tp_descr_set(descr, obj, value)


def decode_request(data, max_bytes, now_ms):
    """Decode and validate one request frame. Raises RequestError(code, message)."""
    cdef const unsigned char* p
    cdef Py_ssize_t n
    cdef _Req r = _Req.__new__(_Req)
    _view(data, &p, &n)
    if _too_large(n, max_bytes, r) or _decode(p, n, r):
        raise RequestError(r.err_code, r.err_msg)
    req = _alloc(<PyTypeObject*>Request, 0)
    _set(_D_CALL_ID, req, r.call_id)
    _set(_D_A, req, r.a)
    _set(_D_B, req, r.b)
    _set(_D_TS_MS, req, r.ts_ms if r.has_ts else now_ms)
    _set(_D_SRC_IP, req, r.src_ip)
    _set(_D_TRUNK, req, r.trunk)
    return req


# ---------------------------------------------------------------------------------------------
# Reply frames: msgpack maps encoded by hand, with msgpack.packb's smallest-encoding choices
# ---------------------------------------------------------------------------------------------

cdef inline Py_ssize_t _mp_str_size(Py_ssize_t n) noexcept nogil:
    if n < 32:
        return 1 + n
    if n < 0x100:
        return 2 + n
    if n < 0x10000:
        return 3 + n
    return 5 + n


cdef inline char* _mp_str(char* o, const char* p, Py_ssize_t n) noexcept nogil:
    if n < 32:
        o[0] = <char>(0xA0 | n)
        o += 1
    elif n < 0x100:
        o[0] = <char>0xD9
        o[1] = <char>n
        o += 2
    elif n < 0x10000:
        o[0] = <char>0xDA
        o[1] = <char>(n >> 8)
        o[2] = <char>n
        o += 3
    else:
        o[0] = <char>0xDB
        o[1] = <char>(n >> 24)
        o[2] = <char>(n >> 16)
        o[3] = <char>(n >> 8)
        o[4] = <char>n
        o += 5
    memcpy(o, p, n)
    return o + n


cdef inline Py_ssize_t _mp_int_size(long long x) noexcept nogil:
    if x < -32:
        if x < -32768:
            return 9 if x < -2147483648LL else 5
        return 3 if x < -128 else 2
    if x < 128:
        return 1
    if x < 0x100:
        return 2
    if x < 0x10000:
        return 3
    if x < 4294967296LL:
        return 5
    return 9


cdef inline char* _mp_be(char* o, unsigned long long v, int w) noexcept nogil:
    cdef int i
    for i in range(w):
        o[i] = <char>(v >> (8 * (w - 1 - i)))
    return o + w


cdef inline char* _mp_int(char* o, long long x) noexcept nogil:
    # msgpack's pack_real_int64: signed formats below -32, fixint, then unsigned formats.
    if x < -32:
        if x < -32768:
            if x < -2147483648LL:
                o[0] = <char>0xD3
                return _mp_be(o + 1, <unsigned long long>x, 8)
            o[0] = <char>0xD2
            return _mp_be(o + 1, <unsigned long long>x, 4)
        if x < -128:
            o[0] = <char>0xD1
            return _mp_be(o + 1, <unsigned long long>x, 2)
        o[0] = <char>0xD0
        o[1] = <char>x
        return o + 2
    if x < 128:
        o[0] = <char>x
        return o + 1
    if x < 0x100:
        o[0] = <char>0xCC
        o[1] = <char>x
        return o + 2
    if x < 0x10000:
        o[0] = <char>0xCD
        return _mp_be(o + 1, <unsigned long long>x, 2)
    if x < 4294967296LL:
        o[0] = <char>0xCE
        return _mp_be(o + 1, <unsigned long long>x, 4)
    o[0] = <char>0xCF
    return _mp_be(o + 1, <unsigned long long>x, 8)


cdef bytes _reply(const char* v, Py_ssize_t vn, const char* r, Py_ssize_t rn, long long dist,
                  const char* al, Py_ssize_t aln, const char* sv, Py_ssize_t svn, bint alert):
    """{"verdict", "reason", "distinct"[, "alert_id", "severity"]} as packb() encodes it."""
    cdef Py_ssize_t size = 1 + 8 + 7 + 9 + _mp_str_size(vn) + _mp_str_size(rn) + \
        _mp_int_size(dist)
    if alert:
        size += 9 + 9 + _mp_str_size(aln) + _mp_str_size(svn)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* o = PyBytes_AS_STRING(out)
    o[0] = <char>(0x85 if alert else 0x83)
    o = _mp_str(o + 1, "verdict", 7)
    o = _mp_str(o, v, vn)
    o = _mp_str(o, "reason", 6)
    o = _mp_str(o, r, rn)
    o = _mp_str(o, "distinct", 8)
    o = _mp_int(o, dist)
    if alert:
        o = _mp_str(o, "alert_id", 8)
        o = _mp_str(o, al, aln)
        o = _mp_str(o, "severity", 8)
        _mp_str(o, sv, svn)
    return out


cdef bytes _error(const char* c, Py_ssize_t cn, const char* m, Py_ssize_t mn):
    out = PyBytes_FromStringAndSize(NULL, 1 + 6 + 8 + _mp_str_size(cn) + _mp_str_size(mn))
    cdef char* o = PyBytes_AS_STRING(out)
    o[0] = <char>0x82
    o = _mp_str(o + 1, "error", 5)
    o = _mp_str(o, c, cn)
    o = _mp_str(o, "message", 7)
    _mp_str(o, m, mn)
    return out


def encode_reply(verdict, reason, distinct, alert_id="", severity=""):
    """Encode a decision reply; alert_id and severity only when the decision has an alert."""
    cdef const char* v = NULL
    cdef const char* r = NULL
    cdef const char* al = NULL
    cdef const char* sv = NULL
    cdef Py_ssize_t vn = 0, rn = 0, aln = 0, svn = 0
    cdef long long d = 0
    cdef bint alert = bool(alert_id)
    if (_utf8(verdict, &v, &vn) and vn <= _STR32_MAX and _utf8(reason, &r, &rn)
            and rn <= _STR32_MAX and _int_ll(distinct, &d)
            and (not alert or (_utf8(alert_id, &al, &aln) and aln <= _STR32_MAX
                               and _utf8(severity, &sv, &svn) and svn <= _STR32_MAX))):
        return _reply(v, vn, r, rn, d, al, aln, sv, svn, alert)
    if alert:
        return msgpack.packb({"verdict": verdict, "reason": reason, "distinct": distinct,
                              "alert_id": alert_id, "severity": severity})
    return msgpack.packb({"verdict": verdict, "reason": reason, "distinct": distinct})


cpdef bytes encode_error(code, message):
    """Encode an error reply."""
    cdef const char* c = NULL
    cdef const char* m = NULL
    cdef Py_ssize_t cn = 0, mn = 0
    if (_utf8(code, &c, &cn) and cn <= _STR32_MAX and _utf8(message, &m, &mn)
            and mn <= _STR32_MAX):
        return _error(c, cn, m, mn)
    return msgpack.packb({"error": code, "message": message})
