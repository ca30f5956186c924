"""Exceptions raised by acm, in one place."""


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


class ProtocolError(AcmError, ValueError):
    """Bytes on a wire were not what the protocol allows."""
