"""Benchmarks import the source tree's helpers (tests/servers.py) like the suite does."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
