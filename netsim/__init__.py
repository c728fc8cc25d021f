"""netsim: emulated slow, time-varying links (model, simulator, emulation, namespaces)."""

from .link import Link, uniform
from .reserve import Reservation, Reserver
from .topo import Topo
from .trace import Trace

__all__ = [
    "Link",
    "Reservation",
    "Reserver",
    "Topo",
    "Trace",
    "uniform",
]
