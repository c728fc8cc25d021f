"""`DecoConfig`: every DeCo-SGD setting, validated on construction (docs/design/deco_sgd.md#config-validation).

Validation runs in `__post_init__` in this order:

1. types and ranges of every scalar field; sequences are normalised to tuples so that the
   frozen config is hashable and its `fingerprint()` does not depend on list-vs-tuple;
2. the codec spec is built once with `ccomm.make_codec` (errors surface as ``codec: ...``);
   single codecs get the `ratio` field, chains keep their own ratios in the spec;
3. cross-field rules: staleness ≤ tau_max ≤ 64, decide_every a multiple of measure_every,
   adaptive mode only with a one-ratio family, ``exchange="allreduce"`` only with an
   additive codec, Φ ``reported`` only with max(ratio_grid) ≤ 0.5.

Controller defaults are task-agnostic (issue 14): `convergence="measured"` takes the
convergence side of the objective from quantities measured in the run (gradient drift, the
error-feedback residual, the energy profile; `deco_sgd.convergence`), so no field needs
fitting. Adaptive runs start compressed at `ratio` = 0.01, τ = 0 (the default when `ratio` is not
given), measure every 2 steps and take their first informed decision within a few steps;
there is no dense warm-up (`warmup_steps` = 0). The older template surrogate (a, b, c, κ,
eps_rel, Φ) remains as `convergence="template"`, with `deco-sgd calibrate` as an optional
refinement. Fields the first plan did not name are [ours] (docs/design/deco_sgd.md#provenance).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from ccomm import available_codecs, make_codec
from ccomm.registry import parse_spec
from ccomm.codecs import Chain, Codec
from ccomm.configs import config_dict, fingerprint
from ccomm.validate import check_bool, check_choice, check_int, check_number, check_ratio

from .phi import PHI_FUNCTIONS, REPORTED_MAX_RATIO

__all__ = [
    "DecoConfig",
    "ADAPTIVE_CODECS",
    "DEFAULT_RATIO_GRID",
    "TAU_LIMIT",
    "CONFIG_SCHEMA",
]


#: Codec families the controller can drive with a single ratio (docs/design/deco_sgd.md#config-validation).
ADAPTIVE_CODECS = ("topk", "randomk")
DEFAULT_RATIO_GRID = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
#: Value formats of the controller's search (`value_formats`): wire dtypes and b-bit
#: quantized values (a `quantize:bits=b` stage after the sparsifier, error-fed like the rest).
VALUE_FORMATS = ("fp32", "fp16", "bf16", "q8", "q4")
#: Bits per value of the quantized formats.
QUANT_BITS = {"q8": 8, "q4": 4}
#: Where adaptive runs start when `ratio` is not given: compressed hard enough to be cheap on
#: a slow link before anything is measured, at τ = 0, which takes no stability risk. B̂ is
#: measured from these exchanges; where they are latency-dominated (a 150 ms link) it starts
#: from its lower bound V/(min_transfer_frac·duration). 0.1 was the start before issue 14's
#: last round: with the old bound V/duration (2.7 Mbit/s for a 100 Mbit/s link) a start at
#: 0.01 drove the first decisions to δ = 0.002, and 0.1 cost its 8 steps on slow links.
ADAPTIVE_START_RATIO = 0.01
#: Hard upper bound on tau_max (docs/design/deco_sgd.md#config-validation).
TAU_LIMIT = 64
#: Bumped when the meaning of a field changes, so old checkpoint hashes stop matching.
CONFIG_SCHEMA = 1

_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("static", "adaptive"),
    "nonfinite": ("skip", "raise"),
    "value_dtype": ("fp32", "fp16", "bf16"),
    "exchange": ("auto", "allgather", "allreduce"),
    "decision_mode": ("replicated", "rank0"),
    "checkpoint_queue": ("snapshot", "drain"),
    "flush": ("apply", "discard"),
    "convergence": ("measured", "template"),
    "collective_algo": ("auto", "ring"),
}


@dataclass(frozen=True)
class DecoConfig:
    """Frozen, self-validating DeCo-SGD configuration (see module docstring)."""

    # -- method ---------------------------------------------------------------------------
    mode: str = "adaptive"
    codec: str = "topk"
    #: Initial (adaptive) or fixed (static) fraction kept δ; None: 0.01 adaptive, 1.0 static.
    ratio: float | None = None
    staleness: int = 0  # initial (adaptive) or fixed (static) τ
    value_dtype: str = "fp32"
    exchange: str = "auto"
    #: All-gather algorithm: "auto" lets `ccomm.comm` choose ring or log-depth rounds from the
    #: link DeCo measured (`ccomm.comm.auto.set_measured`); "ring" keeps the backend's ring.
    collective_algo: str = "auto"
    seed: int = 0
    bucket_mb: float = 25.0
    lr_tau_scaling: bool = False
    # -- controller (docs/design/deco_sgd.md#search, docs/design/deco_sgd.md#decisions-across-ranks) --
    ratio_grid: tuple[float, ...] = DEFAULT_RATIO_GRID
    #: Value formats the controller may choose (fp32/fp16/bf16 wire dtypes, q8/q4 quantized).
    #: None: fp32, fp16, q8, q4 for top-k; fp32, fp16 otherwise.
    value_formats: tuple[str, ...] | None = None
    tau_max: int = 16
    warmup_steps: int = 0
    measure_every: int = 2
    decide_every: int = 20
    change_threshold: float = 0.2
    hysteresis: float = 0.05
    min_dwell_steps: int = 10
    decision_mode: str = "replicated"
    lut_rebuild_threshold: float = 0.1  # [ours] rebuild N when r moves more than this
    # -- convergence side of the objective ------------------------------------------------
    #: "measured": slowdown from measured drift and residual (deco_sgd.convergence);
    #: "template": the surrogate N(δ, τ) with a, b, c, κ (deco-sgd calibrate;
    #: docs/design/deco_sgd.md#template-surrogate).
    convergence: str = "measured"
    #: [ours] Drift ρ assumed until it is measured (conservative: only small gaps allowed).
    drift_prior: float = 0.5
    #: [ours] Floor on the measured drift (a noise-corrected estimate can read 0).
    drift_floor: float = 0.02
    # -- progress monitor (safe adaptation) ------------------------------------------------
    monitor: bool = True
    #: Back off when progress per step falls below (1 − tolerance) × the predicted one.
    monitor_tolerance: float = 0.75
    #: Back off when the loss EMA rises this fraction above its value at the switch.
    monitor_rise: float = 0.1
    #: Steps a new point runs before it is judged (at least 3τ + 2 more).
    monitor_window: int = 16
    ema_loss: float = 0.3
    # -- surrogate (docs/design/deco_sgd.md#template-surrogate) ------------------------------------
    phi: str = "exp2"
    phi_base: float = 2.0
    kappa: float = 1.0  # [ours] multiplier on Φ, fitted by fit_surrogate
    a: float = 1.0
    b: float = 1.0
    c: float = 1.0
    eps_rel: float = 0.05
    # -- estimators (docs/design/deco_sgd.md#estimators) ---------------------------------------------
    ema_comp: float = 0.1
    ema_bandwidth: float = 0.3
    ema_grad: float = 0.1  # [ours] α for the G² and σ² EMAs
    bw_min_transfer_frac: float = 0.05
    latency_window: int = 50
    sigma_coords: int = 2048
    #: [ours] Local gradient coordinates behind the energy profile (quantiles of |g|).
    profile_coords: int = 65536
    # -- faults, shutdown, checkpoints (docs/design/deco_sgd.md#validation-and-faults) --
    nonfinite: str = "skip"
    max_consecutive_skips: int = 10
    timeout_s: float = 120.0
    checkpoint_queue: str = "snapshot"
    flush: str = "apply"
    flush_residual: bool = False
    _codec_family: str = field(default="", init=False, repr=False, compare=False)
    _codec_additive: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name, choices in _CHOICES.items():
            check_choice(name, getattr(self, name), choices)
        for name in ("lr_tau_scaling", "flush_residual", "monitor"):
            check_bool(name, getattr(self, name))
        if self.ratio is None:
            family = str(self.codec).split(":")[0].split("|")[0].strip()
            adaptive = self.mode == "adaptive" and "|" not in str(self.codec) and family in ADAPTIVE_CODECS
            set_("ratio", ADAPTIVE_START_RATIO if adaptive else 1.0)
        set_("ratio", check_ratio("ratio", self.ratio))
        self._check_formats(set_)
        set_("tau_max", check_int("tau_max", self.tau_max, 0, TAU_LIMIT))
        set_("staleness", check_int("staleness", self.staleness, 0, self.tau_max))
        set_("seed", check_int("seed", self.seed, 0))
        set_("bucket_mb", check_number("bucket_mb", self.bucket_mb, 0.0, lo_open=True))
        self._check_grid(set_)
        for name in ("warmup_steps", "min_dwell_steps"):
            set_(name, check_int(name, getattr(self, name), 0))
        for name in ("measure_every", "decide_every", "max_consecutive_skips", "latency_window", "sigma_coords",
                     "profile_coords", "monitor_window"):
            set_(name, check_int(name, getattr(self, name), 1))
        if self.decide_every % self.measure_every:
            raise ValueError(
                f"decide_every: must be a multiple of measure_every={self.measure_every}, got {self.decide_every}"
            )
        set_("change_threshold", check_number("change_threshold", self.change_threshold, 0.0, 1.0, lo_open=True, hi_open=True))
        set_("lut_rebuild_threshold", check_number("lut_rebuild_threshold", self.lut_rebuild_threshold, 0.0, 1.0, lo_open=True, hi_open=True))
        set_("hysteresis", check_number("hysteresis", self.hysteresis, 0.0, 0.5, hi_open=True))
        set_("bw_min_transfer_frac", check_number("bw_min_transfer_frac", self.bw_min_transfer_frac, 0.0, 1.0, hi_open=True))
        set_("monitor_tolerance", check_number("monitor_tolerance", self.monitor_tolerance, 0.0, 1.0, lo_open=True, hi_open=True))
        set_("drift_prior", check_number("drift_prior", self.drift_prior, 0.0, 10.0, lo_open=True))
        set_("drift_floor", check_number("drift_floor", self.drift_floor, 0.0, 10.0))
        set_("monitor_rise", check_number("monitor_rise", self.monitor_rise, 0.0, lo_open=True))
        for name in ("ema_comp", "ema_bandwidth", "ema_grad", "ema_loss"):
            set_(name, check_number(name, getattr(self, name), 0.0, 1.0, lo_open=True))
        for name in ("eps_rel", "timeout_s"):
            set_(name, check_number(name, getattr(self, name), 0.0, lo_open=True))
        for name in ("a", "b", "c", "kappa"):
            set_(name, check_number(name, getattr(self, name), 0.0))
        if self.a == self.b == self.c == 0.0:
            raise ValueError("a, b, c: must be >= 0 and not all zero, got a = b = c = 0")
        set_("phi_base", check_number("phi_base", self.phi_base, 1.0, lo_open=True))
        check_choice("phi", self.phi, sorted(PHI_FUNCTIONS))
        if self.phi == "reported" and max(self.ratio_grid) > REPORTED_MAX_RATIO:
            raise ValueError(
                f"phi: 'reported' needs every ratio_grid value <= {REPORTED_MAX_RATIO} (it is NaN or "
                f"divergent as the ratio nears 1), but max(ratio_grid) = {max(self.ratio_grid)}"
            )
        self._check_codec(set_)

    def _check_grid(self, set_: Any) -> None:
        grid = self.ratio_grid
        if isinstance(grid, (str, bytes)) or not hasattr(grid, "__iter__"):
            raise ValueError(f"ratio_grid: must be a sequence of numbers in (0, 1], got {grid!r}")
        vals = tuple(check_ratio("ratio_grid", v) for v in grid)
        if not vals:
            raise ValueError("ratio_grid: must hold at least one value in (0, 1], got an empty sequence")
        if len(set(vals)) != len(vals):
            raise ValueError(f"ratio_grid: values must be distinct, got {list(vals)}")
        set_("ratio_grid", vals)

    def _check_formats(self, set_: Any) -> None:
        fm = self.value_formats
        if fm is None:
            topk = str(self.codec).split(":")[0].strip() == "topk"
            fm = ("fp32", "fp16", "q8", "q4") if topk else ("fp32", "fp16")
        if isinstance(fm, (str, bytes)) or not hasattr(fm, "__iter__") or not tuple(fm):
            raise ValueError(f"value_formats: must be a non-empty list from {list(VALUE_FORMATS)}, got {fm!r}")
        fm = tuple(fm)
        bad = [f for f in fm if f not in VALUE_FORMATS]
        if bad or len(set(fm)) != len(fm):
            raise ValueError(f"value_formats: must be distinct values from {list(VALUE_FORMATS)}, got {list(fm)}")
        if any(f in QUANT_BITS for f in fm) and str(self.codec).split(":")[0].strip() not in ("topk",):
            raise ValueError(f"value_formats: q8/q4 need codec 'topk' (quantized values after the sparsifier), "
                             f"got codec {self.codec!r}")
        set_("value_formats", fm)

    def _check_codec(self, set_: Any) -> None:
        if not isinstance(self.codec, str) or not self.codec.strip():
            raise ValueError(f"codec: expected a codec spec such as 'topk', got {self.codec!r}")
        try:
            names = [name for name, _ in parse_spec(self.codec)]
        except ValueError as e:
            raise ValueError(f"codec: {self.codec!r} does not parse: {e}") from e
        unknown = [n for n in names if n not in available_codecs()]
        if unknown:  # before the ratio checks, which would otherwise blame the spec's form
            raise ValueError(f"codec: unknown codec {unknown[0]!r} in {self.codec!r}; "
                             f"available: {', '.join(available_codecs())}")
        chain = "|" in self.codec
        if chain and self.ratio != 1.0:
            raise ValueError(f"ratio: a chain codec keeps its ratios in the spec; leave ratio at 1.0, got {self.ratio}")
        if "ratio=" in self.codec.replace(" ", "") and not chain:
            raise ValueError(f"codec: give the ratio in the `ratio` field, not in the spec {self.codec!r}")
        try:
            codec = make_codec(self.codec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"codec: {self.codec!r} does not parse with make_codec: {e}") from e
        family = "chain" if isinstance(codec, Chain) else codec.name
        if not chain and hasattr(codec, "ratio"):
            codec = self.make_codec(self.ratio)  # checks that the codec accepts this ratio
        elif not chain and self.ratio != 1.0:
            raise ValueError(f"ratio: codec {family!r} takes no ratio; leave ratio at 1.0, got {self.ratio}")
        if self.mode == "adaptive" and family not in ADAPTIVE_CODECS:
            raise ValueError(
                f"codec: mode='adaptive' needs a one-ratio family {list(ADAPTIVE_CODECS)} (chains are "
                f"static-only), got {self.codec!r}"
            )
        if self.exchange == "allreduce" and not codec.additive:
            raise ValueError(
                f"exchange: 'allreduce' needs an additive codec, and {self.codec!r} is not; use 'allgather' or 'auto'"
            )
        set_("_codec_family", family)
        set_("_codec_additive", bool(codec.additive))

    # -- derived ------------------------------------------------------------------------------
    @property
    def codec_family(self) -> str:
        """Registered name of the single codec, or ``"chain"``."""
        return self._codec_family

    @property
    def exchange_pattern(self) -> str:
        """Resolved exchange: ``"allreduce"`` for additive codecs under ``auto``, else ``"allgather"``."""
        if self.exchange != "auto":
            return self.exchange
        return "allreduce" if self._codec_additive else "allgather"

    @property
    def value_bytes(self) -> int:
        """b_v of the time model (docs/design/deco_sgd.md#message-sizes): 4 for fp32, 2 for fp16/bf16."""
        return 4 if self.value_dtype == "fp32" else 2

    def make_codec(self, ratio: float | None = None, values: str | None = None) -> Codec:
        """The codec at fraction kept `ratio` (default: the `ratio` field); chains ignore it.

        `values` q8/q4 appends a `quantize:bits=b` stage (quantized top-k values); the wire
        dtypes (fp32/fp16/bf16) do not change the codec (see `wire_dtype_name`).
        """
        if "|" in self.codec:
            return make_codec(self.codec)
        codec = make_codec(self.codec)
        if not hasattr(codec, "ratio"):
            return codec
        r = self.ratio if ratio is None else ratio
        if values in QUANT_BITS:
            return make_codec(f"{make_codec(self.codec, ratio=r).spec}|quantize:bits={QUANT_BITS[values]}")
        return make_codec(self.codec, ratio=r)

    @property
    def initial_values(self) -> str:
        """Value format of the first point: the `value_dtype` field."""
        return self.value_dtype

    @staticmethod
    def wire_dtype_name(values: str) -> str:
        """Wire dtype of a value format: quantized formats quantize fp32 values."""
        return "fp32" if values in QUANT_BITS else values

    def validate_for_hook(self) -> None:
        """Nothing to check any more: the hook's first step (DDP's bucket rebuild) is always
        dense and synchronous (`DecoState.effective`), whatever `warmup_steps` says."""

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the init fields (tuples become lists; `ccomm.configs`)."""
        return config_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DecoConfig":
        """Build from a mapping; unknown keys raise `ValueError` listing the allowed ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"config: expected a mapping, got {type(data).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; allowed: {allowed}")
        kw = dict(data)
        if "ratio_grid" in kw and isinstance(kw["ratio_grid"], list):
            kw["ratio_grid"] = tuple(kw["ratio_grid"])
        return cls(**kw)

    def replace(self, **changes: Any) -> "DecoConfig":
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """SHA-256 hex of the canonical JSON of `to_dict()` plus the schema number (`ccomm.configs`).

        Stable across processes and Python versions (unlike the built-in `hash`), so a
        checkpoint can check that it is resumed under the same config
        (docs/design/deco_sgd.md#checkpoints). Checkpoints store it: its value for a given
        config must not change (pinned in tests/deco_sgd/test_config.py).
        """
        return fingerprint(self, schema=CONFIG_SCHEMA)

    def hash(self) -> str:
        """Deprecated name of `fingerprint` (same value)."""
        warnings.warn("DecoConfig.hash() is deprecated, use DecoConfig.fingerprint() (see docs/glossary.md)",
                      DeprecationWarning, stacklevel=2)
        return self.fingerprint()
