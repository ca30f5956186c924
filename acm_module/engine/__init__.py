"""The decision engine: the compiled hot path, or its pure-Python twin when ACM_PUREPYTHON=1.

Both twins have the same API (engine/hotpath_py.py lists it) and share the types of
engine/types.py. A missing compiled module is an install error, not a reason to run slowly:
without ACM_PUREPYTHON=1 the import fails loudly.
"""

from __future__ import annotations

import os

if os.environ.get("ACM_PUREPYTHON", "") not in ("", "0"):
    from acm_module.engine import hotpath_py as hotpath
    IMPLEMENTATION = "python"
else:
    try:
        from acm_module import _hotpath as hotpath  # type: ignore[no-redef]
    except ImportError as e:  # pragma: no cover - an install problem
        raise ImportError(
            "acm's compiled hot path (acm_module._hotpath) is missing: install with "
            "`pip install .` (needs a C compiler), or set ACM_PUREPYTHON=1 for the slow twin"
        ) from e
    IMPLEMENTATION = "cython"

__all__ = ["IMPLEMENTATION", "hotpath"]
