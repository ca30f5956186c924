"""C-level helpers every concept of the compiled hot path shares: Python object access without
conversions, decimal formatting/parsing, and a growable output buffer with RESP headers.

Header-only: every function is `cdef inline`, so a cimport compiles it into the module that
uses it (no runtime import, no call through a function pointer).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdlib cimport malloc, realloc
from libc.string cimport memcpy


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object)
    void* PyUnicode_DATA(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    object PyUnicode_DecodeUTF8(const char*, Py_ssize_t, const char*)
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1


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


cdef inline int _grow(_Buf* b, Py_ssize_t need) except -1:
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
