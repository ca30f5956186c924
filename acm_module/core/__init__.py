"""The bottom layer: small helpers every room uses (backoff, redaction, database plumbing).

Imports nothing from acm_module outside core/, so any module may import it; settings, logging,
errors, keys and the stream-record schema are to join it (issue #13).
"""
