"""Jobs the benchmark runs on every rank of a :func:`~compactfusion.bench.pool.bench_pool`.

Each is a module-level function ``job(ctx, ...)`` (pickled by reference); models, handles and
the active emulator live in ``ctx.cache`` between jobs.

:func:`job_prepare` loads one model per run key and parallelizes it; :func:`job_link` enters
(or leaves) ``netsim.emulate`` with a per-rank :class:`netsim.Link`; :func:`job_sample` times
one image batch:

1. reset the handle (a new request), snapshot the ``ccomm.stats`` counters;
2. agree on a start instant over the unshaped ``ctx.plain`` group and sleep until it, so
   every rank starts together and barrier skew is not timed;
3. sample; the latency is the wall time from the agreed instant to this rank's end (the
   parent takes the maximum over ranks);
4. return the latency, the bytes this rank handed to torch.distributed per tag, the base
   memory, the error rows (rank 0) and the images (rank 0).

The ``single`` run is the unmodified model on rank 0 alone; the other ranks return at once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from .backend import make_backend
from .methods import METHODS

__all__ = ["RunKey", "SampleResult", "job_prepare", "job_link", "job_sample", "job_release"]


_START_AHEAD_S = 0.02
#: ccomm.stats tags of the CompactFusion exchanges (docs/design/compactfusion.md#parallel-modes).
TAGS = ("kv_ring", "kv_gather", "token_gather")


@dataclass(frozen=True)
class RunKey:
    """A cached model: a method, plus the ablation's variant and error recording."""

    method: str
    variant: str = "ef"
    record_errors: bool = False

    @property
    def label(self) -> str:
        return self.method if not self.record_errors else f"{self.method}[{self.variant}]"


@dataclass(frozen=True)
class SampleResult:
    """One rank's view of one timed sample."""

    rank: int
    latency_s: float | None
    bytes_by_tag: dict[str, int]
    state_nbytes: int
    errors: list[dict[str, Any]] | None
    images: Any  # numpy float32 array (B, 1, 32, 32) on rank 0, else None


def job_prepare(ctx: Any, backend: str, keys: list[RunKey], wire_dtype: str, raw_steps: int, seed: int) -> int:
    """Load and parallelize one model per key (skipping keys already cached); returns how many."""
    be = ctx.cache.setdefault("backend", make_backend(backend))
    models = ctx.cache.setdefault("models", {})
    for key in keys:
        if key in models:
            continue
        method = METHODS[key.method]
        model = be.load()
        handle = None
        if method.parallel:
            handle = be.parallelize(model, method, wire_dtype=wire_dtype, raw_steps=method.raw(raw_steps),
                                    variant=key.variant, record_errors=key.record_errors, seed=seed)
        models[key] = (model, handle)
    return len(models)


def job_release(ctx: Any) -> None:
    """Remove every handle and drop the cached models."""
    for _model, handle in ctx.cache.pop("models", {}).values():
        if handle is not None:
            handle.remove()


def job_link(ctx: Any, link: tuple[float, float] | None) -> dict[str, float] | None:
    """Leave the active emulation, then enter ``netsim.emulate(Link(mbps, ms))`` unless ``link`` is None.

    Returns the left emulator's counters (operations, late operations: those whose real
    transport finished after the modeled time, so the measured time exceeds the model).
    """
    emu = ctx.cache.pop("emulator", None)
    left = None
    if emu is not None:
        st = emu.stats
        left = {"ops": st.ops, "late_ops": st.late_ops, "max_late_s": st.max_late_s}
        emu.__exit__(None, None, None)
    if link is None:
        return left
    import netsim
    from netsim.model.link import Link

    # Late operations are counted and reported by the benchmark; one warning per link is noise.
    logging.getLogger("netsim.emulation").setLevel(logging.ERROR)

    emu = netsim.emulate(Link(float(link[0]), float(link[1])), seed=0, timeout_s=300.0)
    emu.__enter__()
    ctx.cache["emulator"] = emu
    return left


def _aligned_start(ctx: Any) -> float:
    import torch.distributed as dist

    t = torch.tensor([time.monotonic() + _START_AHEAD_S], dtype=torch.float64)
    dist.broadcast(t, 0, group=ctx.plain)
    start = float(t)
    time.sleep(max(0.0, start - time.monotonic()))
    return start


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in a.items()}
    for key, per_op in b.items():
        dst = out.setdefault(key, {})
        for op, st in per_op.items():
            dst[op] = dst[op] + st if op in dst else st
    return out


def _bytes_by_tag(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    from ccomm.stats import OpStats

    out: dict[str, int] = {}
    for key in set(before) | set(after):
        a = sum(after.get(key, {}).values(), OpStats())
        b = sum(before.get(key, {}).values(), OpStats())
        diff = (a - b).bytes
        if diff:
            out[key] = diff
    return out


def job_sample(ctx: Any, key: RunKey, labels: list[int], steps: int, guidance: float, seed: int,
               keep_images: bool) -> SampleResult:
    """Time one batch of images with the cached model of ``key`` (see the module docstring)."""
    import ccomm.stats

    be = ctx.cache["backend"]
    model, handle = ctx.cache["models"][key]
    single = not METHODS[key.method].parallel
    if single and ctx.rank != 0:
        return SampleResult(ctx.rank, None, {}, 0, None, None)
    if handle is not None:
        handle.reset()
    # Bytes are counted wherever the transport recorded them: the process-wide counters and,
    # for compactfusion handles, the handle's own per-request CommStats.
    own = getattr(handle, "stats", None)
    before = _merge(ccomm.stats.snapshot(), own.snapshot() if own is not None else {})
    lab = torch.tensor(labels, dtype=torch.long)
    start = time.monotonic() if single else _aligned_start(ctx)
    images = be.sample(model, lab, steps=steps, guidance=guidance, seed=seed)
    latency = time.monotonic() - start
    after = _merge(ccomm.stats.snapshot(), own.snapshot() if own is not None else {})
    errors = None
    if handle is not None and key.record_errors and ctx.rank == 0:
        # Keys may be KVKey objects; the parent only needs them as text.
        errors = [{k: v if isinstance(v, (int, float, str)) else str(v) for k, v in row.items()} for row in handle.errors]
    state = int(handle.state_nbytes()) if handle is not None else 0
    imgs = images.detach().float().cpu().numpy() if keep_images and ctx.rank == 0 else None
    return SampleResult(ctx.rank, latency, _bytes_by_tag(before, after), state, errors, imgs)
