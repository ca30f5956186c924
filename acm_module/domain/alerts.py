"""The alert lifecycle of the seed's Fraud context: where an alert is in the fraud team's work."""

from __future__ import annotations

import enum


class AlertStatus(enum.StrEnum):
    """Where an alert is in the fraud team's workflow."""

    NEW = "NEW"
    INVESTIGATING = "INVESTIGATING"
    CONFIRMED = "CONFIRMED"  # masking confirmed; still open until RESOLVED
    RESOLVED = "RESOLVED"
    FALSE_POSITIVE = "FALSE_POSITIVE"


# Allowed lifecycle moves: NEW -> INVESTIGATING -> CONFIRMED | FALSE_POSITIVE, CONFIRMED ->
# RESOLVED; RESOLVED and FALSE_POSITIVE are final.
TRANSITIONS: dict[AlertStatus, frozenset[AlertStatus]] = {
    AlertStatus.NEW: frozenset({AlertStatus.INVESTIGATING, AlertStatus.CONFIRMED,
                                AlertStatus.RESOLVED, AlertStatus.FALSE_POSITIVE}),
    AlertStatus.INVESTIGATING: frozenset({AlertStatus.CONFIRMED, AlertStatus.RESOLVED,
                                          AlertStatus.FALSE_POSITIVE}),
    AlertStatus.CONFIRMED: frozenset({AlertStatus.RESOLVED}),
    AlertStatus.RESOLVED: frozenset(),
    AlertStatus.FALSE_POSITIVE: frozenset(),
}

