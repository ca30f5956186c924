"""Exceptions raised by acm, in one place, and the exit code of a process that cannot boot."""

# A worker or sidecar that cannot start (bad address, refused credentials) exits with this, so
# the supervisor stops (or retries later) instead of respawning it in a loop, as gunicorn's
# WORKER_BOOT_ERROR.
BOOT_ERROR = 3


class AcmError(Exception):
    """Base of every acm error."""


class ConfigError(AcmError, ValueError):
    """A setting or config file is invalid."""


class StoreError(AcmError, ConnectionError):
    """The Redis-protocol store failed, timed out or is unreachable."""


class StoreReplyError(StoreError):
    """The store answered with an error reply (e.g. NOSCRIPT, WRONGTYPE)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MIUnavailable(AcmError, ConnectionError):
    """An MI endpoint (OpenSIPS's, acm's) is unreachable or did not answer in time (retryable)."""


class MIReplyError(AcmError):
    """An MI endpoint answered a command with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(f"{code} {message}" + (f" ({data})" if data else ""))
        self.code = code
        self.message = message
        self.data = data
