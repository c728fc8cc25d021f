"""Attention over K/V exchanged between ranks: block attention, LSE merge and the three modes.

Layout everywhere: q, k, v are (batch, local_seq, heads, head_dim); every rank holds the
queries and K/V of its own contiguous token chunk. Joint (text) K/V, when given, are
replicated on every rank, never exchanged, and prepended to the rank's own block
("front" strategy).

Public entry points (all take the same keyword arguments and return the attention output
for the local queries, in q's dtype and layout):
- `ring_attention(q, k, v, *, state, layer, branch=0, group=None, joint_k=None, joint_v=None, scale=None)`:
  sequence-parallel ring (spec 3.1). Algorithm:
    1. encode own K and V once (`state.send`: raw, or through the ResidualCodec, the own
       base update deferred);
    2. for s = 0..P-1: post the next hop (send the current payload to rank+1 unchanged,
       receive the next one from rank-1, sizes from mirrored state) BEFORE computing
       this block; after the first post, apply the deferred own-base update while the
       bytes travel; block s is the exact own K/V (plus joint K/V) for s = 0, otherwise
       the decoded reconstruction of source (rank - s) mod P;
    3. `block_attention` per block, `merge`d in fp32 by log-sum-exp;
    4. after the last hop, raise FloatingPointError if any tensor was non-finite.
- `patch_attention(...)`: synchronous all-gather (spec 3.2); one attention over
  [joint, source 0, ..., source P-1]; the own slot holds the reconstruction peers hold
  (exact with `patch_exact_local=True`).
- `distrifusion_attention(...)`: displaced patch parallel (spec 3.3): synchronous for steps
  < warmup_steps; afterwards the K/V gathered asynchronously during the previous step
  (stale) for peers plus fresh own K/V, then launches this step's gather.
- `parallel_attention(mode, ...)` dispatches on a mode name.
The caller counts forward calls with `state.begin_forward()`; `state.step` is the step.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

from ccomm.comm import allgather_payloads, send_recv
from ccomm.payload import Payload, PayloadMeta

from .errors import CompactStateError
from .state import CompactState, KVKey

__all__ = [
    "block_attention",
    "block_attention_reference",
    "merge",
    "ring_attention",
    "patch_attention",
    "distrifusion_attention",
    "parallel_attention",
    "full_attention",
]

logger = logging.getLogger(__name__)

#: torch's CPU flash-attention op (returns output and log-sum-exp); None if this build lacks it.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over one K/V block, in fp32.

    Returns (out, lse): out (B, Sq, H, D) fp32 normalized within the block, lse (B, H, Sq)
    fp32 = log sum_k exp(scale * q.k). On CPU, torch's fused flash kernel (which returns the
    log-sum-exp) is used, about 15x faster than the reference at 256 x 512 tokens; other
    devices use `block_attention_reference`.
    """
    qf, kf, vf = q.float(), k.float(), v.float()
    if qf.device.type == "cpu" and _CPU_FLASH is not None:
        out, lse = _CPU_FLASH(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2), 0.0, False, scale=scale)[:2]
        return out.transpose(1, 2), lse
    return block_attention_reference(qf, kf, vf, scale)


def block_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_attention` by explicit scores (any device): lse = logsumexp(s), out = softmax(s) v."""
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", p, vf), lse


def merge(out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmax results: L = logaddexp(lse, lse_s); out = out e^{lse-L} + o_s e^{lse_s-L}."""
    if out is None or lse is None:
        return block_out, block_lse
    new = torch.logaddexp(lse, block_lse)
    a = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)  # (B, Sq, H, 1)
    b = torch.exp(block_lse - new).transpose(1, 2).unsqueeze(-1)
    return out * a + block_out * b, new


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain SDPA in the (B, S, H, D) layout, in q's dtype (what the stock processors do)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0,
                                         is_causal=False, scale=scale)
    return out.transpose(1, 2)


def _debug_sizes() -> bool:
    return os.environ.get("CCOMM_DEBUG_SIZES", "") == "1"


def _front(joint: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if joint is None else torch.cat([joint, x], dim=1)


def _group_info(state: CompactState, group: Any) -> tuple[Any, int, int]:
    import torch.distributed as dist

    g = state.group if group is None else group
    if not dist.is_initialized():
        return g, 0, 1
    return g, dist.get_rank(g), dist.get_world_size(g)


def _encode_own(state: CompactState, layer: int, branch: int, rank: int, k: torch.Tensor, v: torch.Tensor,
                comp: bool) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Own K|V payload bytes, the byte length of its K part, and the wire-dtype (N, C) tensors.

    The own base updates are deferred: the caller posts the payload, then `state.settle()`.
    """
    b, s, h, d = k.shape
    wire = state.wire(k.dtype)
    kw, vw = k.reshape(b * s, h * d).to(wire), v.reshape(b * s, h * d).to(wire)
    key_k = KVKey(layer, rank, "k", branch)
    # Peers' keys of this layer have the use count own key has before its encode.
    nk = state.recv_nbytes(key_k, kw.shape, wire, comp)
    dk = state.send(key_k, kw, comp, defer=True)
    dv = state.send(KVKey(layer, rank, "v", branch), vw, comp, defer=True)
    return torch.cat([dk, dv]), nk, kw, vw


def _decode_pair(state: CompactState, layer: int, branch: int, src: int, data: torch.Tensor, nk: int,
                 like: torch.Tensor, comp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, h, d = like.shape
    wire = state.wire(like.dtype)
    shape = (b * s, h * d)
    rk = state.receive(KVKey(layer, src, "k", branch), data[:nk], shape, wire, comp)
    rv = state.receive(KVKey(layer, src, "v", branch), data[nk:], shape, wire, comp)
    return rk.reshape(b, s, h, d).to(like.dtype), rv.reshape(b, s, h, d).to(like.dtype)


def _payload(data: torch.Tensor) -> Payload:
    return Payload(data, PayloadMeta(data.shape, data.dtype))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q, k, v: expected (batch, seq, heads, head_dim) layouts, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, state: CompactState, layer: int,
                   branch: int = 0, group: Any = None, joint_k: torch.Tensor | None = None,
                   joint_v: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Sequence-parallel ring attention with compressed, relayed K/V (see module docstring)."""
    _check(q, k, v)
    g, rank, world = _group_info(state, group)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state.observe(layer, branch, k.shape, k.dtype, k.device)
    comp = state.is_compressed(layer)
    b, s_loc, h, d = k.shape
    shape, wire = (b * s_loc, h * d), state.wire(k.dtype)
    out = lse = None
    if world == 1:
        out, lse = block_attention(q, _front(joint_k, k), _front(joint_v, v), scale)
        return out.to(q.dtype)
    cur, _, _, _ = _encode_own(state, layer, branch, rank, k, v, comp)
    src, nk_cur = rank, 0
    for s in range(world):
        handle = None
        if s < world - 1:
            nsrc = (src - 1) % world
            nk = state.recv_nbytes(KVKey(layer, nsrc, "k", branch), shape, wire, comp)
            nv = state.recv_nbytes(KVKey(layer, nsrc, "v", branch), shape, wire, comp)
            # CCOMM_DEBUG_SIZES=1: let the transport exchange sizes and compare them below.
            # The peer's wire header must announce nk + nv bytes (checked with the data, on
            # CPU in the same step: no extra latency).
            handle = send_recv(_payload(cur), (rank + 1) % world, (rank - 1) % world, g,
                               recv_nbytes=None if _debug_sizes() else nk + nv, recv_dtype=torch.uint8,
                               meta=PayloadMeta(torch.Size([nk + nv]), torch.uint8),
                               async_op=True, key="kv_ring", stats=state.stats)
        if s == 0:  # exact own K/V, with the replicated text in front
            state.settle()  # own base updates overlap the first hop
            ks, vs = _front(joint_k, k), _front(joint_v, v)
        else:
            ks, vs = _decode_pair(state, layer, branch, src, cur, nk_cur, k, comp)
        # Looked up through the module so tests can spy on the blocks.
        bo, bl = globals()["block_attention"](q, ks, vs, scale)
        out, lse = merge(out, lse, bo, bl)
        if handle is not None:
            cur, src, nk_cur = handle.wait().buffer, nsrc, nk
            if cur.numel() != nk + nv:
                raise CompactStateError(f"layer {layer} step {state.step}: rank {(rank - 1) % world} sent "
                                        f"{cur.numel()} bytes, mirrored state expects {nk + nv}")
    state.raise_nonfinite(layer)
    assert out is not None
    return out.to(q.dtype)


def _gather_sync(state: CompactState, layer: int, branch: int, g: Any, rank: int, world: int, k: torch.Tensor,
                 v: torch.Tensor, comp: bool, exact_own: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Synchronous all-gather of every source's K/V, decoded, in rank order (model dtype)."""
    data, nk, kw, vw = _encode_own(state, layer, branch, rank, k, v, comp)
    # Patch mode: ring or log-depth rounds, whichever the cost model says is faster (the
    # ring mode above stays a ring of send_recv steps by design).
    handle = allgather_payloads(_payload(data), g, same_size=True, algo="auto", async_op=True, key="kv_gather",
                                stats=state.stats, check=state.wire_check(layer, branch))
    state.settle()  # own base updates overlap the gather
    got = handle.wait()
    ks: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    for src, p in enumerate(got):  # type: ignore[union-attr]
        if src == rank:
            if exact_own:
                ks.append(k)
                vs.append(v)
            else:
                ks.append(state.own_reconstruction(KVKey(layer, rank, "k", branch), kw, comp).reshape(k.shape).to(k.dtype))
                vs.append(state.own_reconstruction(KVKey(layer, rank, "v", branch), vw, comp).reshape(v.shape).to(v.dtype))
        else:
            rk, rv = _decode_pair(state, layer, branch, src, p.buffer, nk, k, comp)
            ks.append(rk)
            vs.append(rv)
    return ks, vs


def patch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, state: CompactState, layer: int,
                    branch: int = 0, group: Any = None, joint_k: torch.Tensor | None = None,
                    joint_v: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Synchronous all-gather patch parallelism (see module docstring)."""
    _check(q, k, v)
    g, rank, world = _group_info(state, group)
    state.observe(layer, branch, k.shape, k.dtype, k.device)
    if world == 1:
        return full_attention(q, _front(joint_k, k), _front(joint_v, v), scale)
    comp = state.is_compressed(layer)
    ks, vs = _gather_sync(state, layer, branch, g, rank, world, k, v, comp, state.config.patch_exact_local)
    state.raise_nonfinite(layer)
    return full_attention(q, _front(joint_k, torch.cat(ks, dim=1)), _front(joint_v, torch.cat(vs, dim=1)), scale)


def distrifusion_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, state: CompactState, layer: int,
                           branch: int = 0, group: Any = None, joint_k: torch.Tensor | None = None,
                           joint_v: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Displaced patch parallelism with one-step-stale peer K/V (see module docstring)."""
    _check(q, k, v)
    g, rank, world = _group_info(state, group)
    state.observe(layer, branch, k.shape, k.dtype, k.device)
    if world == 1:
        return full_attention(q, _front(joint_k, k), _front(joint_v, v), scale)
    comp = state.is_compressed(layer)
    slot = (layer, branch)
    warm = state.step < state.config.warmup_steps
    if warm or slot not in state.stale and slot not in state.pending:
        ks, vs = _gather_sync(state, layer, branch, g, rank, world, k, v, comp, exact_own=False)
        if state.step + 1 >= state.config.warmup_steps:  # the next step reads these as stale
            state.stale[slot] = (ks, vs)
        state.raise_nonfinite(layer)
        return full_attention(q, _front(joint_k, torch.cat(ks, dim=1)), _front(joint_v, torch.cat(vs, dim=1)), scale)
    # 1. stale peers (waits for the gather launched last step), fresh own K/V
    ks, vs = state.take_stale(slot)
    ks = [k if i == rank else t for i, t in enumerate(ks)]
    vs = [v if i == rank else t for i, t in enumerate(vs)]
    out = full_attention(q, _front(joint_k, torch.cat(ks, dim=1)), _front(joint_v, torch.cat(vs, dim=1)), scale)
    # 2. launch this step's gather; decoded when the next step takes it
    data, nk, _, _ = _encode_own(state, layer, branch, rank, k, v, comp)
    handle = allgather_payloads(_payload(data), g, same_size=True, async_op=True, key="kv_gather", stats=state.stats,
                                check=state.wire_check(layer, branch))
    state.settle()

    def finish(payloads: list[Payload], like: torch.Tensor = k) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        rk: list[torch.Tensor] = []
        rv: list[torch.Tensor] = []
        for src, p in enumerate(payloads):
            if src == rank:  # replaced by fresh own K/V when used
                rk.append(like)
                rv.append(like)
            else:
                a, b_ = _decode_pair(state, layer, branch, src, p.buffer, nk, like, comp)
                rk.append(a)
                rv.append(b_)
        state.raise_nonfinite(layer)
        return rk, rv

    state.put_pending(slot, handle, finish)
    state.raise_nonfinite(layer)
    return out


_MODES = {"ring": ring_attention, "patch": patch_attention, "distrifusion": distrifusion_attention}


def parallel_attention(mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Dispatch to `ring_attention`, `patch_attention` or `distrifusion_attention`."""
    try:
        fn = _MODES[mode]
    except KeyError:
        raise ValueError(f"mode={mode!r}: allowed values are {', '.join(_MODES)}") from None
    return fn(q, k, v, **kwargs)
