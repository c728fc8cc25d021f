"""`ResidualCodec`: mirrored-base residual compression (CompactFusion).

Sender and every receiver of a key keep the same *base*, the last reconstruction of the
tensor. With t the key's use count since `reset()` and W = `raw_sends` (docs/glossary.md):

1. t < W: the payload is the raw tensor; base := x.
2. t >= W: the payload is C(x - base); everyone sets base := base + D(payload).
3. The receiver's output is the new base.

Because the base is the reconstruction, step 2 resends whatever earlier steps failed to
deliver: error feedback for free, with error bounded by one compression error.

Bit-identity: the sender decodes the serialized payload exactly as a receiver does, and
both update `base = (base.float() + D(p).float()).to(dtype)` in the same order (torch's
fp16/bf16 `base + D(p)` computes exactly that), so bases
stay bit-identical on ranks of one device type. `check_consistency` proves it.

Non-finite values are refused by default: `encode` raises `NonFiniteError` for an input
holding inf or NaN, and any base update (sender or receiver) that would store one raises
it too, leaving the key's base as it was. A NaN kept in a base would otherwise come back
in every later reconstruction of the key until `reset()`. `allow_nonfinite=True` turns
the checks off (CompactFusion does, and applies its own `nonfinite` policy).

Variants (for ablations): `ef` (above), `no_ef` (sender's base is the true previous
tensor, so receiver errors accumulate), `naive` (C(x) with no base at all).

Deferred update: `encode(key, x, defer=True)` returns the payload before the sender has
decoded it into its own base, so a caller can post the send first and overlap that
decode with the transfer. The update runs at `settle()` or at the next read or use of the
key (`base`, `keys`, `encode`, `decode`, `check_consistency`), so no reader ever sees a
stale base.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from .codecs.base import Codec
from .finite import require_finite
from .payload import Payload, PayloadMeta, from_bytes
from .registry import make_codec
from .validate import check_bool, check_choice, check_int

__all__ = ["ResidualCodec", "ConsistencyError"]


VARIANTS = ("ef", "no_ef", "naive")


class ConsistencyError(RuntimeError):
    """Ranks hold different bases for a key."""


@dataclass
class _KeyState:
    uses: int = 0
    base: torch.Tensor | None = None
    pending: Payload | None = None  # own payload not yet added to `base` (deferred update)


class ResidualCodec:
    __slots__ = ("codec", "raw_sends", "variant", "allow_nonfinite", "_state", "_deferred")

    def __init__(
        self, codec: Codec | str, raw_sends: int = 1, *, variant: str = "ef", allow_nonfinite: bool = False,
        warmup_steps: int | None = None,
    ) -> None:
        self.codec = make_codec(codec)
        self.allow_nonfinite = check_bool("allow_nonfinite", allow_nonfinite)
        if warmup_steps is not None:  # the former name, which DeCo-SGD uses for another thing
            warnings.warn("ResidualCodec: 'warmup_steps' is deprecated, use 'raw_sends' (see docs/glossary.md)",
                          DeprecationWarning, stacklevel=2)
            raw_sends = warmup_steps
        self.raw_sends = check_int("raw_sends", raw_sends, 1)  # the first send has no base to refer to
        self.variant = check_choice("variant", variant, VARIANTS)
        self._state: dict[Hashable, _KeyState] = {}
        self._deferred: dict[Hashable, None] = {}  # keys deferred since the last settle(), in order

    @property
    def warmup_steps(self) -> int:
        """Deprecated name of `raw_sends`."""
        warnings.warn("ResidualCodec.warmup_steps is deprecated, use raw_sends (see docs/glossary.md)",
                      DeprecationWarning, stacklevel=2)
        return self.raw_sends

    # -- queries ----------------------------------------------------------------------
    def step(self, key: Hashable) -> int:
        """Uses of `key` since the last reset."""
        st = self._state.get(key)
        return st.uses if st else 0

    def base(self, key: Hashable) -> torch.Tensor | None:
        """The current base of `key` (read-only: updates replace it, never modify it)."""
        st = self._state.get(key)
        if st is not None and st.pending is not None:
            self._apply(key, st)
        return st.base if st else None

    def keys(self) -> list[Hashable]:
        self.settle()
        return [k for k, st in self._state.items() if st.base is not None]

    def settle(self) -> list[Hashable]:
        """Apply every deferred own-base update.

        Returns each key encoded with `defer=True` since the last `settle()` once, including
        keys whose update a read already applied: all of them now hold new bases.
        """
        done, self._deferred = list(self._deferred), {}
        for key in done:
            st = self._state.get(key)
            if st is not None and st.pending is not None:
                self._apply(key, st)
        return done

    def _raw(self, key: Hashable) -> bool:
        return self.step(key) < self.raw_sends and self.variant != "naive"

    def expected_nbytes(self, key: Hashable, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Size of the next payload of `key`: receivers preallocate with it."""
        if self._raw(key):
            n = 1
            for s in shape:
                n *= int(s)
            return n * dtype.itemsize
        return self.codec.nbytes(shape, dtype)

    def wrap(self, key: Hashable, buffer: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> Payload:
        """A received buffer as the payload `decode(key, ...)` expects."""
        if self._raw(key):
            return Payload(buffer, PayloadMeta(torch.Size(shape), dtype, {"raw": True}))
        return self.codec.wrap(buffer, shape, dtype)

    # -- the algorithm ----------------------------------------------------------------
    def encode(self, key: Hashable, x: torch.Tensor, *, defer: bool = False) -> Payload:
        """Sender side: the payload for `x`, updating this rank's base of `key`.

        With `defer=True` (variant "ef") the base update, which decodes the payload, waits
        for `settle()` or the key's next use (see the module docstring).
        """
        st = self._state.setdefault(key, _KeyState())
        if st.pending is not None:
            self._apply(key, st)
        self._check_shape(key, st, x)
        self._check_finite(key, x, "input")
        if self._raw(key):
            payload = Payload(x.detach().reshape(-1).clone(), PayloadMeta(x.shape, x.dtype, {"raw": True}))
            st.base = x.detach().clone()
        elif self.variant == "naive":
            payload = self.codec.encode(x)
        else:
            assert st.base is not None
            r = self._sub(x.detach(), st.base)
            payload = self.codec.encode(r)
            if self.variant == "ef" and defer:
                st.pending = payload
                self._deferred[key] = None
            elif self.variant == "ef":
                st.base = self._checked_add(key, st.base, payload)
            else:  # no_ef: the sender remembers the truth, receivers only what they got
                st.base = x.detach().clone()
        st.uses += 1
        return payload

    def decode(self, key: Hashable, payload: Payload) -> torch.Tensor:
        """Receiver side: the reconstruction of `key`, updating this rank's base."""
        st = self._state.setdefault(key, _KeyState())
        if st.pending is not None:
            self._apply(key, st)
        meta = payload.meta
        if self._raw(key):
            buf = payload.buffer
            if buf.nbytes != meta.numel * meta.dtype.itemsize:
                raise ValueError(
                    f"key {key!r}: raw payload has {buf.nbytes} bytes, expected {meta.numel * meta.dtype.itemsize} "
                    f"for a {meta.dtype} tensor of shape {tuple(meta.shape)}"
                )
            if buf.dtype != meta.dtype:  # raw bytes from a byte-oriented transport
                buf = from_bytes(buf.view(torch.uint8), meta.dtype, meta.numel)
            self._check_finite(key, buf, "received raw tensor")
            st.base = buf.reshape(meta.shape).clone()
            out = st.base
        elif self.variant == "naive":
            out = self.codec.decode(payload)
        else:
            if st.base is None or st.base.shape != meta.shape:
                raise ValueError(f"key {key!r}: no base of shape {tuple(meta.shape)}; call reset() between requests")
            st.base = self._checked_add(key, st.base, payload)
            out = st.base
        st.uses += 1
        return out

    def reset(self) -> None:
        """Drop every base and counter (between requests)."""
        self._state.clear()
        self._deferred.clear()

    def _apply(self, key: Hashable, st: _KeyState) -> None:
        assert st.base is not None and st.pending is not None
        pending, st.pending = st.pending, None
        st.base = self._checked_add(key, st.base, pending)

    def _check_finite(self, key: Hashable, t: torch.Tensor, what: str) -> None:
        if not self.allow_nonfinite:
            require_finite(t, f"ResidualCodec: key {key!r}, {what}")

    def _checked_add(self, key: Hashable, base: torch.Tensor, payload: Payload) -> torch.Tensor:
        """base + D(payload), refused (base kept) when the sum is not finite."""
        new = self._add(base, self.codec.decode(payload))
        self._check_finite(key, new, "updated base")
        return new

    @staticmethod
    def _sub(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        # Half and bfloat16 arithmetic in torch computes in fp32 and rounds once, so this is
        # (x.float() - base.float()).to(dtype) without the two fp32 temporaries.
        return x - base

    @staticmethod
    def _add(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # One fixed op order on every rank: this is what keeps bases bit-identical. Same
        # dtype: one op in fp32 with one rounding, as in `_sub`.
        if delta.dtype == base.dtype:
            return base + delta
        return (base.float() + delta.float()).to(base.dtype)

    @staticmethod
    def _check_shape(key: Hashable, st: _KeyState, x: torch.Tensor) -> None:
        if st.base is not None and (st.base.shape != x.shape or st.base.dtype != x.dtype):
            raise ValueError(
                f"key {key!r}: tensor {tuple(x.shape)}/{x.dtype} differs from its base "
                f"{tuple(st.base.shape)}/{st.base.dtype}; call reset() between requests"
            )

    # -- verification -----------------------------------------------------------------
    def check_consistency(self, group: object | None = None, *, exact: bool = True, atol: float = 0.0) -> int:
        """Verify every rank of `group` holds the same bases; returns the number of keys checked.

        `exact=True` compares a digest of each base's bytes (bit identity). `exact=False`
        allows |difference| <= atol. Raises `ConsistencyError` naming the key and ranks.
        """
        import torch.distributed as dist

        keys = sorted(self.keys(), key=repr)
        names = [repr(k) for k in keys]
        world = dist.get_world_size(group)
        all_names: list[list[str] | None] = [None] * world
        dist.all_gather_object(all_names, names, group=group)
        for r, other in enumerate(all_names):
            if other != names:
                missing = sorted(set(names) ^ set(other or []))[:5]
                raise ConsistencyError(f"rank {r} holds different keys than this rank (e.g. {missing})")
        if not keys:
            return 0
        if exact:
            digests = [hashlib.blake2b(self._state[k].base.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest() for k in keys]  # type: ignore[union-attr]
            all_digests: list[list[str] | None] = [None] * world
            dist.all_gather_object(all_digests, digests, group=group)
            for i, name in enumerate(names):
                held = {r: d[i] for r, d in enumerate(all_digests) if d is not None}
                if len(set(held.values())) > 1:
                    raise ConsistencyError(f"key {name}: bases differ between ranks (digests {held})")
            return len(keys)
        flat = torch.cat([self._state[k].base.float().reshape(-1) for k in keys])  # type: ignore[union-attr]
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        spread = hi - lo
        off = 0
        for k, name in zip(keys, names):
            n = self._state[k].base.numel()  # type: ignore[union-attr]
            worst = float(spread[off : off + n].max()) if n else 0.0
            if not worst <= atol:
                raise ConsistencyError(f"key {name}: bases differ by up to {worst:g} > atol={atol:g}")
            off += n
        return len(keys)
