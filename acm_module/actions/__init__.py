"""Actions on alerts, off the hot path: end the attack's calls, notify, record; the lifecycle."""
