# Included by _hotpath.pyx: one extension module, one C namespace (see its docstring).
"""Phone numbers, compiled: E.164 normalisation and the key partition (FNV-1a).

The twin of acm_module/core/numbers.py: C char loops for ASCII input, the twin's own
normalise() for everything else.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memchr, memcpy

from cbuf cimport (
    PyUnicode_DATA,
    PyUnicode_DecodeUTF8,
    PyUnicode_GET_LENGTH,
    PyUnicode_IS_ASCII,
    _int_ll,
)


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


# The twin's own normalise() for non-ASCII or non-str input, where Unicode whitespace, case
# mapping and error behaviour must match it exactly.
from acm_module.core.numbers import normalise as _normalise_py


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
