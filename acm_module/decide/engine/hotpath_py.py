"""The decision hot path in pure Python: the readable reference and test oracle of ext/.

One module per concept, as in the compiled twin (ext/_hotpath.pyx includes ext/<concept>.pyx):
core/numbers.py (E.164, partitions, shared with every room), request_py (msgpack request
decoder, reply encoders), resp_py (the Redis protocol), decider_py (a batch: decode, one store
round trip, replies). The types both twins share (Request, RequestError, RespError,
severities, the gateway context's interface) are defined once in core/types.py. This module
gathers the twin's public API, the same names acm_module._hotpath exports.

Both implementations must stay byte-for-byte identical in what they return; the suite runs on
both and compares them on fuzzed input.
"""

from __future__ import annotations

from acm_module.core.numbers import normalise, partition_of
from acm_module.core.types import (
    FIELDS,
    MAX_DEPTH,
    Incomplete,
    Request,
    RequestError,
    RespError,
    severity_of,
)
from acm_module.decide.engine.decider_py import Decider
from acm_module.decide.engine.request_py import decode_request, encode_error, encode_reply
from acm_module.decide.engine.resp_py import encode_command, parse_reply

__all__ = [
    "FIELDS", "MAX_DEPTH", "Decider", "Incomplete", "Request", "RequestError", "RespError",
    "decode_request", "encode_command", "encode_error", "encode_reply", "normalise",
    "parse_reply", "partition_of", "severity_of",
]
