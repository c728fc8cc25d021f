"""Re-export of the shared gloo test harness (tests/ccomm/_dist.py; named _pool to avoid shadowing it)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ccomm"))
from _dist import DistPool, RankError, run_distributed  # noqa: E402

__all__ = ["DistPool", "RankError", "run_distributed"]
