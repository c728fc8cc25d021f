"""One data exchange of a group of named gradients
(docs/design/deco_sgd.md#payload-exchange, docs/design/deco_sgd.md#non-finite-gradients).

A *unit* is what one collective carries: the per-parameter payloads of one DDP bucket
(hook mode) or of one `bucket_mb` chunk (wrapper mode). Selection, error feedback and the
decoded aggregate are all per parameter, so nothing depends on how parameters are grouped.

Wire format (one buffer per unit, one collective per unit):

- dense (δ = 1, and every warm-up step): the concatenated, already-compensated gradients
  divided by n, then n trailer elements holding a one-hot of this rank's validity; one
  all-reduce. Dividing before summing is what PyTorch's `allreduce_hook` does, so the
  result matches it.
- additive codec (random-k with a shared seed): concatenated value buffers plus the same
  one-hot trailer; one all-reduce; every rank decodes the sum with its own metadata.
- otherwise (top-k, chains): concatenated payload bytes plus one validity byte; one
  all-gather of equal sizes; each rank decodes the n payloads in rank order.

A rank whose gradients are not all finite sends zeros with validity 0 and leaves its
residual untouched (docs/design/deco_sgd.md#non-finite-gradients): the flags arrive with the data, so all
ranks see the same flags.

The collectives run with ``check=False`` (no per-call wire header, `ccomm.header`): every
unit's size follows from the parameters, the config and the fixed-size codec, which
`DecoState` checks to be identical on every rank when it is built, so a header step per
unit would only add a latency to every exchange.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ccomm import Codec, ErrorFeedback, Payload, PayloadMeta
from ccomm.comm import CommError, CommHandle, allgather_payloads, allreduce_payload, decode_sum
from ccomm.comm.auto import resolve_algo
from ccomm.finite import all_finite

from .errors import DecoCommError

__all__ = ["Unit", "StepEntry", "launch_unit", "completed_unit"]


@dataclass(eq=False)
class Unit:
    """One in-flight (or completed) collective for a group of parameters."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    ratio: float
    codec_spec: str
    #: What this rank's residual gave up for this unit, per parameter (None: rank invalid).
    own: dict[str, torch.Tensor] | None
    handle: CommHandle[Any] | None
    finish: Callable[[Any], None] | None
    launch_t: float
    #: When the backend finished the transfer (stamped by a future callback, for the
    #: bandwidth estimator, docs/design/deco_sgd.md#estimators); `decoded_t` is when this rank decoded it.
    done_t: float | None = None
    decoded_t: float | None = None
    #: Mean aggregate per parameter, once decoded.
    result: dict[str, torch.Tensor] | None = None
    #: Per-rank validity flags of this unit.
    valid: tuple[bool, ...] | None = None
    agg_finite: bool = True
    nbytes: int = 0
    collective: str = "allreduce"
    #: The algorithm the collective ran (`ccomm.schedule`): what the time models charge.
    algo: str = "ring"
    #: This rank's Σ‖g‖² over the unit before compensation (for the G² and σ² estimators,
    #: docs/design/deco_sgd.md#estimators; NaN if invalid).
    sq_norm: float = 0.0
    _future: "torch.futures.Future[None] | None" = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.valid is not None and all(self.valid) and self.agg_finite

    def wait(self, *, step: int, tau: int) -> "Unit":
        """Block until decoded; a transport failure becomes `DecoCommError`."""
        if self.result is None:
            assert self.handle is not None and self.finish is not None
            try:
                raw = self.handle.wait()
            except CommError as exc:
                raise DecoCommError(str(exc), step=step, key=self.key, staleness=tau,
                                    collective=self.collective) from exc
            self._complete(raw)
        return self

    def future(self, *, step: int, tau: int) -> "torch.futures.Future[None]":
        """A future that completes once this unit is decoded (never blocks the caller).

        Its value is None, not the unit: a future holding the unit that holds the future
        would be a reference cycle, and model-sized buffers in cycles wait for the cyclic
        garbage collector instead of being freed when the step is applied.
        """
        if self._future is None:
            if self.result is not None or self.handle is None:
                fut: torch.futures.Future[None] = torch.futures.Future()
                fut.set_result(None)
                self._future = fut
            else:
                def done(f: "torch.futures.Future[Any]") -> None:
                    try:
                        raw = f.value()
                    except CommError as exc:
                        raise DecoCommError(str(exc), step=step, key=self.key, staleness=tau,
                                            collective=self.collective) from exc
                    if self.result is None:
                        self._complete(raw)

                self._future = self.handle.get_future().then(done)
        return self._future

    @property
    def key(self) -> str:
        return self.names[0] if len(self.names) == 1 else f"{self.names[0]}..{self.names[-1]}"


    def _complete(self, raw: Any) -> None:
        assert self.finish is not None
        self.finish(raw)
        self.decoded_t = time.monotonic()
        if self.done_t is None:
            self.done_t = self.decoded_t
        # Release the backend's buffers, and break unit -> finish -> unit (the closure refers
        # to its unit): without this, every applied step's payloads, residual share and
        # aggregate stayed allocated until a full cyclic collection, ~10 MB per step on
        # eight workers of a 1.9 M-parameter MLP (measured; OOM at 3 GB per worker).
        self.handle = None
        self.finish = None


@dataclass(eq=False)
class StepEntry:
    """Everything launched at step `seq`: one unit per bucket/chunk."""

    seq: int
    ratio: float
    units: list[Unit] = field(default_factory=list)

    def names(self) -> set[str]:
        return {n for u in self.units for n in u.names}


def _one_hot(rank: int, world: int, dtype: torch.dtype, valid: bool, device: torch.device) -> torch.Tensor:
    t = torch.zeros(world, dtype=dtype, device=device)
    if valid:
        t[rank] = 1
    return t


def launch_unit(
    names: Sequence[str],
    grads: Sequence[torch.Tensor],
    ef: ErrorFeedback,
    codec: Codec | None,
    *,
    group: dist.ProcessGroup,
    rank: int,
    world: int,
    ratio: float,
    key: str,
    value_dtype: torch.dtype | None = None,
    algo: str = "auto",
) -> Unit:
    """Compensate, encode and launch one unit asynchronously (see module docstring).

    `value_dtype` (fp16/bf16) is the dtype of the values on the wire; residuals and the
    returned aggregate stay in the gradients' dtype, so the rounding error of the cast is
    kept by error feedback like any other compression error.
    """
    if len(names) != len(grads) or not names:
        raise ValueError(f"names/grads: need equally many (>= 1), got {len(names)} and {len(grads)}")
    dtype = grads[0].dtype
    if any(g.dtype != dtype for g in grads):
        raise ValueError(f"grads: one exchange unit needs one dtype, got {sorted({str(g.dtype) for g in grads})}")
    # Checked before compensation: a NaN must never enter the residual (docs/design/deco_sgd.md#non-finite-gradients).
    valid = all_finite(grads)  # one host sync for the whole unit
    shapes = tuple(g.shape for g in grads)
    own: dict[str, torch.Tensor] | None = {} if valid else None
    wire = value_dtype or dtype
    dev = grads[0].device  # every message stays on the gradients' device (the data group's backend)
    t0 = time.monotonic()

    if codec is None:
        parts = []
        for name, g in zip(names, grads):
            if valid:
                p = ef.compensate(name, g)
                m = p.to(wire)
                assert own is not None
                if wire == dtype:
                    ef.reset(name)  # a dense message delivers everything: the residual is empty
                    own[name] = p.detach().clone()
                else:
                    own[name] = m.to(dtype)
                    ef.update(name, p, own[name])
                parts.append(m.reshape(-1) / world)
            else:
                parts.append(torch.zeros(g.numel(), dtype=wire, device=dev))
        buf = torch.cat(parts + [_one_hot(rank, world, wire, valid, dev)])
        payload = Payload(buf, _dense_meta(buf))
        sizes = [g.numel() for g in grads]

        def finish(res: Payload) -> None:
            flat = res.buffer
            unit.valid = tuple(bool(v > 0.5) for v in flat[-world:])
            unit.result = {n: c.view(s).to(dtype) for n, c, s in zip(names, flat[:-world].split(sizes), shapes)}
            unit.agg_finite = all_finite(flat[:-world])

        handle = allreduce_payload(payload, group, algo="ring", async_op=True, key=key, check=False)
        spec, coll = "dense", "allreduce"
    else:
        payloads = []
        for name, g in zip(names, grads):
            if valid:
                p = ef.compensate(name, g)
                pl = codec.encode(p.to(wire))
                dec = codec.decode(pl).to(dtype)
                ef.update(name, p, dec)
                assert own is not None
                own[name] = dec
            else:
                pl = codec.encode(torch.zeros_like(g, dtype=wire))  # same size, and keeps seeded codecs in step
            payloads.append(pl)
        spec = codec.spec
        if codec.additive:
            vdtype = payloads[0].buffer.dtype
            buf = torch.cat([pl.buffer.to(vdtype) for pl in payloads] + [_one_hot(rank, world, vdtype, valid, dev)])
            sizes = [pl.buffer.numel() for pl in payloads]

            def finish(res: Payload) -> None:
                flat = res.buffer
                unit.valid = tuple(bool(v > 0.5) for v in flat[-world:])
                out = {}
                for n, pl, chunk in zip(names, payloads, flat[:-world].split(sizes)):
                    out[n] = codec.decode(pl.with_buffer(chunk.contiguous())).to(dtype) / world
                _set_result(unit, out)

            handle = allreduce_payload(Payload(buf, _dense_meta(buf)), group, algo="ring", async_op=True, key=key,
                                       check=False)
            coll = "allreduce"
        else:
            raw = [pl.buffer.contiguous().view(torch.uint8) for pl in payloads]
            flag = torch.tensor([1 if valid else 0], dtype=torch.uint8, device=dev)
            buf = torch.cat(raw + [flag])
            nbytes = [r.numel() for r in raw]
            expect = sum(codec.nbytes(s, wire) for s in shapes) + 1

            def finish(res: list[Payload]) -> None:
                bufs = [r.buffer for r in res]
                for i, b in enumerate(bufs):
                    if b.numel() != expect:  # sizes are fixed by (δ, shapes): a mismatch is a desync
                        raise ValueError(f"unit {key}: rank {i} sent {b.numel()} bytes, expected {expect}")
                unit.valid = tuple(bool(b[-1] == 1) for b in bufs)
                chunks = [b[:-1].split(nbytes) for b in bufs]
                out = {}
                for j, (n, pl) in enumerate(zip(names, payloads)):
                    per_rank = [pl.with_buffer(c[j].view(pl.buffer.dtype)) for c in chunks]
                    out[n] = decode_sum(codec, per_rank).to(dtype) / world
                _set_result(unit, out)

            # algo="auto" resolved here (log-depth rounds where latency dominates, on the link
            # measured for this group: `ccomm.comm.auto.set_measured`), so the unit can record
            # the algorithm that actually runs and the clocks charge that schedule.
            algo = resolve_algo("allgather", algo, group, world, buf.numel() * buf.element_size())
            handle = allgather_payloads(Payload(buf, _dense_meta(buf)), group, same_size=True, algo=algo,
                                        async_op=True, key=key, check=False)
            coll = "allgather"
    if coll == "allreduce":
        algo = "ring"
    sq = float(sum(float(g.detach().float().pow(2).sum()) for g in grads)) if valid else math.nan
    unit = Unit(tuple(names), shapes, ratio, spec, own, handle, finish, t0,
                nbytes=buf.numel() * buf.element_size(), collective=coll, algo=algo, sq_norm=sq)
    handle.get_future().add_done_callback(lambda _f: _stamp(unit))
    return unit


def _stamp(unit: Unit) -> None:
    # Runs on the backend's thread at completion; only records the time.
    if unit.done_t is None:
        unit.done_t = time.monotonic()


def _set_result(unit: Unit, out: dict[str, torch.Tensor]) -> None:
    unit.result = out
    unit.agg_finite = all_finite(out.values())


def _dense_meta(buf: torch.Tensor) -> PayloadMeta:
    # The transport buffer is never decoded as a whole; its meta only describes it.
    return PayloadMeta(buf.shape, buf.dtype)


def completed_unit(names: Sequence[str], result: dict[str, torch.Tensor], own: dict[str, torch.Tensor] | None,
                   valid: Sequence[bool], agg_finite: bool, ratio: float, codec_spec: str) -> Unit:
    """A unit restored from a checkpoint: already decoded, nothing in flight."""
    shapes = tuple(result[n].shape for n in names)
    now = time.monotonic()
    return Unit(tuple(names), shapes, ratio, codec_spec, own, None, None, now, now, now,
                result=result, valid=tuple(valid), agg_finite=agg_finite)
