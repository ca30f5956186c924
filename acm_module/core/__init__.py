"""The bottom layer, with no I/O policy: settings (declared once), logging and redaction,
errors, the shared hot-path types, the stream-record schema, the alert lifecycle, backoff,
database plumbing and the clients off the decision path (redis-py, the MI client). Imports
nothing from acm_module outside core/, so every room may import it.
"""
