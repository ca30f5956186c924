"""Fraud alerts: severity bands and the alert lifecycle of the seed's Fraud context."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from acm_module.engine.types import severity_of


class Severity(enum.StrEnum):
    """Severity of a masking alert, by distinct A-numbers: <5 LOW, 5-6 HIGH, >=7 CRITICAL."""

    LOW = "LOW"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"

    @classmethod
    def of(cls, distinct: int) -> Severity:
        """Return the band of a distinct A-number count."""
        return cls(severity_of(distinct))


class AlertStatus(enum.StrEnum):
    """Where an alert is in the fraud team's workflow."""

    NEW = "NEW"
    INVESTIGATING = "INVESTIGATING"
    RESOLVED = "RESOLVED"
    FALSE_POSITIVE = "FALSE_POSITIVE"


# Allowed lifecycle moves; RESOLVED and FALSE_POSITIVE are final.
TRANSITIONS: dict[AlertStatus, frozenset[AlertStatus]] = {
    AlertStatus.NEW: frozenset({AlertStatus.INVESTIGATING, AlertStatus.RESOLVED,
                                AlertStatus.FALSE_POSITIVE}),
    AlertStatus.INVESTIGATING: frozenset({AlertStatus.RESOLVED, AlertStatus.FALSE_POSITIVE}),
    AlertStatus.RESOLVED: frozenset(),
    AlertStatus.FALSE_POSITIVE: frozenset(),
}


class AlertType(enum.StrEnum):
    """Kinds of alert."""

    MULTICALL_MASKING = "MULTICALL_MASKING"


@dataclass
class FraudAlert:
    """A masking alert: one attack episode on one B-number."""

    alert_id: str
    b_number: str
    a_numbers: list[str]
    max_distinct: int
    detection_window_ms: int
    detected_at: datetime
    alert_type: AlertType = AlertType.MULTICALL_MASKING
    status: AlertStatus = AlertStatus.NEW
    assigned_to: str | None = None
    resolved_at: datetime | None = None
    ncc_incident_id: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def severity(self) -> Severity:
        """Return the band of the largest distinct count seen in the episode."""
        return Severity.of(self.max_distinct)

    def can_move_to(self, new: AlertStatus) -> bool:
        """Say whether the lifecycle allows moving to `new`."""
        return new in TRANSITIONS[self.status]
