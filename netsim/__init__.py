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
from .link import Link, uniform
from .reserve import Reservation, Reserver
from .topo import Topo
from .trace import Trace

__all__ = [
    "Collective",
    "Compute",
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
    "uniform",
]
