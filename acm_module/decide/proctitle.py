"""Name processes so `ps`, `top` and `pgrep` tell workers and sidecars apart."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1


def set_name(name: str) -> None:
    """Set this process's comm name (Linux; at most 15 bytes); a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def die_with_parent(sig: int, parent_pid: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux).

    A supervisor killed with SIGKILL cannot stop its workers; without this they would live on
    as orphans holding the endpoint. If the parent is already gone, exit now.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
