"""YAML configuration of the CompactFusion benchmark (``compactfusion bench CONFIG.yaml``).

A config file is a mapping with the fields of :class:`BenchConfig`; ``link`` is a nested
mapping (:class:`LinkConfig`) and ``quick`` a mapping of overrides applied by ``--quick``.
Unknown keys are rejected so that a typo never silently falls back to a default::

    name: ethernet
    steps: 28
    labels: [0, 1, 2, 3]
    link: {bandwidth_mbps: auto, target_slowdown: 4.87}
    quick: {steps: 8, labels: [3, 7], repeats: 1}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccomm.configfile import load_mapping
from ccomm.validate import check_bool, check_choice, check_int, check_number, deprecated_key, fail

from .backend import BACKENDS
from .methods import METHODS, Method

__all__ = ["LinkConfig", "BenchConfig", "load_config", "config_from_dict"]


_WIRE_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class LinkConfig:
    """The emulated per-rank link of the timed run.

    ``bandwidth_mbps``: ``"auto"`` searches the bandwidth at which uncompressed ring is
    ``target_slowdown`` times slower than the single process (docs/design/compactfusion.md#our-benchmark), a number fixes it
    (Mbit/s per rank), ``None`` runs unshaped (plain gloo, no emulation).
    ``sweep`` multiplies the chosen bandwidth for the latency-vs-bandwidth curve (the
    paper's 500/1000/1500/2000 MB/s are 1, 2, 3, 4 times its Ethernet point).
    """

    bandwidth_mbps: float | str | None = "auto"
    latency_ms: float = 0.0
    target_slowdown: float = 4.87
    tolerance: float = 0.10
    secant_steps: int = 3
    sweep: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        b = self.bandwidth_mbps
        if not (b is None or b == "auto"):
            try:
                check_number("link.bandwidth_mbps", b, 0.0, lo_open=True)
            except ValueError:
                fail("link.bandwidth_mbps", "'auto', null (unshaped) or a finite number > 0", b)
        check_number("link.latency_ms", self.latency_ms, 0.0)
        check_number("link.target_slowdown", self.target_slowdown, 1.0, lo_open=True)
        check_number("link.tolerance", self.tolerance, 0.0, 1.0, lo_open=True, hi_open=True)
        check_int("link.secant_steps", self.secant_steps, 0)
        object.__setattr__(self, "sweep", tuple(self.sweep))
        for m in self.sweep:  # multiples of the chosen bandwidth
            check_number("link.sweep", m, 0.0, lo_open=True)
        if self.sweep and b is None:
            raise ValueError("link.sweep: needs a shaped link (bandwidth_mbps 'auto' or a number), not null")

    @property
    def shaped(self) -> bool:
        return self.bandwidth_mbps is not None


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run does; see the module docstring for the file format.

    ``ranks``: group sizes run; the largest is reported under ``methods`` (bytes, quality),
    every other P under ``ranks<P>``. ``timing_ranks``: the P whose run follows the latency
    protocol (bandwidth search, interleaved repeats); other sizes are timed ``repeats_other``
    times only. ``labels``: one image per label, sampled as one batch (CFG doubles it).
    ``paper_bytes``: also measure the ring methods' wire bytes at FLUX.1's K/V shape on the
    largest P (:mod:`.paper_bytes`).
    """

    name: str = "bench"
    backend: str = "tiny_dit"
    steps: int = 28
    guidance: float = 2.0
    seed: int = 0
    labels: tuple[int, ...] = (0, 1, 2, 3)
    ranks: tuple[int, ...] = (2, 4)
    timing_ranks: int = 2
    methods: tuple[str, ...] = tuple(METHODS)
    wire_dtype: str = "fp16"
    raw_steps: int = 1
    repeats: int = 5
    warmup_loops: int = 1
    repeats_other: int = 1
    sweep_repeats: int = 2
    threads: int = 1
    ablation_codec: str = "int2"
    ablation_variants: tuple[str, ...] = ("naive", "no_ef", "ef")
    paper_bytes: bool = True
    link: LinkConfig = field(default_factory=LinkConfig)
    timeout_s: float = 600.0
    quick: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: must be a non-empty string, got {self.name!r}")
        check_choice("backend", self.backend, sorted(BACKENDS))
        check_int("steps", self.steps, 1)
        check_number("guidance", self.guidance, 0.0)
        check_int("seed", self.seed, 0)
        object.__setattr__(self, "labels", tuple(self.labels))
        if not self.labels or any(not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= 9 for c in self.labels):
            raise ValueError(f"labels: must be a non-empty list of digits 0..9, got {self.labels!r}")
        object.__setattr__(self, "ranks", tuple(sorted(set(self.ranks))))
        if not self.ranks or any(not isinstance(p, int) or isinstance(p, bool) or p < 2 for p in self.ranks):
            raise ValueError(f"ranks: must be a non-empty list of integers >= 2, got {self.ranks!r}")
        if self.timing_ranks not in self.ranks:
            raise ValueError(f"timing_ranks: must be one of ranks={list(self.ranks)}, got {self.timing_ranks!r}")
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            fail("methods", f"a non-empty list from {list(METHODS)}", list(self.methods))
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: duplicates in {list(self.methods)}")
        for needed in ("single", "ring"):
            if needed not in self.methods:
                raise ValueError(f"methods: must include {needed!r} (the references), got {list(self.methods)}")
        for name in self.methods:
            ref = METHODS[name].reference
            if ref is not None and ref not in self.methods:
                raise ValueError(f"methods: {name!r} is compared with {ref!r}, which must be run too")
        check_choice("wire_dtype", self.wire_dtype, _WIRE_DTYPES)
        check_int("raw_steps", self.raw_steps, 1)
        check_int("repeats", self.repeats, 1)
        check_int("warmup_loops", self.warmup_loops, 0)
        check_int("repeats_other", self.repeats_other, 1)
        check_int("sweep_repeats", self.sweep_repeats, 1)
        check_int("threads", self.threads, 1)
        if not isinstance(self.ablation_codec, str) or not self.ablation_codec:
            raise ValueError(f"ablation_codec: must be a codec spec string, got {self.ablation_codec!r}")
        object.__setattr__(self, "ablation_variants", tuple(self.ablation_variants))
        bad = [v for v in self.ablation_variants if v not in ("naive", "no_ef", "ef")]
        if bad:
            fail("ablation_variants", "a list from ['naive', 'no_ef', 'ef']", list(self.ablation_variants))
        check_bool("paper_bytes", self.paper_bytes)
        if isinstance(self.link, dict):
            object.__setattr__(self, "link", _build(LinkConfig, self.link, "link."))
        if not isinstance(self.link, LinkConfig):
            raise ValueError(f"link: must be a mapping, got {self.link!r}")
        check_number("timeout_s", self.timeout_s, 0.0, lo_open=True)
        if not isinstance(self.quick, dict):
            raise ValueError(f"quick: must be a mapping of overrides, got {self.quick!r}")
        names = {f.name for f in dataclasses.fields(self)} - {"quick"}
        if set(self.quick) - names:
            raise ValueError(f"quick: unknown keys {sorted(set(self.quick) - names)}; allowed are {sorted(names)}")

    @property
    def method_specs(self) -> list[Method]:
        return [METHODS[m] for m in self.methods]

    def quick_version(self) -> BenchConfig:
        """This config with its ``quick`` overrides applied (and validated)."""
        d = self.to_dict()
        over = dict(self.quick)
        if "link" in over:
            d["link"] = {**d["link"], **over.pop("link")}
        d.update(over)
        d["quick"] = {}
        return config_from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, tuple):
                d[k] = list(v)
        d["link"]["sweep"] = list(self.link.sweep)
        return d


def _build(cls: type, d: dict[str, Any], prefix: str = "") -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(d) - names)
    if extra:
        raise ValueError(f"{prefix}{extra[0]}: unknown key; allowed keys are {sorted(names)}")
    return cls(**d)


def config_from_dict(d: dict[str, Any]) -> BenchConfig:
    """Validate a parsed mapping into a :class:`BenchConfig` (``ValueError`` naming the field)."""
    if not isinstance(d, dict):
        raise ValueError(f"config: must be a mapping, got {type(d).__name__}")
    d = deprecated_key(d, "warmup_steps", "raw_steps", "config")
    if isinstance(d.get("quick"), dict):
        d["quick"] = deprecated_key(d["quick"], "warmup_steps", "raw_steps", "quick")
        if isinstance(d["quick"].get("link"), dict):
            d["quick"]["link"] = deprecated_key(d["quick"]["link"], "target_ratio", "target_slowdown", "quick.link")
    if isinstance(d.get("link"), dict):
        d["link"] = _build(LinkConfig, deprecated_key(d["link"], "target_ratio", "target_slowdown", "link"), "link.")
    return _build(BenchConfig, d)


def load_config(path: str | Path) -> BenchConfig:
    """Read and validate a YAML benchmark config."""
    return config_from_dict(load_mapping(path))
