"""Type stub of the compiled hot path (ext/_hotpath.pyx), the twin of engine/hotpath_py.py."""

from typing import Any, Final

MAX_DEPTH: Final[int]
FIELDS: Final[tuple[bytes, ...]]

def normalise(raw: str, country_code: str = "234") -> str | None: ...
def partition_of(number: str, partitions: int) -> int: ...
def severity_of(distinct: int) -> str: ...

class Request:
    call_id: str
    a: str | None
    b: str | None
    ts_ms: int
    src_ip: str
    trunk: str
    def __init__(self, call_id: str, a: str | None, b: str | None, ts_ms: int,
                 src_ip: str, trunk: str) -> None: ...

class RequestError(Exception):
    code: str
    message: str
    def __init__(self, code: str, message: str) -> None: ...

def decode_request(data: bytes | bytearray, max_bytes: int, now_ms: int) -> Request: ...
def encode_reply(verdict: str, reason: str, distinct: int, alert_id: str = "",
                 severity: str = "") -> bytes: ...
def encode_error(code: str, message: str) -> bytes: ...

class Incomplete(Exception): ...

class RespError:
    message: str
    def __init__(self, message: str) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __ne__(self, other: object) -> bool: ...
    __hash__: None  # type: ignore[assignment]

def encode_command(*args: bytes | str | int) -> bytes: ...
def parse_reply(buf: bytes | bytearray, pos: int) -> tuple[object, int]: ...

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
    def __init__(self, *, decide_sha: str, threshold: int = 5, window: float = 5.0,
                 mode: str = "block", dedup_ttl: float = 32.0, block_ttl: float = 0.0,
                 country_code: str = "234", partitions: int = 16,
                 max_request_bytes: int = 4096,
                 alert_prefix: str = "00000000-0000-4000-8000") -> None: ...
    def configure(self, *, threshold: int, window: float, mode: str, dedup_ttl: float,
                  block_ttl: float) -> None: ...
    def begin(self, frames: list[bytes], now_ms: int, rx_us: int) -> None: ...
    def pipeline(self) -> tuple[bytes, int]: ...
    def finish(self, replies: list[Any]) -> list[bytes]: ...
    def fail(self, code: str, message: str) -> list[bytes]: ...
    def blocks_to_write(self) -> list[tuple[str, int, str, str]]: ...
