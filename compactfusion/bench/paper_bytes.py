"""Wire bytes measured at the paper's activation shape (FLUX.1 1024², docs/design/compactfusion.md#paper-setting).

The codecs' scale overhead is ``(N + C)`` values per tensor, so the tiny model's 128
channels cap ``binary`` at 14.2x where FLUX's 3072 channels give 15.7x. This measures the
bytes at FLUX's shape through the real exchange instead of quoting the formula:

1. on each of the P benchmark ranks, a :class:`~compactfusion.state.CompactState` per method
   runs :func:`~compactfusion.attention.ring_attention` for one layer whose own K and V are
   ``(1, 4096 / P, 24, 128)`` in fp16 (:class:`~.project.FluxSetting` split over P ranks); the query is a
   single token, since the bytes exchanged do not depend on the query length and a full
   4096-token attention would take seconds per layer on a CPU;
2. ``CALLS`` consecutive calls with slowly drifting K/V (a fixed-size codec's payload does not
   depend on the values), W = 1: the first call sends raw tensors, the others compressed;
3. bytes per call are the ``kv_ring`` payload counters of the handle's ``ccomm.stats`` (what
   was handed to ``torch.distributed`` as payload; the 120-byte wire header of each hop,
   `ccomm.header`, is counted apart as header bytes), and the compression ratio is uncompressed ring
   bytes over compressed bytes per call, beside the codec's ``nbytes`` formula.
"""
from __future__ import annotations

import statistics
from typing import Any

import torch

from .methods import METHODS
from .project import FluxSetting, codec_nbytes

__all__ = ["CALLS", "job_paper_bytes", "summarize_paper_bytes"]


#: Calls per method: the first sends raw tensors (W = 1), the others compressed payloads.
CALLS = 3


def job_paper_bytes(ctx: Any, methods: list[str], setting: FluxSetting, seed: int) -> dict[str, list[int]]:
    """Bytes this rank sent per call for each ring method (see the module docstring)."""
    from compactfusion import CompactConfig
    from compactfusion.attention import ring_attention
    from compactfusion.state import CompactState

    g = torch.Generator().manual_seed(seed + ctx.rank)
    head_dim = setting.channels // setting.heads
    kv_shape = (setting.batch, setting.image_tokens // ctx.n, setting.heads, head_dim)
    q = torch.randn(setting.batch, 1, setting.heads, head_dim, generator=g).half()
    k0, v0 = torch.randn(kv_shape, generator=g).half(), torch.randn(kv_shape, generator=g).half()
    out: dict[str, list[int]] = {}
    for name in methods:
        m = METHODS[name]
        cfg = CompactConfig(mode="ring", codec=m.codec, raw_steps=1, wire_dtype="fp16", seed=seed)
        state = CompactState(cfg, None)
        k, v, per_call = k0, v0, []
        with torch.inference_mode():
            for _ in range(CALLS):
                before = state.stats.get("kv_ring").payload_bytes
                state.begin_forward()
                ring_attention(q, k, v, state=state, layer=0)
                per_call.append(state.stats.get("kv_ring").payload_bytes - before)
                k = k + 0.05 * torch.randn(kv_shape, generator=g).half()
                v = v + 0.05 * torch.randn(kv_shape, generator=g).half()
        state.close()
        out[name] = per_call
    return out


def summarize_paper_bytes(per_rank: list[dict[str, list[int]]], setting: FluxSetting, ranks: int) -> dict[str, Any]:
    """Ratios per method from every rank's per-call bytes (mean over ranks)."""
    rows, channels, request_steps = setting.rows_at(ranks), setting.channels, setting.steps
    mean = {n: [statistics.mean(r[n][i] for r in per_rank) for i in range(CALLS)] for n in per_rank[0]}
    ref = mean.get("ring")
    res: dict[str, Any] = {"ranks": ranks, "rows": rows, "channels": channels, "calls": CALLS,
                           "dtype": "fp16", "methods": {}}
    for name, calls in mean.items():
        entry: dict[str, Any] = {"bytes_per_call": calls}
        m = METHODS[name]
        if m.compressed and ref is not None and calls[-1]:
            comp = statistics.mean(calls[1:])
            entry["compression_ratio_steps"] = statistics.mean(ref[1:]) / comp
            # A request of `request_steps` steps: one raw step (W = 1), the rest compressed.
            entry["compression_ratio"] = request_steps * ref[0] / (calls[0] + (request_steps - 1) * comp)
            entry["compression_ratio_formula"] = 2.0 * rows * channels / codec_nbytes(m.codec, rows, channels)
        res["methods"][name] = entry
    return res
