"""The benchmark run (docs/design/compactfusion.md#our-benchmark): every method side by side on one host, link and seed.

For each group size P in ``cfg.ranks`` (the timing size first), on a fresh
:func:`~compactfusion.bench.pool.bench_pool` of P one-thread gloo ranks:

1. load and parallelize one model per method (and, at the largest P, one ``ring`` model per
   ablation variant with error recording);
2. ``warmup_loops`` rounds of every method on the unshaped transport, discarded except for
   the images and bytes of the first (outputs and bytes do not depend on the link);
3. timing size only: ``repeats`` rounds unshaped (all methods, interleaved round-robin) give
   ``T_single``, ``T_ring(∞)`` and every method's unshaped latency; with ``bandwidth_mbps:
   auto`` the secant search (:mod:`.search`) finds the per-rank bandwidth B* at which ring
   is ``target_slowdown`` times slower than single (each probe times single and ring
   interleaved and returns the ratio of their medians, the slowdown); then ``repeats`` interleaved rounds at B*
   and ``sweep_repeats`` rounds at every multiple of B* in ``link.sweep``;
4. other sizes: ``repeats_other`` interleaved rounds on the same link;
5. largest P: one run per ablation variant (unshaped), keeping the per-step error rows, and
   (``paper_bytes``) the ring methods' wire bytes at FLUX.1's K/V shape (:mod:`.paper_bytes`).

The parent gathers per-sample results; :mod:`.summary` turns them into the results mapping.
With ``partial`` set, every finished sample is also written there at once (JSON, replaced
atomically), so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import BenchConfig
from .methods import METHODS
from .paper_bytes import job_paper_bytes
from .project import FluxSetting
from .pool import RankError, RankPool, bench_pool
from .search import SearchResult, secant_bandwidth
from .worker import RunKey, SampleResult, job_link, job_prepare, job_release, job_sample

__all__ = ["Samples", "RunData", "run_benchmark"]

logger = logging.getLogger(__name__)

#: Key of the unshaped transport in ``Samples.latency``.
UNSHAPED = "unshaped"


@dataclass
class Samples:
    """Everything measured for one group size."""

    ranks: int
    latency: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # link label -> method -> seconds
    links: dict[str, float | None] = field(default_factory=dict)  # link label -> Mbit/s per rank (None: unshaped)
    bytes_by_tag: dict[str, list[dict[str, int]]] = field(default_factory=dict)  # method -> per-rank tags
    state_nbytes: dict[str, int] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)  # method or ablation label -> array
    errors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # ablation variant -> rows
    search: SearchResult | None = None
    main_link: str = UNSHAPED
    emulation: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # link label -> per-rank counters
    paper_bytes: list[dict[str, list[int]]] | None = None  # per rank: ring method -> bytes per call


@dataclass
class RunData:
    config: BenchConfig
    per_ranks: dict[int, Samples]
    elapsed_s: float
    failures: list[str] = field(default_factory=list)
    #: Host load averages before any rank started (the run's own ranks load the host later).
    load_at_start: tuple[float, float, float] | None = None


def _partial_dict(s: Samples) -> dict[str, Any]:
    """The JSON-able part of `s` (images are left out)."""
    d = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "images"}
    d["search"] = None if s.search is None else dataclasses.asdict(s.search)
    return d


class _Runner:
    def __init__(self, cfg: BenchConfig, tick: Callable[[str], None], partial: Path | None = None) -> None:
        self.cfg = cfg
        self.tick = tick
        self._current: str | None = None  # label of the active emulated link
        self.partial = partial
        self.done: dict[int, Samples] = {}  # finished group sizes, for the partial file
        self.active: Samples | None = None  # the group size being measured

    def sample(self, pool: RankPool, key: RunKey, keep: bool) -> list[SampleResult]:
        c = self.cfg
        res = pool.run(job_sample, key, list(c.labels), c.steps, c.guidance, c.seed, keep, timeout=c.timeout_s)
        self.tick(key.label)
        return res

    def save(self) -> None:
        """Write every sample measured so far to the partial file (atomic replace)."""
        if self.partial is None:
            return
        runs = {**self.done, **({self.active.ranks: self.active} if self.active is not None else {})}
        doc = {"complete": False, "config": self.cfg.to_dict(),
               "ranks": {str(p): _partial_dict(s) for p, s in sorted(runs.items())}}
        tmp = self.partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.partial)

    def round(self, pool: RankPool, s: Samples, label: str, keep: bool = False) -> None:
        """One interleaved round of every method on the current link."""
        per = s.latency.setdefault(label, {})
        for m in self.cfg.methods:
            res = self.sample(pool, RunKey(m), keep)
            lat = [r.latency_s for r in res if r.latency_s is not None]
            per.setdefault(m, []).append(max(lat))
            if keep:
                s.images[m] = res[0].images
                s.bytes_by_tag[m] = [r.bytes_by_tag for r in res]
                s.state_nbytes[m] = res[0].state_nbytes
            self.save()

    def set_link(self, pool: RankPool, s: Samples, mbps: float | None) -> str:
        label = UNSHAPED if mbps is None else f"{mbps:.6g}Mbps"
        link = None if mbps is None else (mbps, float(self.cfg.link.latency_ms))
        left = pool.run(job_link, link, timeout=self.cfg.timeout_s)
        if self._current is not None and left[0] is not None:
            prev = s.emulation.setdefault(self._current, [])
            s.emulation[self._current] = [_add_counts(a, b) for a, b in zip(prev, left)] if prev else left
        self._current = None if mbps is None else label
        s.links[label] = mbps
        return label

    def measure_slowdown(self, pool: RankPool, s: Samples, bps: float) -> float:
        """A search probe: ``median(ring) / median(single)`` at ``bps`` bytes/s per rank, interleaved.

        The single process runs beside ring in the same probe (it does not communicate, so the
        link does not change it) so that load changes on the host cancel in the ratio.
        """
        label = self.set_link(pool, s, bps * 8 / 1e6)
        per = s.latency.setdefault(label, {})
        for _ in range(max(1, min(self.cfg.repeats, 3))):
            for m in ("single", "ring"):
                res = self.sample(pool, RunKey(m), False)
                per.setdefault(m, []).append(max(r.latency_s for r in res if r.latency_s is not None))
        return statistics.median(per["ring"]) / statistics.median(per["single"])

    def run_ranks(self, p: int, timing: bool, ablate: bool, fixed_mbps: float | None) -> Samples:
        c = self.cfg
        s = Samples(p)
        self.active = s
        keys = [RunKey(m) for m in c.methods] + (self.ablation_keys() if ablate else [])
        with bench_pool(p, threads=c.threads, timeout_s=c.timeout_s) as pool:
            pool.run(job_prepare, c.backend, keys, c.wire_dtype, c.raw_steps, c.seed, timeout=c.timeout_s)
            for k in range(max(1, c.warmup_loops)):
                self.round(pool, s, "warmup", keep=k == 0)
            s.latency.pop("warmup", None)
            shaped = c.link.shaped
            if timing or not shaped:
                for _ in range(c.repeats if timing else c.repeats_other):
                    self.round(pool, s, UNSHAPED)
                s.links[UNSHAPED] = None
            if shaped:
                mbps = fixed_mbps
                if mbps is None:
                    # The search runs on ratios to the single process measured beside it (times in
                    # units of T_single), so a change of load on the host does not move the target.
                    lat = s.latency[UNSHAPED]
                    t1 = statistics.median(lat["single"])
                    w = statistics.mean(sum(t.values()) for t in s.bytes_by_tag["ring"])
                    s.search = secant_bandwidth(
                        lambda b: self.measure_slowdown(pool, s, b),
                        t_single=1.0, t_inf=statistics.median(lat["ring"]) / t1,
                        bytes_per_rank=w / t1, slowdown=c.link.target_slowdown, tolerance=c.link.tolerance,
                        max_steps=c.link.secant_steps)
                    mbps = s.search.bandwidth_Bps * 8 / 1e6
                label = self.set_link(pool, s, mbps)
                s.latency[label] = {}  # the search's probes at this point are not the interleaved rounds
                for _ in range(c.repeats if timing else c.repeats_other):
                    self.round(pool, s, label)
                s.main_link = label
                if timing:
                    for mult in c.link.sweep:
                        if mult == 1:
                            continue
                        sl = self.set_link(pool, s, mbps * mult)
                        s.latency[sl] = {}
                        for _ in range(c.sweep_repeats):
                            self.round(pool, s, sl)
                self.set_link(pool, s, None)
            if ablate:
                for key in self.ablation_keys():
                    res = self.sample(pool, key, True)
                    s.errors[key.variant] = res[0].errors or []
                    s.images[key.label] = res[0].images
                    self.save()
                if c.paper_bytes:
                    ring = [m for m in c.methods if METHODS[m].mode == "ring"]
                    s.paper_bytes = pool.run(job_paper_bytes, ring, FluxSetting(), c.seed, timeout=c.timeout_s)
                    self.tick("paper_bytes")
                    self.save()
            pool.run(job_release, timeout=c.timeout_s)
        return s

    def ablation_keys(self) -> list[RunKey]:
        return [RunKey(_ablation_method(self.cfg), v, True) for v in self.cfg.ablation_variants]

    def expected_samples(self) -> int:
        c, n = self.cfg, len(self.cfg.methods)
        total = 0
        for p in c.ranks:
            timing = p == c.timing_ranks
            rounds = max(1, c.warmup_loops)
            if timing or not c.link.shaped:
                rounds += c.repeats if timing else c.repeats_other
            if c.link.shaped:
                rounds += c.repeats if timing else c.repeats_other
                if timing:
                    rounds += c.sweep_repeats * sum(1 for m in c.link.sweep if m != 1)
            total += rounds * n
            if timing and c.link.bandwidth_mbps == "auto":
                total += 2 * (c.link.secant_steps + 1) * max(1, min(c.repeats, 3))
            if p == max(c.ranks):
                total += len(c.ablation_variants) + int(c.paper_bytes)
        return total


def _add_counts(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"ops": a["ops"] + b["ops"], "late_ops": a["late_ops"] + b["late_ops"],
            "max_late_s": max(a["max_late_s"], b["max_late_s"])}


def _ablation_method(cfg: BenchConfig) -> str:
    from .methods import METHODS

    for name, m in METHODS.items():
        if m.mode == "ring" and m.codec == cfg.ablation_codec:
            return name
    raise ValueError(f"ablation_codec: {cfg.ablation_codec!r} is not the codec of a ring method; "
                     f"allowed values are {[m.codec for m in METHODS.values() if m.mode == 'ring' and m.compressed]}")


def run_benchmark(cfg: BenchConfig, *, progress: bool = True, retries: int = 1,
                  partial: Path | None = None) -> RunData:
    """Run every group size of ``cfg`` (see the module docstring); returns the raw samples.

    ``partial``: a JSON file that holds every sample measured so far, rewritten after each.

    A group size whose pool fails (a rank raised or timed out) is run again from scratch up to
    ``retries`` times; every failure is kept in ``RunData.failures`` and shown in the report.
    """
    from tqdm import tqdm

    _ablation_method(cfg)
    t0 = time.monotonic()
    try:
        load0: tuple[float, float, float] | None = os.getloadavg()
    except OSError:
        load0 = None
    order = [cfg.timing_ranks] + [p for p in cfg.ranks if p != cfg.timing_ranks]
    bar = tqdm(total=0, desc="compactfusion bench", unit="run", disable=not progress, dynamic_ncols=True)

    def tick(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    runner = _Runner(cfg, tick, partial)
    bar.total = runner.expected_samples()
    out: dict[int, Samples] = {}
    fixed: float | None = cfg.link.bandwidth_mbps if isinstance(cfg.link.bandwidth_mbps, (int, float)) else None
    failures: list[str] = []
    try:
        for p in order:
            for attempt in range(1 + retries):
                bar.set_description(f"compactfusion bench P={p}")
                try:
                    s = runner.run_ranks(p, p == cfg.timing_ranks, p == max(cfg.ranks), fixed)
                    break
                except (RankError, TimeoutError) as exc:
                    last = str(exc).strip().splitlines()[-1]
                    failures.append(f"P={p} attempt {attempt + 1} failed and the P={p} run was restarted: {last}")
                    logger.warning("%s", failures[-1])
                    if attempt == retries:
                        raise
            out[p] = s
            runner.done[p], runner.active = s, None
            runner.save()
            if fixed is None and s.search is not None:
                fixed = s.search.bandwidth_Bps * 8 / 1e6  # other sizes reuse the timing size's B*
    finally:
        bar.close()
    return RunData(cfg, out, time.monotonic() - t0, failures, load0)
