"""Registered noise terms Φ(δ, τ) of the convergence surrogate (docs/design/deco_sgd.md#template-surrogate).

Φ measures how much compression (fraction kept δ) coupled with staleness τ slows
convergence; the surrogate in :mod:`deco_sgd.surrogate` adds it under a square root next
to τ². Each Φ is a named function so that configs can pick one by name (`cfg.phi`).

* ``reported`` [secondary]: (1−δ)^(1−τ)/δ, as secondary sources report the paper's term.
  It is NaN at δ = 1, τ = 1 (0/0 in the form (1−δ)/(δ(1−δ)^τ)), tends to 1 rather than 0
  at τ = 1 as δ → 1, and diverges for τ ≥ 2 as δ → 1. We keep the 0/0 NaN visible instead
  of patching it: the config accepts ``reported`` only when every grid ratio is ≤ 0.5
  (:data:`REPORTED_MAX_RATIO`), where the formula is finite.
* ``exp2`` [ours, default]: ((1−δ)/δ)·ρ^τ with ρ = ``phi_base``: zero without compression,
  exponential in τ as the abstract says.
* ``poly`` [ours]: ((1−δ)/δ²)·2^τ, a more pessimistic choice in δ.
"""
from __future__ import annotations

import math
from typing import Callable

__all__ = ["PhiFn", "PHI_FUNCTIONS", "REPORTED_MAX_RATIO", "register_phi", "phi_value"]

#: Φ(δ, τ, base) -> value (may be inf or NaN; the caller decides what that means).
PhiFn = Callable[[float, int, float], float]

#: `reported` is only accepted when max(ratio_grid) is at most this (docs/design/deco_sgd.md#template-surrogate).
REPORTED_MAX_RATIO = 0.5


def _reported(delta: float, tau: int, base: float) -> float:
    # Evaluated literally as (1−δ)/(δ(1−δ)^τ) so that δ = 1 gives the 0/0 that
    # docs/design/deco_sgd.md#template-surrogate names;
    # base is unused (the reported term has no free base).
    num = 1.0 - delta
    den = delta * (1.0 - delta) ** tau
    if den == 0.0:
        return math.nan if num == 0.0 else math.inf
    return num / den


def _exp2(delta: float, tau: int, base: float) -> float:
    return (1.0 - delta) / delta * base**tau


def _poly(delta: float, tau: int, base: float) -> float:
    # The spec fixes 2^τ here; phi_base only tunes exp2.
    return (1.0 - delta) / (delta * delta) * 2.0**tau


PHI_FUNCTIONS: dict[str, PhiFn] = {"reported": _reported, "exp2": _exp2, "poly": _poly}


def register_phi(name: str, fn: PhiFn) -> None:
    """Register a further Φ under `name` (refuses to replace an existing one)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if name in PHI_FUNCTIONS and PHI_FUNCTIONS[name] is not fn:
        raise ValueError(f"name: Φ {name!r} is already registered")
    PHI_FUNCTIONS[name] = fn


def phi_value(name: str, delta: float, tau: int, base: float = 2.0) -> float:
    """Φ_name(δ, τ); `ValueError` for an unknown name or δ outside (0, 1] or τ < 0."""
    if name not in PHI_FUNCTIONS:
        raise ValueError(f"phi: must be one of {sorted(PHI_FUNCTIONS)}, got {name!r}")
    if not (0.0 < delta <= 1.0):
        raise ValueError(f"delta: must be in (0, 1], got {delta!r}")
    if tau < 0:
        raise ValueError(f"tau: must be >= 0, got {tau!r}")
    return float(PHI_FUNCTIONS[name](float(delta), int(tau), float(base)))
