"""Exceptions of the actions and the alert lifecycle."""

from __future__ import annotations

from acm_module.core.errors import AcmError


class ActionError(AcmError):
    """Base of every action error."""


class MIUnavailable(ActionError, ConnectionError):
    """The OpenSIPS MI endpoint is unreachable or did not answer in time (retryable)."""


class MIReplyError(ActionError):
    """OpenSIPS answered a command with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(f"{code} {message}" + (f" ({data})" if data else ""))
        self.code = code
        self.message = message
        self.data = data


class DatabaseUnavailable(ActionError, ConnectionError):
    """PostgreSQL/YugabyteDB is down or timed out."""


class AlertNotFound(ActionError, LookupError):
    """No fraud_alerts row has that id (yet: the writer may not have persisted it)."""


class InvalidTransition(ActionError, ValueError):
    """The lifecycle does not allow that status change."""
