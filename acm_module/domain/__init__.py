"""The alert lifecycle (AlertStatus and its TRANSITIONS), used by actions.lifecycle."""
