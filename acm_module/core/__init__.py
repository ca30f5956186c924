"""The bottom layer, with no I/O policy: settings (declared once), logging and redaction,
errors, the shared hot-path types, the stream-record schema, the alert lifecycle, backoff and
database plumbing. Imports nothing from acm_module outside core/, so every room may import it.
"""
