"""`KVKey` and `CompactState`: everything a CompactFusion handle remembers between calls.

A `CompactState` owns, for one process group:
- the `ccomm.ResidualCodec` (None for codec "none") holding the mirrored bases, one per
  `KVKey(layer, source, "kv", branch)`: a layer's K and V travel as one (2, N, C) stack
  through `ccomm.codecs.Stacked` (each tensor keeps its own codec statistics; one encode
  and one decode per layer and source instead of two); own keys are updated on encode, the
  other P-1 sources' keys on decode, in the same order on every rank;
- the forward-call counter (`begin_forward`), from which `step` and `branch` follow;
- per-request byte counters (`stats`, a `ccomm.stats.CommStats`), recorded-error rows,
  distrifusion's in-flight gathers and stale K/V, and the shapes seen per layer.

The attention paths (`compactfusion.attention`) use it through four calls:
1. `observe(layer, branch, shape, dtype, device)`: shape-change detection (error or reset);
2. `send(key, x, compressed, defer=False)`: encode own K or V, return its payload as raw
   bytes; with `defer` the own base update waits for `settle()`, so the caller can post the
   send first and decode its own payload while the bytes travel;
3. `recv_nbytes(key, shape, dtype, compressed)` / `receive(key, data, ...)`: the size of, and
   the reconstruction from, a peer's payload (sizes come from mirrored state, never the wire);
4. `raise_nonfinite(layer)`: after the layer's exchange completed (it settles first), fail
   if any tensor this rank stored or sent was non-finite (nonfinite="raise"); the tensors
   of a layer are checked together, with one host sync.
There is no module-level state: two handles never share anything.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch
import torch.distributed as dist

from ccomm.codecs import Stacked
from ccomm.payload import from_bytes
from ccomm.finite import all_finite
from ccomm.payload import Payload
from ccomm.residual import ConsistencyError, ResidualCodec
from ccomm.stats import CommStats

from .config import CompactConfig
from .errors import BaseMismatchError, CompactStateError

__all__ = ["KVKey", "CompactState"]

logger = logging.getLogger(__name__)

KINDS = ("k", "v", "kv")


@dataclass(frozen=True)
class KVKey:
    """One exchanged tensor: self-attention layer index, producing rank, kind, branch.

    kind "kv" is a layer's (K, V) stack, the unit of exchange; "k" and "v" name its slices
    (in recorded error rows).
    """

    layer: int
    source: int
    kind: str
    branch: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: allowed values are k, v, kv")


class CompactState:
    """Mutable state of one parallelized model (see module docstring)."""

    def __init__(self, config: CompactConfig, group: Any = None, *, stats: CommStats | None = None,
                 num_layers: int | None = None) -> None:
        self.config = config
        self.group = group
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.num_layers = num_layers
        self.rc: ResidualCodec | None = (
            # The config's `nonfinite` policy decides what a non-finite K/V does, after the
            # layer's exchange completed (raise_nonfinite), so the codec must not raise first.
            ResidualCodec(Stacked(config.make_codec()), config.raw_steps, variant=config.variant,
                          allow_nonfinite=True)
            if config.compressed else None
        )
        self._own_stats = stats is None
        self.stats = CommStats() if stats is None else stats
        self.calls = 0
        self._index = 0
        self.errors: list[dict[str, Any]] = []
        self.pending: dict[Hashable, tuple[Any, Callable[[Any], Any]]] = {}
        self.stale: dict[Hashable, Any] = {}
        self._shadow: dict[KVKey, torch.Tensor] = {}
        self._shapes: dict[tuple[int, int], tuple] = {}
        self._bad: list[str] = []
        self._wire_checked: set[tuple[int, int]] = set()
        self._checks: list[tuple[KVKey, torch.Tensor]] = []  # finiteness checks of the current layer
        self.closed = False

    # -- counters -------------------------------------------------------------------
    def begin_forward(self) -> None:
        """Count one forward call of the model (call it before the call's first layer)."""
        self._index = self.calls
        self.calls += 1

    @property
    def step(self) -> int:
        """Denoising step of the current (or last started) forward call."""
        return self._index // self.config.calls_per_step

    @property
    def branch(self) -> int:
        return self._index % self.config.calls_per_step

    @property
    def completed_steps(self) -> int:
        return self.calls // self.config.calls_per_step

    def is_compressed(self, layer: int) -> bool:
        """Whether `layer` goes through the ResidualCodec at the current step."""
        cfg = self.config
        if self.rc is None or (cfg.layers is not None and layer not in cfg.layers):
            return False
        return cfg.policy is None or bool(cfg.policy(layer, self.step))

    def wire(self, dtype: torch.dtype) -> torch.dtype:
        return self.config.wire(dtype)

    # -- shape tracking ---------------------------------------------------------------
    def observe(self, layer: int, branch: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        """Record the K/V signature of (layer, branch); a change without reset is an error or a reset."""
        sig = (tuple(shape), dtype, torch.device(device).type)
        old = self._shapes.get((layer, branch))
        if old is not None and old != sig:
            if self.config.on_shape_change == "raise":
                raise CompactStateError(
                    f"layer {layer} branch {branch}: K/V changed from shape {old[0]} {old[1]} on {old[2]} to "
                    f"{sig[0]} {sig[1]} on {sig[2]} at step {self.step}; call handle.reset() between requests"
                )
            logger.info("layer %d: K/V shape %s -> %s, resetting state (on_shape_change='reset')", layer, old[0], sig[0])
            branch_now = self.branch
            self.reset()
            self.calls, self._index = branch_now + 1, branch_now
        self._shapes[(layer, branch)] = sig

    def wire_check(self, layer: int, branch: int) -> bool:
        """Whether this gather of (layer, branch) carries wire headers (`check=` of ccomm.comm).

        True once per signature (until `reset`): that gather proves every rank's K/V layout
        agrees, or raises HeaderMismatchError on every rank. Later gathers of the same
        signature have sizes that follow from it and the mirrored state, so they skip the
        header step, which would cost one more latency per layer (and block distrifusion's
        overlapped gather until it completes).
        """
        slot = (layer, branch)
        if slot in self._wire_checked:
            return False
        self._wire_checked.add(slot)
        return True

    # -- the exchange -------------------------------------------------------------------
    def _raw(self, key: KVKey) -> bool:
        rc = self.rc
        assert rc is not None
        return rc.step(key) < rc.raw_sends and rc.variant != "naive"

    def _buf_dtype(self, key: KVKey, dtype: torch.dtype, compressed: bool) -> torch.dtype:
        if not compressed or self._raw(key):
            return dtype
        assert self.rc is not None
        return self.rc.codec.empty_dtype(dtype)

    def send(self, key: KVKey, x: torch.Tensor, compressed: bool, *, defer: bool = False) -> torch.Tensor:
        """Encode own tensor `x` ((2, N, C) K/V stack) already in the wire dtype; returns its payload as uint8.

        `defer=True`: the own base update (and its finiteness check) runs at `settle()`.
        """
        self._check_finite(key, x)
        if not compressed:
            return x.contiguous().reshape(-1).view(torch.uint8)
        rc = self.rc
        assert rc is not None
        record = self.config.record_errors
        before = rc.base(key) if record else None
        raw = self._raw(key)
        try:
            payload = rc.encode(key, x, defer=defer)
        except ValueError as exc:  # shape/dtype changed under a live base
            raise CompactStateError(f"{key}: {exc}") from exc
        if self.config.variant != "naive" and not defer:
            self._check_finite(key, rc.base(key))
        if record:
            self._record(key, x, payload, before, raw)
        return payload.buffer.view(torch.uint8)

    def recv_nbytes(self, key: KVKey, shape: Sequence[int], dtype: torch.dtype, compressed: bool) -> int:
        """Exact size of the next payload of `key` (known from mirrored state)."""
        if not compressed:
            return math.prod(shape) * dtype.itemsize
        assert self.rc is not None
        return self.rc.expected_nbytes(key, shape, dtype)

    def receive(self, key: KVKey, data: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, compressed: bool) -> torch.Tensor:
        """Reconstruction (of `shape`) in the wire dtype of a peer's payload bytes `data` (uint8)."""
        bdtype = self._buf_dtype(key, dtype, compressed)
        esize = bdtype.itemsize
        buf = from_bytes(data, bdtype, data.numel() // esize)
        if not compressed:
            out = buf.reshape(shape)
        else:
            rc = self.rc
            assert rc is not None
            try:
                out = rc.decode(key, rc.wrap(key, buf, shape, dtype))
            except ValueError as exc:
                raise CompactStateError(f"{key}: {exc}") from exc
        self._check_finite(key, out)
        return out

    def own_reconstruction(self, key: KVKey, x: torch.Tensor, compressed: bool) -> torch.Tensor:
        """What receivers hold for own `key` after `send` (patch's own slot)."""
        if not compressed or self.rc is None or self.config.variant == "naive":
            return x
        base = self.rc.base(key)
        return x if base is None or self.config.variant == "no_ef" else base

    def _check_finite(self, key: KVKey, t: torch.Tensor | None) -> None:
        # Queued, not checked: `_flush_checks` tests a layer's tensors with one host sync.
        if self.config.nonfinite == "raise" and t is not None:
            self._checks.append((key, t))

    def _flush_checks(self) -> None:
        checks, self._checks = self._checks, []
        if checks and not all_finite([t for _, t in checks]):
            self._bad.extend(repr(k) for k, t in checks if not all_finite(t))

    def settle(self) -> None:
        """Apply deferred own-base updates (see `send`) and check the new bases."""
        if self.rc is None:
            return
        for key in self.rc.settle():
            self._check_finite(key, self.rc.base(key))

    def raise_nonfinite(self, layer: int) -> None:
        """Settle, then raise FloatingPointError if this layer's exchange met a non-finite tensor."""
        self.settle()
        self._flush_checks()
        if self._bad:
            bad, self._bad = self._bad, []
            raise FloatingPointError(f"non-finite K/V at step {self.step}, layer {layer}: {', '.join(bad[:4])}")

    # -- error recording (the ablation of docs/design/compactfusion.md#metrics) --
    def _record(self, key: KVKey, x: torch.Tensor, payload: Payload, before: torch.Tensor | None, raw: bool) -> None:
        """One error row per slice ("k", "v") of the (2, N, C) stack `x` just encoded."""
        rc = self.rc
        assert rc is not None
        decoded = None if raw else rc.codec.decode(payload).float()
        for i, kind in enumerate(("k", "v")):
            sk = KVKey(key.layer, key.source, kind, key.branch)
            xf = x[i].float()
            if decoded is None:
                d, r = xf, xf
            else:
                d = decoded[i]
                r = xf if self.config.variant == "naive" or before is None else xf - before[i].float()
            comp_err = float(torch.linalg.vector_norm(r - d))
            if self.config.variant == "naive" and not raw:
                xhat = d
            elif raw or sk not in self._shadow:
                xhat = xf
            else:  # the receivers' view: base + D(p), whatever the sender keeps
                xhat = (self._shadow[sk].float() + d).to(x.dtype).float()
            self._shadow[sk] = xhat.to(x.dtype)
            self.errors.append({
                "step": self.step, "layer": key.layer, "key": sk, "source": key.source, "kind": kind,
                "branch": key.branch, "variant": self.config.variant, "raw": raw, "comp_err": comp_err,
                "deviation": float(torch.linalg.vector_norm(xf - xhat)), "norm": float(torch.linalg.vector_norm(xf)),
            })

    # -- distrifusion's in-flight work ---------------------------------------------------
    def put_pending(self, slot: Hashable, handle: Any, finish: Callable[[Any], Any]) -> None:
        self.pending[slot] = (handle, finish)

    def take_stale(self, slot: Hashable) -> Any:
        """The stale K/V of `slot`: waits for and decodes its in-flight gather if any."""
        if slot in self.pending:
            handle, finish = self.pending.pop(slot)
            self.stale[slot] = finish(handle.wait())
        return self.stale[slot]

    def drain(self, *, decode: bool = True) -> None:
        """Complete every in-flight gather (decoding keeps bases mirrored; reset discards)."""
        for slot in list(self.pending):
            if decode:
                self.take_stale(slot)
            else:
                handle, _ = self.pending.pop(slot)
                try:
                    handle.wait()
                except RuntimeError as exc:  # draining must not mask the reason for a reset
                    logger.warning("drain: in-flight gather %s failed: %s", slot, exc)

    # -- lifecycle ----------------------------------------------------------------------
    def reset(self) -> None:
        """Drain, then drop bases, counters, stale buffers, shapes and per-request stats and error rows."""
        self.drain(decode=False)
        self.errors.clear()
        if self.rc is not None:
            self.rc.reset()
        self.stale.clear()
        self._shadow.clear()
        self._shapes.clear()
        self._wire_checked.clear()
        self._bad.clear()
        self._checks.clear()
        self.calls = self._index = 0
        if self._own_stats:
            self.stats.reset()

    def close(self) -> None:
        self.reset()
        self.closed = True

    def nbytes(self) -> int:
        """Bytes held by bases, stale K/V and error-recording shadows."""
        total = 0
        if self.rc is not None:
            for k in self.rc.keys():
                b = self.rc.base(k)
                total += 0 if b is None else b.numel() * b.element_size()
        for val in self.stale.values():
            for t in _tensors(val):
                total += t.numel() * t.element_size()
        for t in self._shadow.values():
            total += t.numel() * t.element_size()
        return total

    def check_consistency(self) -> int:
        """Bit-identity of all bases over the group; raises BaseMismatchError."""
        if self.rc is None:
            return 0
        self.drain(decode=True)
        self.settle()  # deferred own bases are checked for finiteness here, not inside keys()
        self._flush_checks()
        try:
            return self.rc.check_consistency(self.group, exact=True)
        except ConsistencyError as exc:
            raise BaseMismatchError(f"step {self.step}: {exc}") from exc


def _tensors(val: Any) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in _tensors(v)]
    return []
