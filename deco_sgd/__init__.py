"""DeCo-SGD: adaptive compression ratio and staleness for data-parallel SGD (design: deco_sgd.md).

So far this package holds the pure-logic foundation: the validated config, the Φ registry,
the time model, the convergence surrogate and its fit, the controller and the estimators.
The DDP hook, the optimizer wrapper and the benchmark build on them.
"""
from .config import ADAPTIVE_CODECS, DEFAULT_RATIO_GRID, TAU_LIMIT, DecoConfig
from .controller import Controller, Decision, Measurements, Score
from .estimators import (
    BandwidthEstimator,
    ComputeTimeEstimator,
    Ema,
    GradStatsEstimator,
    LatencyEstimator,
    sampled_sq_norm,
    shared_coords,
)
from .phi import PHI_FUNCTIONS, phi_value, register_phi
from .surrogate import FitResult, SurrogateParams, fit_surrogate, iterations
from .timemodel import MessageSize, kept_elements, message_size, pattern_for, powersgd_size, t_iter, tau_min

__all__ = [
    "DecoConfig",
    "ADAPTIVE_CODECS",
    "DEFAULT_RATIO_GRID",
    "TAU_LIMIT",
    "Controller",
    "Decision",
    "Measurements",
    "Score",
    "Ema",
    "ComputeTimeEstimator",
    "BandwidthEstimator",
    "LatencyEstimator",
    "GradStatsEstimator",
    "shared_coords",
    "sampled_sq_norm",
    "PHI_FUNCTIONS",
    "phi_value",
    "register_phi",
    "SurrogateParams",
    "FitResult",
    "fit_surrogate",
    "iterations",
    "MessageSize",
    "kept_elements",
    "message_size",
    "powersgd_size",
    "pattern_for",
    "t_iter",
    "tau_min",
]
