"""acm: anti-call-masking detection for OpenSIPS."""

__version__ = "0.1.0"
