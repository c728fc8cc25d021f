"""Attention over K/V exchanged between ranks: block attention, LSE merge and the three modes.

Layout everywhere: q, k, v are (batch, local_seq, heads, head_dim); every rank holds the
queries and K/V of its own contiguous token chunk. Joint (text) K/V, when given, are
replicated on every rank, never exchanged, and prepended to the rank's own block
("front" strategy).

Public entry points (all take the same keyword arguments and return the attention output
for the local queries, in q's dtype and layout):
- `ring_attention(q, k, v, *, state, layer, branch=0, group=None, joint_k=None, joint_v=None, scale=None)`:
  sequence-parallel ring (spec 3.1). Algorithm:
    1. encode own K and V once, as one (2, N, C) stack and one payload (`state.send`: raw,
       or through the ResidualCodec with per-tensor scales, the own base update deferred);
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
  < raw_steps; afterwards the K/V gathered asynchronously during the previous step
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
    "select_kernel",
    "KERNELS",
    "merge",
    "ring_attention",
    "patch_attention",
    "distrifusion_attention",
    "parallel_attention",
    "full_attention",
]

logger = logging.getLogger(__name__)

#: torch's fused attention ops that also return the log-sum-exp (None if this build lacks one).
#: Looked up through the module at call time, so tests can stand in for the CUDA ones on CPU.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CUDA_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
_CUDA_EFFICIENT = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)

#: Kernel names `select_kernel` returns.
KERNELS = ("cpu_flash", "cuda_flash", "cuda_efficient", "reference")
#: (kernel, device type, dtype, head_dim) that raised once: process-wide facts about the
#: hardware/build, so later calls go straight to the reference instead of raising again.
_FAILED: set[tuple[str, str, torch.dtype, int]] = set()


def select_kernel(device_type: str, dtype: torch.dtype, head_dim: int, *,
                  capability: tuple[int, int] | None = None) -> str:
    """The kernel `block_attention` runs for inputs on `device_type` in `dtype` with `head_dim`.

    1. CPU: torch's fused flash kernel for CPU ("cpu_flash", computed in fp32) when present.
    2. CUDA (`capability` = compute capability; queried when None), in the input dtype:
       - "cuda_flash" (`_scaled_dot_product_flash_attention`): fp16/bf16, head_dim a multiple of
         8 and at most 256, sm80 or newer, torch's flash SDP switch on;
       - else "cuda_efficient" (`_scaled_dot_product_efficient_attention`, also fp32): head_dim
         a multiple of 16 bytes' worth of elements (8 for fp16/bf16, 4 for fp32), sm50 or newer,
         the memory-efficient SDP switch on.
    3. Anything else (other devices, dtypes, head sizes): "reference" (explicit fp32 scores).
    A fused kernel that raises at run time falls back to the reference (see `block_attention`).
    """
    if device_type == "cpu":
        return "cpu_flash" if _CPU_FLASH is not None else "reference"
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16, torch.float32) or head_dim <= 0:
        return "reference"
    if capability is None:
        capability = torch.cuda.get_device_capability()
    half = dtype != torch.float32
    if (half and _CUDA_FLASH is not None and head_dim % 8 == 0 and head_dim <= 256 and capability >= (8, 0)
            and torch.backends.cuda.flash_sdp_enabled()):
        return "cuda_flash"
    if (_CUDA_EFFICIENT is not None and head_dim % (8 if half else 4) == 0 and capability >= (5, 0)
            and torch.backends.cuda.mem_efficient_sdp_enabled()):
        return "cuda_efficient"
    return "reference"


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    qf, kf, vf = q.float(), k.float(), v.float()
    out, lse = _CPU_FLASH(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2), 0.0, False, scale=scale)[:2]
    return out.transpose(1, 2), lse


def _cuda_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # (query, key, value, dropout_p, is_causal, return_debug_mask, *, scale) -> (output, logsumexp, ...)
    out, lse = _CUDA_FLASH(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=scale)[:2]
    return out.transpose(1, 2).float(), lse.float()


def _cuda_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # (query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, *, scale) -> (output, log_sumexp, ...);
    # log_sumexp is (B, H, ceil(Sq / 32) * 32): rows past Sq are padding.
    out, lse = _CUDA_EFFICIENT(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False,
                               scale=scale)[:2]
    return out.transpose(1, 2).float(), lse[..., : q.shape[1]].float()


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over one K/V block.

    Returns (out, lse): out (B, Sq, H, D) fp32 normalized within the block, lse (B, H, Sq)
    fp32 = log sum_k exp(scale * q.k); `merge` combines blocks in fp32. The kernel is
    `select_kernel(device, dtype, head_dim)`: torch's fused kernels that return the
    log-sum-exp (CPU flash, in fp32, about 15x faster than the reference at 256 x 512 tokens;
    CUDA flash or memory-efficient, in the input dtype), `block_attention_reference`
    otherwise. A fused kernel that raises (an unsupported GPU or build) is logged once and
    replaced by the reference for that device, dtype and head size from then on.
    """
    d = q.shape[-1]
    name = select_kernel(q.device.type, q.dtype, d)
    if name == "reference" or (name, q.device.type, q.dtype, d) in _FAILED:
        return block_attention_reference(q, k, v, scale)
    try:
        return _RUN[name](q, k, v, scale)
    except RuntimeError as exc:
        _FAILED.add((name, q.device.type, q.dtype, d))
        logger.warning("compactfusion: %s attention failed on %s %s head_dim %d (%s); using the reference path",
                       name, q.device, q.dtype, d, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return block_attention_reference(q, k, v, scale)


def block_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_attention` by explicit scores (any device): lse = logsumexp(s), out = softmax(s) v."""
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", p, vf), lse


#: Kernel name -> implementation (the fused ones look their aten op up at call time).
_RUN = {"cpu_flash": _cpu_flash, "cuda_flash": _cuda_flash, "cuda_efficient": _cuda_efficient}


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
                comp: bool) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Own payload bytes of the layer's (K, V) stack, its byte length, and the (2, N, C) wire-dtype stack.

    K and V travel as one stack (`ccomm.codecs.Stacked`: per-tensor scales, one encode and
    one decode). The own base update is deferred: the caller posts the payload, then
    `state.settle()`.
    """
    b, s, h, d = k.shape
    x = torch.empty(2, b * s, h * d, dtype=state.wire(k.dtype), device=k.device)
    x[0].copy_(k.reshape(b * s, h * d))
    x[1].copy_(v.reshape(b * s, h * d))
    key = KVKey(layer, rank, "kv", branch)
    # Peers' keys of this layer have the use count the own key has before its encode.
    n = state.recv_nbytes(key, x.shape, x.dtype, comp)
    return state.send(key, x, comp, defer=True), n, x


def _decode_pair(state: CompactState, layer: int, branch: int, src: int, data: torch.Tensor,
                 like: torch.Tensor, comp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of source `src` from its payload bytes, in `like`'s layout and dtype."""
    b, s, h, d = like.shape
    r = state.receive(KVKey(layer, src, "kv", branch), data, (2, b * s, h * d), state.wire(like.dtype), comp)
    return r[0].reshape(b, s, h, d).to(like.dtype), r[1].reshape(b, s, h, d).to(like.dtype)


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
    cur, _, _ = _encode_own(state, layer, branch, rank, k, v, comp)
    src = rank
    for s in range(world):
        handle = None
        if s < world - 1:
            nsrc = (src - 1) % world
            n = state.recv_nbytes(KVKey(layer, nsrc, "kv", branch), (2,) + shape, wire, comp)
            # CCOMM_DEBUG_SIZES=1: let the transport exchange sizes and compare them below.
            # The peer's wire header must announce n bytes (checked with the data, on
            # CPU in the same step: no extra latency).
            handle = send_recv(_payload(cur), (rank + 1) % world, (rank - 1) % world, g,
                               recv_nbytes=None if _debug_sizes() else n, recv_dtype=torch.uint8,
                               meta=PayloadMeta(torch.Size([n]), torch.uint8),
                               async_op=True, key="kv_ring", stats=state.stats)
        if s == 0:  # exact own K/V, with the replicated text in front
            state.settle()  # own base updates overlap the first hop
            ks, vs = _front(joint_k, k), _front(joint_v, v)
        else:
            ks, vs = _decode_pair(state, layer, branch, src, cur, k, comp)
        # Looked up through the module so tests can spy on the blocks.
        bo, bl = globals()["block_attention"](q, ks, vs, scale)
        out, lse = merge(out, lse, bo, bl)
        if handle is not None:
            cur, src = handle.wait().buffer, nsrc
            if cur.numel() != n:
                raise CompactStateError(f"layer {layer} step {state.step}: rank {(rank - 1) % world} sent "
                                        f"{cur.numel()} bytes, mirrored state expects {n}")
    state.raise_nonfinite(layer)
    assert out is not None
    return out.to(q.dtype)


def _gather_sync(state: CompactState, layer: int, branch: int, g: Any, rank: int, world: int, k: torch.Tensor,
                 v: torch.Tensor, comp: bool, exact_own: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Synchronous all-gather of every source's K/V, decoded, in rank order (model dtype)."""
    data, _, x = _encode_own(state, layer, branch, rank, k, v, comp)
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
                own = state.own_reconstruction(KVKey(layer, rank, "kv", branch), x, comp)
                ks.append(own[0].reshape(k.shape).to(k.dtype))
                vs.append(own[1].reshape(v.shape).to(v.dtype))
        else:
            rk, rv = _decode_pair(state, layer, branch, src, p.buffer, k, comp)
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
    warm = state.step < state.config.raw_steps
    if warm or slot not in state.stale and slot not in state.pending:
        ks, vs = _gather_sync(state, layer, branch, g, rank, world, k, v, comp, exact_own=False)
        if state.step + 1 >= state.config.raw_steps:  # the next step reads these as stale
            state.stale[slot] = (ks, vs)
        state.raise_nonfinite(layer)
        return full_attention(q, _front(joint_k, torch.cat(ks, dim=1)), _front(joint_v, torch.cat(vs, dim=1)), scale)
    # 1. stale peers (waits for the gather launched last step), fresh own K/V
    ks, vs = state.take_stale(slot)
    ks = [k if i == rank else t for i, t in enumerate(ks)]
    vs = [v if i == rank else t for i, t in enumerate(vs)]
    out = full_attention(q, _front(joint_k, torch.cat(ks, dim=1)), _front(joint_v, torch.cat(vs, dim=1)), scale)
    # 2. launch this step's gather; decoded when the next step takes it
    data, _, _ = _encode_own(state, layer, branch, rank, k, v, comp)
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
                a, b_ = _decode_pair(state, layer, branch, src, p.buffer, like, comp)
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
