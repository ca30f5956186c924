"""What every sink implements, and the two ways a write can fail."""

from __future__ import annotations

import abc

from acm_module.core.errors import AcmError
from acm_module.core.records import AlertChange, Decision


class SinkUnavailable(AcmError, ConnectionError):
    """The sink is down or timed out: retry the same batch later (nothing is lost)."""


class SinkRejected(AcmError, ValueError):
    """The sink refused the data itself: retrying the same rows can never succeed."""


class Sink(abc.ABC):
    """One database the writer persists to. Writes must be idempotent: a batch may be re-sent."""

    name: str = ""
    kinds: frozenset[str] = frozenset()  # record kinds it consumes: "d" decisions, "a" alerts

    @abc.abstractmethod
    def open(self) -> None:
        """Connect and create the schema if needed. Raises SinkUnavailable."""

    @abc.abstractmethod
    def write(self, decisions: list[Decision], alerts: list[AlertChange]) -> None:
        """Write and commit a batch. Raises SinkUnavailable or SinkRejected."""

    def tick(self) -> None:  # noqa: B027 - optional hook, most sinks have nothing to do
        """Do periodic side work between batches (best effort, never raises)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; never raises."""
