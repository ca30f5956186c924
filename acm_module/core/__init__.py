"""The bottom layer, with no I/O policy: settings (declared once), logging and redaction,
errors, the shared hot-path types, phone numbers, the store's shared schema (keys, live config,
carrier registry, worker stats) and its redis-py client for everything off the decision path,
the stream-record schema, the alert lifecycle, backoff, the arbiter base and database plumbing.
Imports nothing from acm_module outside core/, so every room may import it.
"""
