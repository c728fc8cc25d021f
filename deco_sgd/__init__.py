"""DeCo-SGD: adaptive ratio (the fraction of gradient entries kept) and staleness for data-parallel SGD.

The names exported here are the package's public API, the ones README and
docs/deco_sgd.md use: the validated `DecoConfig`, the per-rank `DecoState`, the DDP
communication hook (`deco_hook`, `attach_ddp`), the optimizer wrapper `DecoOptimizer`, the
`AdaptiveDriver` that re-chooses (ratio, staleness) while training, the pure `Controller` and
the `Decision` records it logs, and the errors a run can raise.

Everything else stays importable from its own module: the estimators
(`deco_sgd.estimators`), the time model (`deco_sgd.timemodel`), the measured convergence
inputs (`deco_sgd.convergence`), the template surrogate and its Φ registry
(`deco_sgd.surrogate`, `deco_sgd.phi`) and the time-to-accuracy benchmark (`deco_sgd.bench`,
the `deco-sgd` command). The design record is docs/design/deco_sgd.md.
"""
from .adaptive import AdaptiveDriver
from .checkpoint import CheckpointError
from .config import DecoConfig
from .controller import Controller, Decision
from .errors import DecoCommError, DecoDesyncError, NonFiniteGradientError
from .hook import attach_ddp, deco_hook
from .optim import DecoOptimizer
from .state import DecoState

__all__ = [
    "DecoConfig",
    "DecoState",
    "DecoOptimizer",
    "deco_hook",
    "attach_ddp",
    "AdaptiveDriver",
    "Controller",
    "Decision",
    "DecoCommError",
    "DecoDesyncError",
    "NonFiniteGradientError",
    "CheckpointError",
]
