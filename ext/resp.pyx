# Included by _hotpath.pyx: one extension module, one C namespace (see its docstring).
"""RESP (the Redis protocol), compiled: command encoder, reply parser.

The twin of acm_module/engine/resp_py.py: commands written into a cbuf.pxd buffer, replies
parsed with C pointers; the twin's own parse_reply() for a negative position or a buffer that
is neither bytes nor bytearray.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free
from libc.string cimport memchr

from cbuf cimport (
    PyUnicode_DecodeUTF8,
    _Buf,
    _int_ll,
    _parse_ll,
    _put,
    _put_bulk,
    _put_bulk_ll,
    _put_hdr,
    _utf8,
)


cdef extern from "Python.h":
    int Py_EnterRecursiveCall(const char*)  # nonzero (1, not -1) with RecursionError set
    void Py_LeaveRecursiveCall()
    const Py_ssize_t PY_SSIZE_T_MAX


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
        return RespError(PyUnicode_DecodeUTF8(b + ls, end - ls, "replace"))
    raise ValueError(f"unexpected RESP type byte {<unsigned char>t!r}")


# The twin's own parse_reply() for a negative pos or a buffer that is neither bytes nor
# bytearray, where Python's own indexing rules decide what happens.
from acm_module.engine.resp_py import parse_reply as _parse_reply_py


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
