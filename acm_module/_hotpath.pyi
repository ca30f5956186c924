"""Type stub of the compiled hot path (ext/_hotpath.pyx and the ext/<concept>.pyx it includes),
the twin of engine/hotpath_py.py. The shared types are engine/types.py's own classes."""

from typing import Any

from acm_module.engine.types import FIELDS as FIELDS
from acm_module.engine.types import MAX_DEPTH as MAX_DEPTH
from acm_module.engine.types import GatewayContext
from acm_module.engine.types import Incomplete as Incomplete
from acm_module.engine.types import Request as Request
from acm_module.engine.types import RequestError as RequestError
from acm_module.engine.types import RespError as RespError
from acm_module.engine.types import severity_of as severity_of

# numbers.pyx
def normalise(raw: str, country_code: str = "234") -> str | None: ...
def partition_of(number: str, partitions: int) -> int: ...

# request.pyx
def decode_request(data: bytes | bytearray, max_bytes: int, now_ms: int) -> Request: ...
def encode_reply(verdict: str, reason: str, distinct: int, alert_id: str = "",
                 severity: str = "") -> bytes: ...
def encode_error(code: str, message: str) -> bytes: ...

# resp.pyx
def encode_command(*args: bytes | str | int) -> bytes: ...
def parse_reply(buf: bytes | bytearray, pos: int) -> tuple[object, int]: ...

# decider.pyx
class Decider:
    sha: bytes
    country_code: str
    partitions: int
    max_request_bytes: int
    alert_prefix: str
    counter: int
    threshold: int
    window_ms: int
    mode: str
    dedup_ttl_ms: int
    block_ttl_ms: int
    state_ttl_ms: int
    noscript: bool
    counts: dict[str, int]
    context: GatewayContext | None
    def __init__(self, *, decide_sha: str, threshold: int = 5, window: float = 5.0,
                 mode: str = "block", dedup_ttl: float = 32.0, block_ttl: float = 0.0,
                 country_code: str = "234", partitions: int = 16,
                 max_request_bytes: int = 4096,
                 alert_prefix: str = "00000000-0000-4000-8000",
                 context: GatewayContext | None = None) -> None: ...
    def configure(self, *, threshold: int, window: float, mode: str, dedup_ttl: float,
                  block_ttl: float) -> None: ...
    def begin(self, frames: list[bytes], now_ms: int, rx_us: int) -> None: ...
    def rate_pipeline(self) -> tuple[bytes, int]: ...
    def rate_finish(self, replies: list[Any]) -> None: ...
    def pipeline(self) -> tuple[bytes, int]: ...
    def finish(self, replies: list[Any]) -> list[bytes]: ...
    def fail(self, code: str, message: str) -> list[bytes]: ...
    def blocks_to_write(self) -> list[tuple[str, int, str, str]]: ...
