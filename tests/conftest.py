"""Hypothesis profile shared by the whole suite: deterministic and bounded.

`derandomize=True` derives every example from the test itself, so a run is reproducible
on any machine and never flakes; `database=None` keeps it that way (no replay of examples
saved by an earlier run on this machine); `max_examples` keeps the suite fast on 2 busy cores;
no deadline, because timing on a shared machine is noise, not a property of the code.
Set HYPOTHESIS_PROFILE=ccomm-thorough for a longer local search.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ccomm",
    derandomize=True,
    database=None,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ccomm-thorough",
    derandomize=True,
    database=None,
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ccomm"))
