"""Name processes so `ps`, `top` and `pgrep` tell workers and sidecars apart."""

from __future__ import annotations

import ctypes
import ctypes.util

_PR_SET_NAME = 15


def set_name(name: str) -> None:
    """Set this process's comm name (Linux; at most 15 bytes); a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
