"""DeCo-SGD: adaptive compression ratio and staleness for data-parallel SGD (design: deco_sgd.md).

So far this package holds the pure-logic foundation: the validated config, the Φ registry,
the controller's time model and surrogate, and the estimators. The DDP hook, the optimizer
wrapper and the benchmark build on them.
"""
from .config import ADAPTIVE_CODECS, DEFAULT_RATIO_GRID, TAU_LIMIT, DecoConfig
from .phi import PHI_FUNCTIONS, phi_value, register_phi

__all__ = [
    "DecoConfig",
    "ADAPTIVE_CODECS",
    "DEFAULT_RATIO_GRID",
    "TAU_LIMIT",
    "PHI_FUNCTIONS",
    "phi_value",
    "register_phi",
]
