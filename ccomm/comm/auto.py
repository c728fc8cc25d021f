"""``algo="auto"``: which algorithm a collective runs, from the alpha-beta model.

The model (`ccomm.schedule.choose`) needs the link's one-way latency and bandwidth. For a
group whose link was measured (`set_measured`, e.g. from a probe or a training loop's
estimators) those are used; otherwise the process-wide `AutoConfig` (`configure`).

Every rank must pass the same values: ranks that choose different algorithms do not
deadlock silently, but the call fails with the group's timeout. `choose` never looks at
a size only one rank knows (see its docstring).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ..schedule import ALGOS, ROUND_OVERHEAD_S, choose
from ..validate import check_number

__all__ = ["AutoConfig", "auto_config", "clear_measured", "configure", "link_for", "resolve_algo", "set_measured"]


#: What a call may pass as ``algo``.
CHOICES: dict[str, tuple[str, ...]] = {op: ("auto", *algos) for op, algos in ALGOS.items()}


def _check_link(latency_s: float, bandwidth_Bps: float) -> None:
    check_number("latency_s", latency_s, 0.0)
    check_number("bandwidth_Bps", bandwidth_Bps, 0.0, lo_open=True)


@dataclass(frozen=True)
class AutoConfig:
    """Link assumed by ``algo="auto"`` for groups without a measurement.

    ``latency_s`` one-way seconds, ``bandwidth_Bps`` bytes per second (default: 50 us and
    10 Gbit/s, a data-centre link); ``min_gain`` is the predicted saving below which the
    backend's ring is kept; ``round_overhead_s`` the software cost charged per log-depth
    round (`ccomm.schedule.ROUND_OVERHEAD_S`). ``min_gain`` and ``round_overhead_s`` apply
    to measured links too.
    """

    latency_s: float = 50e-6
    bandwidth_Bps: float = 1.25e9
    min_gain: float = 0.05
    round_overhead_s: float = ROUND_OVERHEAD_S

    def __post_init__(self) -> None:
        _check_link(self.latency_s, self.bandwidth_Bps)
        check_number("min_gain", self.min_gain, 0.0, 1.0, hi_open=True)
        check_number("round_overhead_s", self.round_overhead_s, 0.0)


_lock = threading.Lock()
_config = AutoConfig()
_measured: dict[Any, tuple[float, float]] = {}


def _key(group: dist.ProcessGroup | None) -> Any:
    return "default" if group is None or group is dist.GroupMember.WORLD else group


def configure(config: AutoConfig) -> AutoConfig:
    """Set the process-wide `AutoConfig`; returns the previous one."""
    global _config
    if not isinstance(config, AutoConfig):
        raise ValueError(f"config must be a ccomm.comm.AutoConfig, got {type(config).__name__}")
    with _lock:
        previous, _config = _config, config
    return previous


def auto_config() -> AutoConfig:
    """The process-wide `AutoConfig`."""
    return _config


def set_measured(group: dist.ProcessGroup | None, latency_s: float, bandwidth_Bps: float) -> None:
    """Record the measured one-way latency and bandwidth of ``group``'s links (None: default group)."""
    _check_link(latency_s, bandwidth_Bps)
    with _lock:
        _measured[_key(group)] = (float(latency_s), float(bandwidth_Bps))


def clear_measured(group: dist.ProcessGroup | None = None, *, every: bool = False) -> None:
    """Forget ``group``'s measurement (or every group's with ``every=True``)."""
    with _lock:
        if every:
            _measured.clear()
        else:
            _measured.pop(_key(group), None)


def link_for(group: dist.ProcessGroup | None) -> tuple[float, float]:
    """``(latency_s, bandwidth_Bps)`` for ``group``: measured if known, else configured."""
    with _lock:
        got = _measured.get(_key(group))
        cfg = _config
    return got if got is not None else (cfg.latency_s, cfg.bandwidth_Bps)


def resolve_algo(
    op: str, algo: str, group: dist.ProcessGroup | None, world: int, nbytes: int, *, sizes_known: bool = True
) -> str:
    """The algorithm a call runs: ``algo`` checked, or the model's choice for ``"auto"``."""
    if algo not in CHOICES[op]:
        raise ValueError(f"algo={algo!r} must be one of {CHOICES[op]}")
    if algo == "doubling" and op == "allgather" and world & (world - 1):
        raise ValueError(f"algo='doubling' all-gather needs a power-of-two group size, got {world}; use 'bruck'")
    if algo != "auto":
        return algo
    latency_s, bandwidth_Bps = link_for(group)
    cfg = _config
    return choose(op, world, float(nbytes), latency_s, bandwidth_Bps, sizes_known=sizes_known,
                  min_gain=cfg.min_gain, overhead_s=cfg.round_overhead_s)
