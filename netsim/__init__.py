"""netsim: emulated slow, time-varying links, in layers (one subpackage each).

* :mod:`netsim.model`: the link model (link, trace, topo, cost, reserve, clock); no torch
  except where :mod:`netsim.model.cost` uses ccomm's schedules.
* :mod:`netsim.emulation`: in-process emulation of torch.distributed traffic (torch).
* :mod:`netsim.namespaces`: OS networking, hosts as network namespaces or Mininet hosts, the
  delay wire (root).
* :mod:`netsim.probe`: measure what a net gives against its link.
* :mod:`netsim.cli`: the ``netsim`` command line.

The names below are importable from ``netsim`` itself and load their module on first use, so
``import netsim`` costs nothing (and no torch). ``netsim.emulate`` is the function
:func:`netsim.emulation.emulate`; the package is :mod:`netsim.emulation`.
"""

from ._lazy import lazy_exports

__all__ = [
    "EmulateStats",
    "Emulator",
    "Link",
    "Reservation",
    "Reserver",
    "Topo",
    "Trace",
    "VirtualClock",
    "WallClock",
    "cost",
    "emulate",
    "uniform",
]

_EXPORTS = {
    "EmulateStats": "netsim.emulation",
    "Emulator": "netsim.emulation",
    "emulate": "netsim.emulation",
    "Link": "netsim.model.link",
    "uniform": "netsim.model.link",
    "Reservation": "netsim.model.reserve",
    "Reserver": "netsim.model.reserve",
    "Topo": "netsim.model.topo",
    "Trace": "netsim.model.trace",
    "VirtualClock": "netsim.model.clock",
    "WallClock": "netsim.model.clock",
    "cost": "netsim.model.cost:",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
