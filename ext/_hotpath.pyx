# cython: language_level=3
"""The decision hot path, compiled: the twin of acm_module/engine/hotpath_py.py.

Same public API, byte-for-byte the same outputs (replies, error codes and messages, RESP
commands, counters). The pure-Python twin is the specification: where this file differs in
shape it is for speed, and every fast path falls back to the twin's own code (copied here as
`_*_py` helpers or as a `msgpack.packb` call) for inputs it does not handle, so the rare cases
cannot drift.

Speed comes from: parsing msgpack straight from the frame's bytes with C pointers, recording
no Python objects until a request is known to be valid; normalising numbers with C char loops;
hand-encoding the reply maps (msgpack.packb's smallest-encoding rules) into one fresh bytes
object; writing the whole RESP pipeline of a batch into one reusable C buffer; parsing RESP
with C pointers.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from libc.math cimport floor
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy

import msgpack  # only for the rare replies the hand encoder leaves to packb()

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object)
    void* PyUnicode_DATA(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    object PyUnicode_DecodeUTF8(const char*, Py_ssize_t, const char*)
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1
    int Py_EnterRecursiveCall(const char*)  # nonzero (1, not -1) with RecursionError set
    void Py_LeaveRecursiveCall()
    PyObject* PyDict_GetItemWithError(object, object) except? NULL
    const Py_ssize_t PY_SSIZE_T_MAX

__all__ = [
    "FIELDS", "MAX_DEPTH", "Decider", "Incomplete", "Request", "RequestError", "RespError",
    "decode_request", "encode_command", "encode_error", "encode_reply", "normalise",
    "parse_reply", "partition_of", "severity_of",
]


# ---------------------------------------------------------------------------------------------
# Small C helpers
# ---------------------------------------------------------------------------------------------

cdef inline bint _int_ll(object o, long long* out):
    """Store an exact int's value in *out; False (no error set) for other types or overflow."""
    cdef int overflow = 0
    if type(o) is not int:
        return False
    out[0] = PyLong_AsLongLongAndOverflow(o, &overflow)
    return overflow == 0


cdef inline bint _utf8(object o, const char** p, Py_ssize_t* n):
    """Point at an exact str's UTF-8 bytes; False (no error set) when the twin's own code must
    run instead (not an exact str, or not encodable: the twin then raises its own error)."""
    if type(o) is not str:
        return False
    if PyUnicode_IS_ASCII(o):
        p[0] = <const char*>PyUnicode_DATA(o)
        n[0] = PyUnicode_GET_LENGTH(o)
        return True
    try:
        p[0] = PyUnicode_AsUTF8AndSize(o, n)
    except UnicodeError:
        return False
    return True


cdef inline bint _ascii(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] >= 0x80:
            return False
    return True


cdef inline int _fmt_ll(char* out, long long v) noexcept nogil:
    """Write v in decimal to out (>= 20 bytes); return the length."""
    cdef char tmp[24]
    cdef int k = 0, i = 0
    cdef unsigned long long u
    if v < 0:
        out[0] = b'-'
        i = 1
        u = <unsigned long long>0 - <unsigned long long>v  # also right for LLONG_MIN
    else:
        u = <unsigned long long>v
    while True:
        tmp[k] = <char>(48 + u % 10)
        k += 1
        u //= 10
        if u == 0:
            break
    while k > 0:
        k -= 1
        out[i] = tmp[k]
        i += 1
    return i


cdef inline bint _parse_ll(const char* p, Py_ssize_t n, long long* out) noexcept nogil:
    """Parse -?[0-9]{1,18} (what int() gives for it); False for anything else, which the
    caller hands to int() itself so whitespace, '+', '_' and errors behave as in the twin."""
    cdef Py_ssize_t i = 0
    cdef bint neg = False
    cdef long long v = 0
    cdef char c
    if n > 0 and p[0] == b'-':
        neg = True
        i = 1
    if n - i < 1 or n - i > 18:
        return False
    while i < n:
        c = p[i]
        if c < b'0' or c > b'9':
            return False
        v = v * 10 + (c - 48)
        i += 1
    out[0] = -v if neg else v
    return True


# A growable output buffer. Starts on a caller's stack array or a long-lived heap block.
cdef struct _Buf:
    char* p
    Py_ssize_t n
    Py_ssize_t cap
    bint heap


cdef int _grow(_Buf* b, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap
    cdef char* q
    if b.n + need <= b.cap:
        return 0
    cap = b.cap * 2
    if cap < b.n + need + 256:
        cap = b.n + need + 256
    if b.heap:
        q = <char*>realloc(b.p, cap)
    else:
        q = <char*>malloc(cap)
        if q != NULL:
            memcpy(q, b.p, b.n)
    if q == NULL:
        raise MemoryError()
    b.p = q
    b.cap = cap
    b.heap = True
    return 0


cdef inline int _put(_Buf* b, const char* p, Py_ssize_t n) except -1:
    if b.n + n > b.cap:
        _grow(b, n)
    memcpy(b.p + b.n, p, n)
    b.n += n
    return 0


cdef inline int _put_hdr(_Buf* b, char kind, long long n) except -1:
    """Write '<kind><n>\\r\\n' (a RESP array or bulk header)."""
    if b.n + 24 > b.cap:
        _grow(b, 24)
    b.p[b.n] = kind
    b.n += 1 + _fmt_ll(b.p + b.n + 1, n)
    b.p[b.n] = b'\r'
    b.p[b.n + 1] = b'\n'
    b.n += 2
    return 0


cdef inline int _put_bulk(_Buf* b, const char* p, Py_ssize_t n) except -1:
    _put_hdr(b, b'$', n)
    if b.n + n + 2 > b.cap:
        _grow(b, n + 2)
    memcpy(b.p + b.n, p, n)
    b.n += n
    b.p[b.n] = b'\r'
    b.p[b.n + 1] = b'\n'
    b.n += 2
    return 0


cdef inline int _put_bulk_ll(_Buf* b, long long v) except -1:
    cdef char tmp[24]
    return _put_bulk(b, tmp, _fmt_ll(tmp, v))


cdef inline int _put_arg_raw(_Buf* b, bytes raw) except -1:
    """Append an already encoded command."""
    return _put(b, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))


cdef int _put_arg(_Buf* b, object a) except -1:
    """Append one encode_command() argument as a RESP bulk string."""
    cdef const char* p = NULL
    cdef Py_ssize_t n = 0
    cdef long long v = 0
    if type(a) is bytes:
        return _put_bulk(b, PyBytes_AS_STRING(a), PyBytes_GET_SIZE(a))
    if _utf8(a, &p, &n):
        return _put_bulk(b, p, n)
    if _int_ll(a, &v):
        return _put_bulk_ll(b, v)
    # Everything else (subclasses, big ints, bytearray, errors) runs the twin's own code.
    if isinstance(a, str):
        a = a.encode()
    elif isinstance(a, int):
        a = b"%d" % a
    piece = b"$%d\r\n%s\r\n" % (len(a), a)
    return _put(b, PyBytes_AS_STRING(piece), PyBytes_GET_SIZE(piece))


# ---------------------------------------------------------------------------------------------
# Phone numbers
# ---------------------------------------------------------------------------------------------

cdef inline bint _is_space(char c) noexcept nogil:
    # str.strip()'s ASCII whitespace: \t\n\v\f\r, the \x1c-\x1f separators and space.
    return c == 32 or (9 <= c <= 13) or (28 <= c <= 31)


cdef inline char _lower(char c) noexcept nogil:
    return c + 32 if b'A' <= c <= b'Z' else c


cdef object _norm_ascii(const char* s, Py_ssize_t n, const char* cc, Py_ssize_t ccn):
    """normalise() for ASCII input: the twin's steps as index moves over the raw chars."""
    cdef Py_ssize_t i = 0, j = n, k, tn = 0, dn
    # t is at most 17 chars: from 18 on, every branch below makes more than 15 digits.
    cdef char t[18]
    cdef char out[16]
    cdef const char* at
    cdef char c
    while i < j and _is_space(s[i]):
        i += 1
    while j > i and _is_space(s[j - 1]):
        j -= 1
    if j > i and s[i] == b'<' and s[j - 1] == b'>':  # '<' != '>' so j - i >= 2 here
        i += 1
        j -= 1
        while i < j and _is_space(s[i]):
            i += 1
        while j > i and _is_space(s[j - 1]):
            j -= 1
    if (j - i >= 4 and s[i + 3] == b':'
            and ((_lower(s[i]) == b's' and _lower(s[i + 1]) == b'i' and _lower(s[i + 2]) == b'p')
                 or (_lower(s[i]) == b't' and _lower(s[i + 1]) == b'e'
                     and _lower(s[i + 2]) == b'l'))):
        i += 4
    elif (j - i >= 5 and s[i + 4] == b':' and _lower(s[i]) == b's' and _lower(s[i + 1]) == b'i'
          and _lower(s[i + 2]) == b'p' and _lower(s[i + 3]) == b's'):
        i += 5
    at = <const char*>memchr(s + i, b'@', j - i)
    if at != NULL:
        j = at - s
    at = <const char*>memchr(s + i, b';', j - i)
    if at != NULL:
        j = at - s
    for k in range(i, j):
        c = s[k]
        if c == b' ' or c == b'-' or c == b'.' or c == b'(' or c == b')' or c == b'\t':
            continue
        if tn == 17:
            return None
        t[tn] = c
        tn += 1
    out[0] = b'+'
    if tn >= 1 and t[0] == b'+':
        dn = tn - 1
        if dn < 8 or dn > 15:
            return None
        memcpy(out + 1, t + 1, dn)
    elif tn >= 2 and t[0] == b'0' and t[1] == b'0':
        dn = tn - 2
        if dn < 8 or dn > 15:
            return None
        memcpy(out + 1, t + 2, dn)
    elif tn >= 1 and t[0] == b'0':
        dn = ccn + tn - 1
        if dn < 8 or dn > 15:
            return None
        memcpy(out + 1, cc, ccn)
        memcpy(out + 1 + ccn, t + 1, tn - 1)
    else:
        dn = tn
        if dn < 8 or dn > 15:
            return None
        memcpy(out + 1, t, dn)
    for k in range(1, dn + 1):
        if out[k] < b'0' or out[k] > b'9':
            return None
    if out[1] == b'0':
        return None
    return PyUnicode_DecodeUTF8(out, dn + 1, NULL)


_SEPARATORS = frozenset(" -.()\t")


@cython.boundscheck(True)
@cython.wraparound(True)
def _normalise_py(raw, country_code):
    # The twin's normalise(), verbatim: used for non-ASCII or non-str input, where Unicode
    # whitespace, case mapping and error behaviour must match exactly.
    s = raw.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1].strip()
    low = s[:5].lower()
    if low.startswith("sip:") or low.startswith("tel:"):
        s = s[4:]
    elif low.startswith("sips:"):
        s = s[5:]
    at = s.find("@")
    if at >= 0:
        s = s[:at]
    semi = s.find(";")
    if semi >= 0:
        s = s[:semi]
    kept = [ch for ch in s if ch not in _SEPARATORS]
    t = "".join(kept)
    if t.startswith("+"):
        d = t[1:]
    elif t.startswith("00"):
        d = t[2:]
    elif t.startswith("0"):
        d = country_code + t[1:]
    else:
        d = t
    n = len(d)
    if n < 8 or n > 15:
        return None
    for ch in d:
        if ch < "0" or ch > "9":
            return None
    if d[0] == "0":
        return None
    return "+" + d


cdef inline object _normalise(object raw, object cc):
    if (type(raw) is str and PyUnicode_IS_ASCII(raw)
            and type(cc) is str and PyUnicode_IS_ASCII(cc)):
        return _norm_ascii(<const char*>PyUnicode_DATA(raw), PyUnicode_GET_LENGTH(raw),
                           <const char*>PyUnicode_DATA(cc), PyUnicode_GET_LENGTH(cc))
    return _normalise_py(raw, cc)


def normalise(raw, country_code="234"):
    """Return `raw` as E.164 ("+<digits>"), or None when it is not a phone number.

    Accepts +CC..., CC..., national 0..., international 00..., sip:/sips:/tel: URIs (user part
    before '@', ';params' dropped), spaces, dashes, dots and parentheses. A number has 8 to 15
    digits and its country code does not start with 0.
    """
    return _normalise(raw, country_code)


cdef inline unsigned int _fnv1a(const char* p, Py_ssize_t n) noexcept nogil:
    cdef unsigned int h = 0x811C9DC5
    cdef Py_ssize_t i
    for i in range(n):
        h ^= <unsigned char>p[i]
        h *= 0x01000193
    return h


cdef inline object _partition(object number, object partitions):
    """partition_of(); returns a Python int (exactly what the twin's `h % partitions` gives)."""
    cdef const char* p
    cdef Py_ssize_t n
    cdef unsigned int h
    cdef long long parts = 0
    if type(number) is str and PyUnicode_IS_ASCII(number):
        h = _fnv1a(<const char*>PyUnicode_DATA(number), PyUnicode_GET_LENGTH(number))
    else:
        enc = number.encode()
        h = _fnv1a(PyBytes_AS_STRING(enc), PyBytes_GET_SIZE(enc)) if type(enc) is bytes \
            else _fnv1a_obj(enc)
    if _int_ll(partitions, &parts) and parts > 0:
        return <long long>(h % <unsigned long long>parts)
    return h % partitions


cdef unsigned int _fnv1a_obj(object enc):
    cdef unsigned int h = 0x811C9DC5
    for byte in enc:
        h ^= <unsigned int>byte
        h *= 0x01000193
    return h


def partition_of(number, partitions):
    """Return the key partition of a normalised number (FNV-1a 32 of its UTF-8 bytes)."""
    return _partition(number, partitions)


def severity_of(distinct):
    """Return the seed's severity band for a distinct A-number count."""
    if distinct >= 7:
        return "CRITICAL"
    if distinct >= 5:
        return "HIGH"
    return "LOW"


# ---------------------------------------------------------------------------------------------
# Request frames: a strict msgpack subset decoder
# ---------------------------------------------------------------------------------------------

MAX_DEPTH = 32
FIELDS = (b"call_id", b"a", b"b", b"ts", b"src_ip", b"trunk")

cdef enum:
    _MAX_DEPTH = 32
cdef unsigned long long _MAX_TS_INT = 100000000000ULL  # 1e11 seconds: year 5138
cdef Py_ssize_t _STR32_MAX = 0xFFFFFFFF  # longer strings: packb() decides (it raises)
cdef const char* _HEX = b"0123456789abcdef"

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
_NAMES = ("call_id", "a", "b", "ts", "src_ip", "trunk")
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


cdef class Request:
    """A decoded, validated request."""

    cdef public object call_id, a, b, ts_ms, src_ip, trunk

    def __init__(self, call_id, a, b, ts_ms, src_ip, trunk):
        self.call_id = call_id
        self.a = a
        self.b = b
        self.ts_ms = ts_ms
        self.src_ip = src_ip
        self.trunk = trunk


class RequestError(Exception):
    """A request frame was refused; `code` and `message` go back to the caller."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def decode_request(data, max_bytes, now_ms):
    """Decode and validate one request frame. Raises RequestError(code, message)."""
    cdef const unsigned char* p
    cdef Py_ssize_t n
    cdef _Req r = _Req.__new__(_Req)
    _view(data, &p, &n)
    if _too_large(n, max_bytes, r) or _decode(p, n, r):
        raise RequestError(r.err_code, r.err_msg)
    cdef Request req = Request.__new__(Request)
    req.call_id, req.a, req.b, req.src_ip, req.trunk = r.call_id, r.a, r.b, r.src_ip, r.trunk
    req.ts_ms = r.ts_ms if r.has_ts else now_ms
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


# ---------------------------------------------------------------------------------------------
# RESP (Redis protocol)
# ---------------------------------------------------------------------------------------------


class Incomplete(Exception):
    """More bytes are needed to parse a whole reply."""


cdef class RespError:
    """An error reply from the store."""

    cdef public object message

    def __init__(self, message):
        self.message = message

    def __eq__(self, other):
        return isinstance(other, RespError) and (<RespError>other).message == self.message

    def __ne__(self, other):
        return not (isinstance(other, RespError) and (<RespError>other).message == self.message)

    __hash__ = None  # like the twin, whose __eq__ without __hash__ makes it unhashable

    def __repr__(self):
        return f"RespError({self.message!r})"


def encode_command(*args):
    """Encode one command as a RESP array of bulk strings."""
    cdef char stack[512]
    cdef _Buf b
    b.p = stack
    b.n = 0
    b.cap = sizeof(stack)
    b.heap = False
    try:
        _put_hdr(&b, b'*', len(args))
        for a in args:
            _put_arg(&b, a)
        return PyBytes_FromStringAndSize(b.p, b.n)
    finally:
        if b.heap:
            free(b.p)


cdef int _propagate() except -1:
    return -1  # raise the exception already set


cdef inline Py_ssize_t _find_crlf(const char* b, Py_ssize_t n, Py_ssize_t pos) noexcept nogil:
    cdef const char* q
    while pos < n:
        q = <const char*>memchr(b + pos, b'\r', n - pos)
        if q == NULL:
            return -1
        pos = q - b
        if pos + 1 < n and b[pos + 1] == b'\n':
            return pos
        pos += 1
    return -1


cdef object _resp(object buf, const char* b, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t* nxt):
    """Parse one reply at pos of buf's bytes b[:n]; set *nxt to its end. The twin's
    parse_reply() on C pointers; int() itself parses any count it cannot parse in C."""
    cdef Py_ssize_t end = _find_crlf(b, n, pos), i, count, ls
    cdef long long v
    cdef char t
    if end < 0:
        raise Incomplete
    t = b[pos]
    ls = pos + 1
    pos = end + 2
    if t == b'$':
        if not _parse_ll(b + ls, end - ls, &v):
            big = int(buf[ls:end])
            if big < 0:
                v = -1
            elif big > n:
                raise Incomplete
            else:
                v = big
        if v < 0:
            nxt[0] = pos
            return None
        if pos + v + 2 > n:
            raise Incomplete
        nxt[0] = pos + v + 2
        return PyBytes_FromStringAndSize(b + pos, v)
    if t == b':':
        nxt[0] = pos
        if _parse_ll(b + ls, end - ls, &v):
            return v
        return int(buf[ls:end])
    if t == b'*':
        if not _parse_ll(b + ls, end - ls, &v):
            big = int(buf[ls:end])
            # A count beyond the buffer just runs out of bytes (Incomplete), as in the twin.
            if big < 0:
                v = -1
            elif big > PY_SSIZE_T_MAX:
                v = PY_SSIZE_T_MAX
            else:
                v = big
        if v < 0:
            nxt[0] = pos
            return None
        count = v
        items = []
        if Py_EnterRecursiveCall(" while parsing a RESP reply"):
            _propagate()
        try:
            for i in range(count):
                items.append(_resp(buf, b, n, pos, &pos))
        finally:
            Py_LeaveRecursiveCall()
        nxt[0] = pos
        return items
    if t == b'+':
        nxt[0] = pos
        return PyBytes_FromStringAndSize(b + ls, end - ls)
    if t == b'-':
        nxt[0] = pos
        e = RespError.__new__(RespError)
        (<RespError>e).message = PyUnicode_DecodeUTF8(b + ls, end - ls, "replace")
        return e
    raise ValueError(f"unexpected RESP type byte {<unsigned char>t!r}")


@cython.boundscheck(True)
@cython.wraparound(True)
def _parse_reply_py(buf, pos):
    # The twin's parse_reply(), verbatim: for a negative pos or a buffer that is neither
    # bytes nor bytearray, where Python's own indexing rules decide what happens.
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    t = buf[pos]
    line = buf[pos + 1:end]
    pos = end + 2
    if t == 0x24:  # $
        n = int(line)
        if n < 0:
            return None, pos
        if pos + n + 2 > len(buf):
            raise Incomplete
        return bytes(buf[pos:pos + n]), pos + n + 2
    if t == 0x3A:  # :
        return int(line), pos
    if t == 0x2A:  # *
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            v, pos = _parse_reply_py(buf, pos)
            items.append(v)
        return items, pos
    if t == 0x2B:  # +
        return bytes(line), pos
    if t == 0x2D:  # -
        return RespError(line.decode("utf-8", "replace")), pos
    raise ValueError(f"unexpected RESP type byte {t!r}")


def parse_reply(buf, Py_ssize_t pos):
    """Parse one RESP2 reply at pos; return (value, next pos). Raises Incomplete.

    Bulk strings come back as bytes, integers as int, nil as None, errors as RespError.
    """
    cdef Py_ssize_t nxt = 0
    if pos >= 0:
        if type(buf) is bytes:
            v = _resp(buf, PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf), pos, &nxt)
            return v, nxt
        if type(buf) is bytearray:
            v = _resp(buf, PyByteArray_AS_STRING(buf), PyByteArray_GET_SIZE(buf), pos, &nxt)
            return v, nxt
    return _parse_reply_py(buf, pos)


# ---------------------------------------------------------------------------------------------
# The decider
# ---------------------------------------------------------------------------------------------

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
    cdef public object context  # GatewayContext, or None (see the twin)
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
                 alert_prefix="00000000-0000-4000-8000"):
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
        self.context = None
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
        if isinstance(r, RespError) and (<RespError>r).message.startswith("NOSCRIPT"):
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
                    out.append(encode_error("store_error", (<RespError>rep).message))
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
