"""What each collective of `ccomm.comm` sends: rounds, bytes per round, who sends to whom.

Pure functions, no torch: the one description of the algorithms that `ccomm.comm` executes
and that `netsim.model.cost.schedule` (which builds on this module) evaluates on links. A
schedule is a list of steps, each a list of ``(src, dst, nbytes)`` messages; a rank takes
part in step k+1 once its step-k messages are sent and received.

All-gather (``sizes[r]``: bytes of rank r's block):

- ``ring``: the backend's ring (``dist.all_gather``), n-1 steps; in step k rank i sends
  rank (i-k)'s block to i+1. With unknown sizes a ring of 8-byte size headers runs
  first and every block is padded to the largest.
- ``doubling`` (recursive doubling, n a power of two): in round k rank r exchanges with
  r XOR 2^k every block of its aligned group of 2^k ranks.
- ``bruck`` (any n): in round k rank r sends to r - 2^k the blocks of ranks
  r, r+1, ..., r + min(2^k, n - 2^k) - 1 (mod n), which it holds after round k-1.

No log-depth round copies blocks. With known, unchecked sizes (``check=False``) a transfer
is one message: its blocks lie side by side in the rank's output buffer (in rank order for
doubling, rotated by the rank for Bruck). With unknown sizes (or checked ones, ``check=True``)
each non-empty block is a message of its own, led by a header message of one wire header per
block the transfer carries (`ccomm.header`, ``HEADER_BYTES`` each: codec, dtypes, shape and
bytes, not only the size), in the same step when ``pipelined`` (the sender posts header and
blocks together), else in a step of its own (backends such as NCCL, whose grouped sends
cannot wait for the receiver to post receives of sizes it learns from the header).

All-reduce (S = the buffer's bytes):

- ``ring``: the backend's ring, 2(n-1) steps of S/n.
- ``doubling``: recursive doubling on the largest power of two p <= n; with n > p, ranks
  p..n-1 first send their buffer to rank r - p and get the result back in a last step.
- ``tree``: the heap-ordered binary tree (children of i: 2i+1, 2i+2) reduces to rank 0
  and broadcasts back; ``chunks`` pipelines it (the cost model's variant; `ccomm.comm`
  runs ``chunks=1``).

`alpha_beta_time` times a schedule on a uniform link (latency L, bandwidth B, one uplink
and one downlink per rank): every step costs L plus its busiest uplink or downlink's bytes
over B. `choose` picks ring or log-depth from it (`ccomm.comm`'s ``algo="auto"``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from .header import HEADER_BYTES as _WIRE_HEADER_BYTES

__all__ = [
    "ALGOS",
    "HEADER_BYTES",
    "LOG_DEPTH",
    "ROUND_OVERHEAD_S",
    "Message",
    "Schedule",
    "Step",
    "Transfer",
    "allgather_rounds",
    "allgather_schedule",
    "allreduce_rounds",
    "allreduce_schedule",
    "alpha_beta_time",
    "choose",
    "cost_terms",
    "received",
    "tree_depth",
]

Message = tuple[int, int, float]
Step = list[Message]
Schedule = list[Step]

#: Algorithms per op; "ring" is the backend's own collective.
ALGOS: dict[str, tuple[str, ...]] = {
    "allgather": ("ring", "doubling", "bruck"),
    "allreduce": ("ring", "doubling", "tree"),
}
#: The log-depth algorithms `ccomm.comm` runs over point-to-point messages.
LOG_DEPTH: dict[str, tuple[str, ...]] = {op: algos[1:] for op, algos in ALGOS.items()}
#: One wire header (`ccomm.header`) per block in a log-depth round's header message, and
#: per rank in the ring's header gather.
HEADER_BYTES = _WIRE_HEADER_BYTES
#: Software cost of one log-depth round that the network model does not see (a thread hop
#: and a few Python-level torch.distributed calls on a CPU host), assumed by `choose`.
ROUND_OVERHEAD_S = 2e-4


@dataclass(frozen=True)
class Transfer:
    """One sender-receiver pair of a round: the blocks (all-gather) src sends to dst."""

    src: int
    dst: int
    blocks: tuple[int, ...] = ()


def _check(op: str, algo: str, n: int) -> None:
    if algo not in ALGOS[op]:
        raise ValueError(f"algo={algo!r} must be one of {ALGOS[op]} for {op}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1")
    if op == "allgather" and algo == "doubling" and n & (n - 1):
        raise ValueError(f"algo='doubling' all-gather needs a power-of-two n, got n={n}; use 'bruck'")


def tree_depth(n: int) -> int:
    """Depth of the heap-ordered binary tree on n ranks: floor(log2 n)."""
    return max(0, n.bit_length() - 1)


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


# ---------------------------------------------------------------------------- all-gather
def allgather_rounds(algo: str, n: int) -> list[list[Transfer]]:
    """Per round, every ``Transfer`` of the all-gather (see the module docstring)."""
    _check("allgather", algo, n)
    if algo == "ring":
        return [[Transfer(i, (i + 1) % n, ((i - k) % n,)) for i in range(n)] for k in range(n - 1)]
    if algo == "doubling":
        rounds = []
        for k in range(_ceil_log2(n)):
            d = 1 << k
            rounds.append([Transfer(r, r ^ d, tuple(range(r & ~(d - 1), (r & ~(d - 1)) + d))) for r in range(n)])
        return rounds
    rounds = []
    for k in range(_ceil_log2(n)):
        d = 1 << k
        cnt = min(d, n - d)
        rounds.append([Transfer(r, (r - d) % n, tuple((r + j) % n for j in range(cnt))) for r in range(n)])
    return rounds


def allgather_schedule(
    algo: str, n: int, sizes: Sequence[float], *, sizes_known: bool = True, pipelined: bool = True
) -> Schedule:
    """Messages of `ccomm.comm.allgather_payloads` with ``algo`` when rank r's block is ``sizes[r]`` bytes.

    ``sizes_known=False`` adds what the call does to learn the sizes (``same_size=False``).
    """
    _check("allgather", algo, n)
    if len(sizes) != n or any(not (math.isfinite(s) and s >= 0) for s in sizes):
        raise ValueError(f"sizes must hold n={n} finite values >= 0, got {list(sizes)}")
    if n == 1:
        return []
    rounds = allgather_rounds(algo, n)
    if algo == "ring":
        if sizes_known:
            return [[(t.src, t.dst, float(sizes[t.blocks[0]])) for t in rnd] for rnd in rounds]
        top = float(max(sizes))
        return [[(t.src, t.dst, float(HEADER_BYTES)) for t in rnd] for rnd in rounds] + [
            [(t.src, t.dst, top) for t in rnd] for rnd in rounds
        ]
    out: Schedule = []
    for rnd in rounds:
        if sizes_known:
            out.append([(t.src, t.dst, float(sum(sizes[b] for b in t.blocks))) for t in rnd
                        if sum(sizes[b] for b in t.blocks) > 0])
            continue
        heads = [(t.src, t.dst, float(HEADER_BYTES * len(t.blocks))) for t in rnd]
        data = [(t.src, t.dst, float(sizes[b])) for t in rnd for b in t.blocks if sizes[b] > 0]
        if not pipelined:
            out += [heads, data]
        else:
            out.append(heads + data)
    return out


# ---------------------------------------------------------------------------- all-reduce
def allreduce_rounds(algo: str, n: int, chunks: int = 1) -> list[tuple[str, list[Transfer]]]:
    """Per round, ``(action, transfers)``: the receiver adds ("add") or copies ("copy") the buffer.

    Not for ``ring`` (the backend's chunked ring is described by `allreduce_schedule` only).
    ``chunks=k`` pipelines the tree (each round then moves 1/k of the buffer; cost model
    only); doubling ignores it.
    """
    _check("allreduce", algo, n)
    if algo == "ring":
        raise ValueError("allreduce_rounds: the ring is the backend's; use allreduce_schedule")
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks={chunks!r} must be an integer >= 1")
    if n == 1:
        return []
    if algo == "doubling":
        p = 1 << tree_depth(n)
        core = [("add", [Transfer(r, r ^ (1 << k)) for r in range(p)]) for k in range(tree_depth(p))]
        if p == n:
            return core
        pre = ("add", [Transfer(r, r - p) for r in range(p, n)])
        post = ("copy", [Transfer(r - p, r) for r in range(p, n)])
        return [pre, *core, post]
    depth = tree_depth(n)
    up: list[list[Transfer]] = [[] for _ in range(depth + chunks - 1)]
    down: list[list[Transfer]] = [[] for _ in range(depth + chunks - 1)]
    for v in range(1, n):
        dv = tree_depth(v + 1)  # depth of node v in the heap tree
        for m in range(chunks):
            up[(depth - dv) + m].append(Transfer(v, (v - 1) // 2))
            down[(dv - 1) + m].append(Transfer((v - 1) // 2, v))
    return [("add", t) for t in up] + [("copy", t) for t in down]


def allreduce_schedule(algo: str, n: int, nbytes: float, *, chunks: int = 1) -> Schedule:
    """Messages of `ccomm.comm.allreduce_payload` with ``algo`` on an ``nbytes`` buffer.

    ``chunks`` pipelines the tree (cost model only); the other algorithms ignore it."""
    _check("allreduce", algo, n)
    if not (math.isfinite(nbytes) and nbytes >= 0):
        raise ValueError(f"nbytes={nbytes!r} must be finite and >= 0")
    if n == 1:
        return []
    if algo == "ring":
        part = float(nbytes) / n
        return [[(i, (i + 1) % n, part) for i in range(n)] for _ in range(2 * (n - 1))]
    size = float(nbytes) / (chunks if algo == "tree" else 1)
    return [[(t.src, t.dst, size) for t in rnd] for _, rnd in allreduce_rounds(algo, n, chunks)]


# ---------------------------------------------------------------------------- evaluation
def received(steps: Schedule, rank: int = 0) -> float:
    """Bytes ``rank`` receives over the whole schedule."""
    return float(sum(b for step in steps for (_s, d, b) in step if d == rank))


def cost_terms(steps: Schedule) -> tuple[float, int]:
    """``(V, hops)`` of a schedule: the time on a uniform link is ``hops * L + V / B``.

    hops = the non-empty steps (each costs one latency); V = the bytes of each step's
    busiest uplink or downlink, summed over steps: what one rank receives on a ring
    (all-reduce 2(n-1)/n S, all-gather (n-1) S) and in recursive doubling and Bruck.
    """
    nbytes, hops = 0.0, 0
    for step in steps:
        if not step:
            continue
        load: dict[tuple[str, int], float] = defaultdict(float)
        for s, d, b in step:
            load[("up", s)] += b
            load[("down", d)] += b
        nbytes += max(load.values())
        hops += 1
    return nbytes, hops


def alpha_beta_time(steps: Schedule, latency_s: float, bandwidth_Bps: float) -> float:
    """Seconds of ``steps`` on a uniform link: per non-empty step, L + busiest up/downlink bytes / B.

    Equal to ``netsim.model.cost.schedule_time`` on a constant-rate, shared-link topology.
    """
    if not (math.isfinite(latency_s) and latency_s >= 0):
        raise ValueError(f"latency_s={latency_s!r} must be finite and >= 0")
    if not (bandwidth_Bps > 0):
        raise ValueError(f"bandwidth_Bps={bandwidth_Bps!r} must be > 0")
    nbytes, hops = cost_terms(steps)
    return hops * latency_s + nbytes / bandwidth_Bps


def choose(
    op: str,
    n: int,
    nbytes: float,
    latency_s: float,
    bandwidth_Bps: float,
    *,
    sizes_known: bool = True,
    min_gain: float = 0.05,
    overhead_s: float = ROUND_OVERHEAD_S,
) -> str:
    """The algorithm ``algo="auto"`` runs: ring unless log-depth is predicted faster by ``min_gain``.

    1. n <= 2 with known sizes: ring (every algorithm is then one exchange; the backend's
       own collective has the least overhead).
    2. All-gather with unknown sizes: log-depth, without looking at ``nbytes`` (only this
       rank's size is known here, and every rank must choose alike). It is never slower
       in the model: ceil(log2 n) latencies against the ring's 2(n-1) (size ring + data
       ring), and no padding.
    3. Otherwise the alpha-beta times of ring and of the cheaper log-depth algorithm
       (each rank's buffer of ``nbytes``), the latter plus ``overhead_s`` per round (the
       Python-level rounds cost more than the backend's native ring steps); log-depth if
       at most (1 - min_gain) x ring. The margin keeps the backend's ring where the model
       sees no real gain.
    """
    if op not in ALGOS:
        raise ValueError(f"op={op!r} must be one of {sorted(ALGOS)}")
    if not (0.0 <= min_gain < 1.0):
        raise ValueError(f"min_gain={min_gain!r} must be in [0, 1)")
    if not (math.isfinite(overhead_s) and overhead_s >= 0):
        raise ValueError(f"overhead_s={overhead_s!r} must be finite and >= 0")
    if not sizes_known and op != "allgather":
        raise ValueError("sizes_known=False is only meaningful for allgather")
    pow2 = n & (n - 1) == 0
    if op == "allgather":
        candidates = ["doubling" if pow2 else "bruck"]
    else:
        candidates = ["doubling", "tree"]
    if n <= 2 and sizes_known:
        return "ring"
    if op == "allgather" and not sizes_known:
        return candidates[0]

    def t(algo: str) -> float:
        if op == "allgather":
            steps = allgather_schedule(algo, n, [float(nbytes)] * n)
        else:
            steps = allreduce_schedule(algo, n, float(nbytes))
        extra = 0.0 if algo == "ring" else overhead_s * cost_terms(steps)[1]
        return alpha_beta_time(steps, latency_s, bandwidth_Bps) + extra

    best = min(candidates, key=t)  # ties keep the first (doubling)
    return best if t(best) <= (1.0 - min_gain) * t("ring") else "ring"
