"""DeCo-SGD: adaptive compression ratio and staleness for data-parallel SGD (design: deco_sgd.md).

This package holds the validated config, the Φ registry, the time model, the convergence
surrogate and its fit, the controller and the estimators (pure logic), and the runtime:
`DecoState` with its in-flight FIFO, the DDP hook `deco_hook`, the optimizer wrapper
`DecoOptimizer` and the adaptive driver that re-chooses (ratio, staleness) while training.
`deco_sgd.bench` holds the benchmark's real-data tasks (mnist, bytelm); the
time-to-accuracy runner itself is not built yet.
"""
from .config import ADAPTIVE_CODECS, DEFAULT_RATIO_GRID, TAU_LIMIT, DecoConfig
from .adaptive import AdaptiveDriver
from .controller import Controller, Decision, Measurements, Score
from .errors import DecoCommError, DecoDesyncError, NonFiniteGradientError
from .checkpoint import CheckpointError
from .hook import attach_ddp, deco_hook
from .optim import DecoOptimizer
from .state import DecoState
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
    "DecoState",
    "DecoOptimizer",
    "deco_hook",
    "attach_ddp",
    "AdaptiveDriver",
    "DecoCommError",
    "DecoDesyncError",
    "NonFiniteGradientError",
    "CheckpointError",
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
