"""Time model of one DeCo-SGD step as pure functions [ours] (docs/design/deco_sgd.md#time-model).

Message sizes per exchange pattern (docs/design/deco_sgd.md#message-sizes), with k = Σ_p ⌈δ·d_p⌉ kept
entries, b_v bytes per value and b_i per index. The collective patterns are read off `netsim.cost.schedule`
(built on `ccomm.schedule`, which describes what `ccomm.comm` sends), so they agree with
the transport and the simulator by construction (`collective_cost`):

1. build the schedule of the collective's algorithm for n ranks (all-reduce: the ring;
   all-gather: `algo`, what `algo="auto"` ran, default the ring);
2. V and the latency multiplier are `ccomm.schedule.cost_terms` of it: per step the
   busiest link's bytes, summed, and the number of steps (each costs one ℓ). V is the
   same for the ring and the log-depth all-gathers; the steps are n-1 against ⌈log2 n⌉.

The parameter-server and PowerSGD rows use closed forms.

Step time: T_iter(δ,τ) = max{T_comp, T_tx(δ), (T_comp + T_comm(δ))/(τ+1)} with
T_comm = L_eff + T_tx and T_tx = V/B. The least staleness reaching the floor
max{T_comp, T_tx} is τ_min(δ) = max(0, ⌈(T_comp + T_comm)/T_floor⌉ − 1)
(docs/design/deco_sgd.md#least-staleness).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ccomm.schedule import cost_terms
from netsim import cost

__all__ = [
    "PATTERNS",
    "INDEX_BYTES",
    "MessageSize",
    "collective_cost",
    "kept_elements",
    "message_size",
    "powersgd_size",
    "payload_message_size",
    "pattern_for",
    "t_iter",
    "t_floor",
    "tau_min",
]

#: Exchange patterns of the message-size table (docs/design/deco_sgd.md#message-sizes).
PATTERNS = ("allreduce_dense", "allreduce_sparse", "allgather", "ps")
#: b_i: int32 indices (docs/design/deco_sgd.md#message-sizes).
INDEX_BYTES = 4
# Relative slack in ⌈x⌉ so that a ratio that is an integer up to rounding (3.0000000000004)
# is not pushed to the next staleness.
_CEIL_RTOL = 1e-9


@dataclass(frozen=True)
class MessageSize:
    """Bytes received per worker per step (V) and how many one-way latencies ℓ one exchange costs."""

    nbytes: float
    latency_hops: int


def kept_elements(numels: Sequence[int], delta: float) -> int:
    """k = Σ_p min(d_p, max(1, ⌈δ·d_p⌉)): the per-tensor rule of ccomm's sparsifiers."""
    if not (0.0 < delta <= 1.0):
        raise ValueError(f"delta: must be in (0, 1], got {delta!r}")
    k = 0
    for d in numels:
        if d < 0:
            raise ValueError(f"numels: sizes must be >= 0, got {d}")
        if d:
            k += min(d, max(1, math.ceil(delta * d)))
    return k


def collective_cost(op: str, n: int, nbytes: float, algo: str = "ring") -> MessageSize:
    """V and latency hops of one `op` ("allreduce" / "allgather") of `nbytes` per rank by `algo`."""
    v, hops = cost_terms(cost.schedule(op, n, float(nbytes), algo))
    return MessageSize(v, hops)


def message_size(
    pattern: str, n: int, numels: Sequence[int], delta: float, value_bytes: int = 4, index_bytes: int = INDEX_BYTES,
    *, algo: str = "ring",
) -> MessageSize:
    """V and latency hops of one exchange of `pattern` among n workers (docs/design/deco_sgd.md#message-sizes).

    `algo` is the all-gather's algorithm (the "allgather" pattern only; all-reduces are rings)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: must be one of {list(PATTERNS)}, got {pattern!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be an integer >= 1, got {n!r}")
    if value_bytes not in (2, 4):
        raise ValueError(f"value_bytes: must be 2 or 4, got {value_bytes!r}")
    d = sum(int(x) for x in numels)
    k = kept_elements(numels, delta)
    if n == 1:
        return MessageSize(0.0, 0)
    if pattern == "allreduce_dense":
        return collective_cost("allreduce", n, d * value_bytes)
    if pattern == "allreduce_sparse":
        return collective_cost("allreduce", n, k * value_bytes)
    if pattern == "allgather":
        return collective_cost("allgather", n, k * (value_bytes + index_bytes), algo)
    # Parameter server [ours: push then pull are sequential phases on the worker's link,
    # so their bytes add]. The pull is the merged sparse sum, never more than dense.
    push = k * (value_bytes + index_bytes)
    pull = min(n * push, d * value_bytes)
    return MessageSize(float(push + pull), 2)


def payload_message_size(pattern: str, n: int, nbytes: float, algo: str = "ring") -> MessageSize:
    """V and hops of one exchange whose per-rank buffer is `nbytes` (the real payload size).

    `pattern` is "allreduce" (the buffer is reduced) or "allgather" (each rank's buffer is
    one block); `algo`'s schedule (`collective_cost`) gives V and the hops.
    """
    if pattern not in ("allreduce", "allgather"):
        raise ValueError(f"pattern: must be 'allreduce' or 'allgather', got {pattern!r}")
    if n == 1:
        return MessageSize(0.0, 0)
    return collective_cost(pattern, n, float(nbytes), algo)


def powersgd_size(n: int, shapes: Sequence[Sequence[int]], rank: int) -> MessageSize:
    """PowerSGD rank r: 2(n−1)/n·4·[Σ_mat r(m+p) + Σ_vec numel], 4(n−1) hops
    (docs/design/deco_sgd.md#message-sizes).

    A tensor of ≥ 2 dims is the matrix (shape[0], rest); the rank is capped at min(m, p).
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: must be an integer >= 1, got {rank!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be an integer >= 1, got {n!r}")
    elems = 0
    for shape in shapes:
        if len(shape) >= 2:
            m, p = int(shape[0]), math.prod(int(s) for s in shape[1:])
            elems += min(rank, m, p) * (m + p)
        else:
            elems += math.prod(int(s) for s in shape)
    if n == 1:
        return MessageSize(0.0, 0)
    return MessageSize(2 * (n - 1) / n * 4 * elems, 4 * (n - 1))


def pattern_for(exchange: str, delta: float) -> str:
    """Pattern the data exchange uses at ratio δ [ours].

    At δ = 1 nothing is dropped, so the exchange is a dense all-reduce (D-SGD) whatever the
    codec; below 1, `exchange` ("allreduce" for additive codecs, "allgather" otherwise).
    """
    if exchange not in ("allreduce", "allgather"):
        raise ValueError(f"exchange: must be 'allreduce' or 'allgather', got {exchange!r}")
    if delta >= 1.0:
        return "allreduce_dense"
    return "allreduce_sparse" if exchange == "allreduce" else "allgather"


def _check_times(t_comp: float, t_tx: float, l_eff: float, tau: int | None = None) -> None:
    if not (math.isfinite(t_comp) and t_comp > 0):
        raise ValueError(f"t_comp: must be finite and > 0, got {t_comp!r}")
    if math.isnan(t_tx) or t_tx < 0:
        raise ValueError(f"t_tx: must be >= 0 (inf for no bandwidth), got {t_tx!r}")
    if not (math.isfinite(l_eff) and l_eff >= 0):
        raise ValueError(f"l_eff: must be finite and >= 0, got {l_eff!r}")
    if tau is not None and (not isinstance(tau, int) or tau < 0):
        raise ValueError(f"tau: must be an integer >= 0, got {tau!r}")


def t_floor(t_comp: float, t_tx: float) -> float:
    """max{T_comp, T_tx}: no staleness makes a step faster than this."""
    return max(t_comp, t_tx)


def t_iter(t_comp: float, t_tx: float, l_eff: float, tau: int) -> float:
    """T_iter(δ,τ) (docs/design/deco_sgd.md#time-model) given T_comp, T_tx(δ) = V/B and L_eff (seconds)."""
    _check_times(t_comp, t_tx, l_eff, tau)
    return max(t_comp, t_tx, (t_comp + l_eff + t_tx) / (tau + 1))


def tau_min(t_comp: float, t_tx: float, l_eff: float) -> int:
    """τ_min(δ) = max(0, ⌈(T_comp + T_comm)/T_floor⌉ − 1), 0 when T_tx is infinite
    (docs/design/deco_sgd.md#least-staleness)."""
    _check_times(t_comp, t_tx, l_eff)
    if math.isinf(t_tx):
        return 0  # no staleness helps without bandwidth; the caller's fallback decides
    x = (t_comp + l_eff + t_tx) / t_floor(t_comp, t_tx)
    return max(0, math.ceil(x * (1.0 - _CEIL_RTOL)) - 1)
