"""Exceptions of the actions and the alert lifecycle."""

from __future__ import annotations

from acm_module.core.errors import AcmError

# The disconnect action's MI errors are the MI client's: core.errors.MIUnavailable, MIReplyError.


class ActionError(AcmError):
    """Base of every action error."""


class DatabaseUnavailable(ActionError, ConnectionError):
    """PostgreSQL/YugabyteDB is down or timed out."""


class AlertNotFound(ActionError, LookupError):
    """No fraud_alerts row has that id (yet: the writer may not have persisted it)."""


class InvalidTransition(ActionError, ValueError):
    """The lifecycle does not allow that status change."""
