"""The YAML scenario config of `deco-sgd bench`, as frozen self-validating dataclasses
(docs/design/deco_sgd.md#benchmark).

A config file has six sections; every field is optional except `scenario` and `network`::

    scenario: high_latency
    workers: 8
    task: {name: mnist}                  # name + the task's own config fields
    network: {latency_ms: 75, bandwidth_mbps: 100}   # one-way; or trace: {kind: random_walk, ...}
    train: {steps: 300, lr: 0.05, momentum: 0.9, compute_time_s: 0.075, seeds: [0, 1, 2]}
    methods: {grid_ratios: [...], grid_taus: [...], powersgd_ranks: [1, 4], ...}
    deco: {warmup_steps: 20, b: ..., kappa: ...}   # DecoConfig fields shared by every DeCo run
    target: {factor: 0.98}

Loading runs in this order:

1. parse the YAML and reject unknown sections and fields (the error names them and lists
   the allowed ones);
2. build each section's dataclass; `__post_init__` checks ranges and names the field as
   ``section.field`` in the `ValueError`;
3. `--quick` (docs/design/deco_sgd.md#quick-mode) replaces the run size: n = 4, seed 0, mnist, 300 steps, grid
   {(0.01, 0), (0.01, 2), (0.001, 4)}, PowerSGD rank 1, and the 784-256-256-10 MLP (0.27 M
   parameters) so that the whole run fits in a few minutes on 2 cores; the network stays the
   scenario's;
4. the `deco` section is checked by building a `DecoConfig` from it once.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ccomm.configs import config_dict
from ccomm.validate import check_int, check_number
from netsim import Link, Trace

from ..config import DecoConfig

__all__ = [
    "NetworkConfig",
    "TrainConfig",
    "MethodsConfig",
    "TargetConfig",
    "BenchConfig",
    "load_config",
    "with_seeds",
    "QUICK_GRID",
    "QUICK_MNIST_HIDDEN",
    "METHOD_KINDS",
]


#: Hidden layers of the --quick MLP: the scenarios' 784-1024-1024-10 (1.9 M parameters) costs
#: minutes per run on 2 cores once top-k encoding is in the loop; this one takes seconds.
QUICK_MNIST_HIDDEN: tuple[int, ...] = (256, 256)
#: Static grid of --quick (docs/design/deco_sgd.md#quick-mode).
QUICK_GRID: tuple[tuple[float, int], ...] = ((0.01, 0), (0.01, 2), (0.001, 4))
#: Method families a config can switch off with `methods.skip`.
METHOD_KINDS = ("dsgd", "grid", "static_apriori", "cocktail", "dga", "powersgd", "deco")
TRACE_KINDS = ("random_walk", "steps", "csv")


def _from_mapping(cls: type, section: str, data: Any) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{section}: must be a mapping, got {type(data).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{section}: unknown field(s) {unknown}; allowed: {allowed}")
    return cls(**data)


@dataclass(frozen=True)
class NetworkConfig:
    """One link model shared by every worker (netsim `Link`): one-way latency and a constant
    rate or a trace (docs/glossary.md: `latency_ms` is one way, as in netsim; the round trip
    is twice it)."""

    latency_ms: float = 75.0  # a float: the default round trip has always been 150.0
    bandwidth_mbps: float | None = 100.0
    #: None, or {kind: random_walk, start_mbps, low_mbps, high_mbps, step_s, duration_s, sigma, seed}
    #: / {kind: steps, points: [[t_s, mbps], ...]} / {kind: csv, path}.
    trace: Mapping[str, Any] | None = None
    #: Deprecated: the round-trip time, the former key; folded into `latency_ms` (half of it).
    rtt_ms: float | None = None
    #: The round trip as the run fingerprints have always spelled it (`round_trip_ms`).
    _round_trip: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rtt_ms is not None:
            warnings.warn("network: 'rtt_ms' (round trip) is deprecated, use 'latency_ms' (one way, half of it; "
                          "see docs/glossary.md)", DeprecationWarning, stacklevel=3)
            check_number("network.rtt_ms", self.rtt_ms, 0.0, 10_000.0)
            object.__setattr__(self, "latency_ms", self.rtt_ms / 2.0)
            object.__setattr__(self, "_round_trip", self.rtt_ms)  # exactly as given, int or float
            object.__setattr__(self, "rtt_ms", None)
        else:
            check_number("network.latency_ms", self.latency_ms, 0.0, 5_000.0)
            object.__setattr__(self, "_round_trip", 2 * self.latency_ms)  # an int latency gives an int
        if self.trace is None:
            if self.bandwidth_mbps is None:
                raise ValueError("network.bandwidth_mbps: give a rate in Mbit/s or a network.trace")
            check_number("network.bandwidth_mbps", self.bandwidth_mbps, 0.0, 1e6, lo_open=True)
        else:
            if self.bandwidth_mbps is not None:
                raise ValueError("network.bandwidth_mbps: must be null when network.trace is given")
            if not isinstance(self.trace, Mapping) or self.trace.get("kind") not in TRACE_KINDS:
                raise ValueError(f"network.trace.kind: must be one of {list(TRACE_KINDS)}, got "
                                 f"{self.trace.get('kind') if isinstance(self.trace, Mapping) else self.trace!r}")
            object.__setattr__(self, "trace", dict(self.trace))
            self.build_trace()  # fail now with the trace's own message

    @property
    def round_trip_ms(self) -> float:
        """The round-trip time in ms (2 × `latency_ms`): what run fingerprints key on."""
        return self._round_trip  # type: ignore[no-any-return]

    def build_trace(self) -> Trace | None:
        t = self.trace
        if t is None:
            return None
        kw = {k: v for k, v in t.items() if k != "kind"}
        try:
            if t["kind"] == "random_walk":
                allowed = {"start_mbps", "low_mbps", "high_mbps", "step_s", "duration_s", "sigma", "seed"}
                if set(kw) - allowed:
                    raise ValueError(f"unknown field(s) {sorted(set(kw) - allowed)}; allowed: {sorted(allowed)}")
                return Trace.random_walk(start=kw.get("start_mbps", 20.0), low=kw.get("low_mbps", 5.0),
                                         high=kw.get("high_mbps", 50.0), step_s=kw.get("step_s", 5.0),
                                         duration_s=kw.get("duration_s", 7200.0), sigma=kw.get("sigma", 0.3),
                                         seed=kw.get("seed", 0))
            if t["kind"] == "steps":
                return Trace.steps([tuple(p) for p in kw["points"]])
            return Trace.load(kw["path"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"network.trace: {e}") from e

    def link(self) -> Link:
        trace = self.build_trace()
        one_way = float(self.latency_ms)
        if trace is None:
            return Link(float(self.bandwidth_mbps), one_way)  # type: ignore[arg-type]
        return Link(None, one_way, trace=trace)


@dataclass(frozen=True)
class TrainConfig:
    """Step budget, optimiser and the virtual compute time per step."""

    steps: int = 300
    lr: float = 0.05
    momentum: float = 0.9
    eval_every: int = 10
    #: Fixed virtual compute time per step (s), GPU-like; identical for every method.
    compute_time_s: float = 0.075
    seeds: tuple[int, ...] = (0, 1, 2)
    #: Seeds of the static grid (all seeds by default; fewer when the budget forces it).
    grid_seeds: tuple[int, ...] | None = None
    #: Per-rank hard timeout of one bench invocation (s).
    timeout_s: float = 7200.0

    def __post_init__(self) -> None:
        check_int("train.steps", self.steps, 1, 1_000_000)
        check_number("train.lr", self.lr, 0.0, 10.0, lo_open=True)
        check_number("train.momentum", self.momentum, 0.0, 0.999)
        check_int("train.eval_every", self.eval_every, 1, 1_000_000)
        check_number("train.compute_time_s", self.compute_time_s, 0.0, 3600.0, lo_open=True)
        check_number("train.timeout_s", self.timeout_s, 1.0, 1e6)
        for name in ("seeds", "grid_seeds"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__") or not list(v):
                raise ValueError(f"train.{name}: must be a non-empty list of integers >= 0, got {v!r}")
            vals = tuple(check_int(f"train.{name}", s, 0, 2**31) for s in v)
            if len(set(vals)) != len(vals):
                raise ValueError(f"train.{name}: seeds must be distinct, got {list(vals)}")
            object.__setattr__(self, name, vals)
        if self.grid_seeds is not None and not set(self.grid_seeds) <= set(self.seeds):
            raise ValueError(f"train.grid_seeds: must be a subset of train.seeds {list(self.seeds)}, "
                             f"got {list(self.grid_seeds)}")

    @property
    def static_seeds(self) -> tuple[int, ...]:
        return self.grid_seeds if self.grid_seeds is not None else self.seeds


@dataclass(frozen=True)
class MethodsConfig:
    """Which baselines run and with what settings (docs/design/deco_sgd.md#baselines)."""

    grid_ratios: tuple[float, ...] = (0.1, 0.01, 0.001)
    grid_taus: tuple[int, ...] = (0, 1, 2, 4, 8)
    #: Explicit (ratio, staleness) pairs; replaces grid_ratios × grid_taus when given.
    grid_pairs: tuple[tuple[float, int], ...] | None = None
    #: The issue's chain "randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4" with random-k
    #: unscaled: ccomm's random-k is unbiased (×1/δ) by default, which is not a contraction,
    #: and error feedback on it diverged (non-finite aggregates within 20 steps, measured).
    cocktail_codec: str = "randomk:ratio=0.1,unbiased=false|topk:ratio=0.1|quantize:bits=4"
    cocktail_staleness: int = 1
    powersgd_ranks: tuple[int, ...] = (1, 4)
    #: τ_max in DGA's D = min(τ_min(1), τ_max) (docs/design/deco_sgd.md#dga): DecoConfig's default, kept apart from
    #: the `deco` section so that capping DeCo-SGD's search does not change this baseline.
    dga_tau_max: int = 16
    #: Method families to leave out (see METHOD_KINDS); dsgd cannot be skipped (it sets the target).
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("grid_ratios", "grid_taus", "powersgd_ranks", "skip"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                raise ValueError(f"methods.{name}: must be a list, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        for r in self.grid_ratios:
            check_number("methods.grid_ratios", r, 0.0, 1.0, lo_open=True)
        for t in self.grid_taus:
            check_int("methods.grid_taus", t, 0, 64)
        if self.grid_pairs is not None:
            pairs = []
            for p in self.grid_pairs:
                if isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) != 2:
                    raise ValueError(f"methods.grid_pairs: each entry must be [ratio, staleness], got {p!r}")
                pairs.append((check_number("methods.grid_pairs", p[0], 0.0, 1.0, lo_open=True),
                              check_int("methods.grid_pairs", p[1], 0, 64)))
            object.__setattr__(self, "grid_pairs", tuple(pairs))
        if len(set(self.grid)) != len(self.grid):
            raise ValueError(f"methods.grid_pairs: pairs must be distinct, got {list(self.grid)}")
        for r in self.powersgd_ranks:
            check_int("methods.powersgd_ranks", r, 1, 1024)
        check_int("methods.cocktail_staleness", self.cocktail_staleness, 0, 64)
        check_int("methods.dga_tau_max", self.dga_tau_max, 0, 64)
        bad = [s for s in self.skip if s not in METHOD_KINDS or s == "dsgd"]
        if bad:
            raise ValueError(f"methods.skip: must name method kinds from {[k for k in METHOD_KINDS if k != 'dsgd']},"
                             f" got {bad}")
        if "deco" in self.skip and "static_apriori" not in self.skip:
            raise ValueError("methods.skip: static_apriori needs deco's first decision; skip both or neither")
        try:
            DecoConfig(mode="static", codec=self.cocktail_codec, staleness=self.cocktail_staleness)
        except ValueError as e:
            raise ValueError(f"methods.cocktail_codec: {e}") from e

    @property
    def grid(self) -> tuple[tuple[float, int], ...]:
        if self.grid_pairs is not None:
            return self.grid_pairs
        return tuple((float(r), int(t)) for r in self.grid_ratios for t in self.grid_taus)


@dataclass(frozen=True)
class TargetConfig:
    """Target rule: factor × D-SGD's mean best (accuracy) or its inverse rule for losses
    (docs/design/deco_sgd.md#target-and-metrics)."""

    factor: float = 0.98
    value: float | None = None

    def __post_init__(self) -> None:
        check_number("target.factor", self.factor, 0.0, 1.0, lo_open=True)
        if self.value is not None:
            check_number("target.value", self.value, -1e9, 1e9)


@dataclass(frozen=True)
class BenchConfig:
    """A whole benchmark scenario; see the module docstring."""

    scenario: str
    network: NetworkConfig
    workers: int = 8
    task: Mapping[str, Any] = field(default_factory=lambda: {"name": "mnist"})
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    deco: Mapping[str, Any] = field(default_factory=dict)
    target: TargetConfig = field(default_factory=TargetConfig)
    quick: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.scenario, str) or not self.scenario.strip():
            raise ValueError(f"scenario: must be a non-empty name, got {self.scenario!r}")
        check_int("workers", self.workers, 1, 64)
        if not isinstance(self.task, Mapping) or "name" not in self.task:
            raise ValueError(f"task.name: must be given (one of mnist, bytelm), got {self.task!r}")
        from .tasks import TASKS

        if self.task["name"] not in TASKS:
            raise ValueError(f"task.name: must be one of {sorted(TASKS)}, got {self.task['name']!r}")
        cfg_cls = TASKS[self.task["name"]][0]
        try:
            cfg_cls(**self.task_kwargs)
        except TypeError as e:
            raise ValueError(f"task: {e}") from e
        except ValueError as e:
            raise ValueError(f"task.{e}") from e
        object.__setattr__(self, "task", dict(self.task))
        object.__setattr__(self, "deco", dict(self.deco or {}))
        for k in ("mode", "ratio", "staleness", "codec"):
            if k in self.deco:
                raise ValueError(f"deco.{k}: set per method by the benchmark; remove it from the deco section")
        try:
            self.deco_config()
        except ValueError as e:
            raise ValueError(f"deco.{e}") from e

    @property
    def task_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.task.items() if k != "name"}

    def deco_config(self, **method: Any) -> DecoConfig:
        """The DecoConfig of one DeCo run: shared `deco` fields plus the method's own."""
        base: dict[str, Any] = {"timeout_s": 600.0, **self.deco, **method}
        return DecoConfig.from_dict(base)

    def quick_version(self) -> "BenchConfig":
        """The `--quick` reduction (docs/design/deco_sgd.md#quick-mode): n = 4, seed 0, mnist
        with the small MLP, 300 steps, 3-point grid, PowerSGD rank 1."""
        base = self.task if self.task.get("name") == "mnist" else {"name": "mnist"}
        task = {**base, "hidden": list(QUICK_MNIST_HIDDEN)}
        train = dataclasses.replace(self.train, steps=300, seeds=(0,), grid_seeds=None)
        methods = dataclasses.replace(self.methods, grid_pairs=QUICK_GRID, powersgd_ranks=(1,))
        return dataclasses.replace(self, workers=4, task=task, train=train, methods=methods, quick=True)

    def to_dict(self) -> dict[str, Any]:
        """The init fields as plain data (`ccomm.configs`): what `config_from_dict` reads back."""
        return config_dict(self)


def load_config(path: str | Path, *, quick: bool = False) -> BenchConfig:
    """Read and validate a scenario YAML (see the module docstring); `quick` applies the quick mode
    (docs/design/deco_sgd.md#quick-mode)."""
    from ccomm.configfile import load_mapping

    return config_from_dict(load_mapping(path, "scenario"), quick=quick)


def config_from_dict(data: Any, *, quick: bool = False) -> BenchConfig:
    if not isinstance(data, Mapping):
        raise ValueError(f"config: the YAML must be a mapping, got {type(data).__name__}")
    sections = {"network": NetworkConfig, "train": TrainConfig, "methods": MethodsConfig, "target": TargetConfig}
    allowed = ["scenario", "workers", "task", "deco", *sections]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"config: unknown section(s) {unknown}; allowed: {allowed}")
    if "scenario" not in data:
        raise ValueError("scenario: missing (a name such as high_latency)")
    if "network" not in data:
        raise ValueError("network: missing (latency_ms and bandwidth_mbps or trace)")
    kw: dict[str, Any] = {k: _from_mapping(cls, k, data.get(k)) for k, cls in sections.items()}
    cfg = BenchConfig(scenario=data["scenario"], workers=data.get("workers", 8),
                      task=data.get("task") or {"name": "mnist"}, deco=data.get("deco") or {}, **kw)
    return cfg.quick_version() if quick else cfg


def with_seeds(cfg: BenchConfig, seeds: str) -> BenchConfig:
    """`cfg` with its training (and grid) seeds replaced by the comma-separated `seeds`."""
    try:
        vals = tuple(int(x) for x in str(seeds).split(",") if x.strip())
    except ValueError as e:
        raise ValueError(f"--seeds: must be comma-separated integers, got {seeds!r}") from e
    train = dataclasses.replace(cfg.train, seeds=vals, grid_seeds=None)  # validates the values
    return dataclasses.replace(cfg, train=train)


def apply_quick(cfg: BenchConfig) -> BenchConfig:
    """Deprecated: `cfg.quick_version()` (the name CompactFusion's benchmark config uses too)."""
    warnings.warn("deco_sgd.bench.config.apply_quick(cfg) is deprecated, use cfg.quick_version()",
                  DeprecationWarning, stacklevel=2)
    return cfg.quick_version()
