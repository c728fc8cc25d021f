"""Measure what a net really gives and compare it with its link.

:func:`probe` and :func:`probe_gloo` measure a namespace net (:mod:`.namespace`, through the
agents of :mod:`.agent`, ``python -m netsim.probe.agent``); :func:`probe_emulate` asks the same
of :func:`netsim.emulate` (:mod:`.emulated`); both report a :class:`ProbeReport`
(:mod:`.report`). Loaded lazily: the agent runs with the standard library only.
"""

from .._lazy import lazy_exports

__all__ = ["GlooResult", "PairResult", "ProbeReport", "probe", "probe_emulate", "probe_gloo"]

_EXPORTS = {
    "GlooResult": "netsim.probe.report",
    "PairResult": "netsim.probe.report",
    "ProbeReport": "netsim.probe.report",
    "probe": "netsim.probe.namespace",
    "probe_gloo": "netsim.probe.namespace",
    "probe_emulate": "netsim.probe.emulated",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
