"""In-process emulation: real torch.distributed traffic completes when the link model says.

:func:`emulate` (also ``netsim.emulate``) returns an :class:`Emulator`, a context manager that
patches torch.distributed (see :mod:`.engine` for the design and its limits). The engine
(:mod:`.engine`) times operations for the emulated group (:mod:`._pg`) and its work handles
(:mod:`._work`) through a small protocol (``_pg.Engine``); the clocks, the patching, the
schedules, the replicated link state and the clock agreement sit in the other private modules.
"""

from .engine import LATE_SLACK_S, EmulatedProcessGroup, EmulatedWork, EmulateStats, Emulator, emulate

__all__ = ["LATE_SLACK_S", "EmulateStats", "EmulatedProcessGroup", "EmulatedWork", "Emulator", "emulate"]
