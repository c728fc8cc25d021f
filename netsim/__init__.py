"""netsim: emulated slow, time-varying links (model, simulator, emulation, namespaces)."""

from . import cost
from .clock import (
    Collective,
    Compute,
    Handle,
    Irecv,
    Isend,
    Recv,
    Send,
    Simulator,
    Timeline,
    TimelineEvent,
    VirtualClock,
    Wait,
    WallClock,
)
# `netsim.emulate(...)` is the function: binding it here, after its submodule is imported,
# keeps the attribute pointing at the function (this import costs torch's import time).
from .emulate import EmulateStats, Emulator, emulate
from .link import Link, uniform
from .reserve import Reservation, Reserver
from .topo import Topo
from .trace import Trace

__all__ = [
    "Collective",
    "Compute",
    "EmulateStats",
    "Emulator",
    "Handle",
    "Irecv",
    "Isend",
    "Link",
    "Recv",
    "Reservation",
    "Reserver",
    "Send",
    "Simulator",
    "Timeline",
    "TimelineEvent",
    "Topo",
    "Trace",
    "VirtualClock",
    "Wait",
    "WallClock",
    "cost",
    "emulate",
    "uniform",
]
