# cython: language_level=3
"""The decision hot path, compiled: the twin of acm_module/engine/hotpath_py.py.

One extension module built from one .pyx per concept, as msgpack's _cmsgpack.pyx includes
_packer.pyx and _unpacker.pyx: numbers.pyx (E.164, partitions), request.pyx (msgpack request
decoder, reply encoders), resp.pyx (the Redis protocol), decider.pyx (a batch). They share one
C namespace, so the decider calls the decoder, the normaliser and the RESP writer as static C
functions; cbuf.pxd holds the C helpers all of them cimport. The types both twins share
(Request, RequestError, RespError, severities, the gateway context's interface) are pure Python,
defined once in acm_module/engine/types.py.

Same public API, byte-for-byte the same outputs (replies, error codes and messages, RESP
commands, counters). The pure-Python twin is the specification: where this code differs in
shape it is for speed, and every fast path falls back to the twin's own code (the pure
normalise() and parse_reply() themselves, or a `msgpack.packb` call) for inputs it does not
handle, so the rare cases cannot drift.
"""

from acm_module.engine.types import (
    FIELDS,
    MAX_DEPTH,
    Incomplete,
    Request,
    RequestError,
    RespError,
    severity_of,
)

__all__ = [
    "FIELDS", "MAX_DEPTH", "Decider", "Incomplete", "Request", "RequestError", "RespError",
    "decode_request", "encode_command", "encode_error", "encode_reply", "normalise",
    "parse_reply", "partition_of", "severity_of",
]

include "numbers.pyx"
include "request.pyx"
include "resp.pyx"
include "decider.pyx"
