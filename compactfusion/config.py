"""`CompactConfig`: every option of a CompactFusion run, validated on construction.

Fields and defaults follow the design record (docs/design/compactfusion.md#configuration-and-faults). Additions:
- `policy`: optional `Callable[[layer, step], bool]`, evaluated identically on every rank;
  False means "exchange this layer's K/V raw at this step" (the codec is bypassed and the
  layer's bases are left untouched, so they stay mirrored; the next compressed step sends
  the residual against the older base). It combines with `layers=` (both must allow).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Optional

import torch

from ccomm.codecs import Stacked
from ccomm.configs import config_dict, fingerprint
from ccomm.registry import available_codecs, make_codec, parse_spec
from ccomm.validate import check_bool, check_choice, check_int, check_number, deprecated_value, fail

__all__ = ["CompactConfig", "MODES", "VARIANTS", "WIRE_DTYPES"]

logger = logging.getLogger(__name__)

MODES = ("ring", "patch", "distrifusion")
VARIANTS = ("ef", "no_ef", "naive")
WIRE_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SHAPE_CHANGE = ("raise", "reset")
_NEW_REQUEST = ("timestep", "off")
_NONFINITE = ("raise", "ignore")
#: Spellings renamed to the glossary's (docs/glossary.md: "raise" is the option that raises,
#: as in DeCo-SGD's `nonfinite`); accepted with a DeprecationWarning for now.
_RENAMED_VALUES = {"on_shape_change": {"error": "raise"}, "nonfinite": {"error": "raise"}}


@dataclass(frozen=True)
class CompactConfig:
    """Options of `compactfusion.parallelize` (see module docstring for `policy`)."""

    mode: str = "ring"
    codec: str = "int2"
    #: Leading denoising steps whose K/V travel raw (and, in distrifusion, synchronously),
    #: counting step 0, which has no base yet; see docs/glossary.md.
    raw_steps: int = 1
    variant: str = "ef"
    wire_dtype: str = "auto"
    layers: Optional[tuple[int, ...]] = None
    calls_per_step: int = 1
    patch_exact_local: bool = False
    on_shape_change: str = "raise"
    new_request: str = "timestep"
    nonfinite: str = "raise"
    check_every: int = 0
    record_errors: bool = False
    max_state_mb: Optional[float] = None
    seed: int = 0
    policy: Optional[Callable[[int, int], bool]] = None
    #: Deprecated name of `raw_steps` (DeCo-SGD's `warmup_steps` counts something else).
    warmup_steps: Optional[int] = None

    FINGERPRINT_EXCLUDE: ClassVar[Mapping[str, str]] = {
        "warmup_steps": "deprecated alias, folded into raw_steps on construction (always None after)",
    }

    def __post_init__(self) -> None:
        if self.warmup_steps is not None:
            warnings.warn("CompactConfig: 'warmup_steps' is deprecated, use 'raw_steps' (see docs/glossary.md)",
                          DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "raw_steps", self.warmup_steps)
            object.__setattr__(self, "warmup_steps", None)
        for name, renamed in _RENAMED_VALUES.items():
            object.__setattr__(self, name, deprecated_value(name, getattr(self, name), renamed))
        check_choice("mode", self.mode, MODES)
        if not isinstance(self.codec, str) or not self.codec.strip():
            fail("codec", f"'none' or a codec spec from {', '.join(available_codecs())}", self.codec)
        if self.codec != "none":
            try:
                Stacked(self.make_codec())  # a layer's K and V travel as one stack
            except ValueError as exc:
                raise ValueError(f"codec: {exc}; must be 'none' or a spec from {', '.join(available_codecs())}, "
                                 f"got {self.codec!r}") from exc
        check_int("raw_steps", self.raw_steps, 1)  # step 0 has no base to send a residual against
        check_choice("variant", self.variant, VARIANTS)
        check_choice("wire_dtype", self.wire_dtype, list(WIRE_DTYPES))
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                fail("layers", "None or distinct integers >= 0", self.layers)
            layers = tuple(self.layers)
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers) \
                    or len(set(layers)) != len(layers):
                fail("layers", "None or distinct integers >= 0", self.layers)
            object.__setattr__(self, "layers", layers)
        check_int("calls_per_step", self.calls_per_step, 1)
        check_bool("patch_exact_local", self.patch_exact_local)
        if self.patch_exact_local and self.mode != "patch":
            raise ValueError(f"patch_exact_local: True is only allowed with mode='patch', got mode={self.mode!r}")
        check_choice("on_shape_change", self.on_shape_change, _SHAPE_CHANGE)
        check_choice("new_request", self.new_request, _NEW_REQUEST)
        check_choice("nonfinite", self.nonfinite, _NONFINITE)
        check_int("check_every", self.check_every, 0)
        if self.check_every > 0 and self.variant == "no_ef":
            raise ValueError("check_every: must be 0 with variant='no_ef' (no_ef bases differ between ranks by "
                             f"construction), got {self.check_every}")
        check_bool("record_errors", self.record_errors)
        if self.max_state_mb is not None:
            check_number("max_state_mb", self.max_state_mb, 0.0, lo_open=True)
        check_int("seed", self.seed, 0)
        if self.policy is not None and not callable(self.policy):
            fail("policy", "None or a callable (layer, step) -> bool", self.policy)
        if self.mode == "distrifusion" and self.codec != "none":
            logger.warning("mode='distrifusion' with codec=%r is experimental", self.codec)

    # -- derived --------------------------------------------------------------------
    @property
    def compressed(self) -> bool:
        return self.codec != "none"

    def make_codec(self):  # -> ccomm.Codec
        """The codec of `codec`; `seed` fills a single codec's `seed` parameter when the spec omits it."""
        stages = parse_spec(self.codec)
        if len(stages) == 1 and "seed" not in stages[0][1]:
            proto = make_codec(self.codec)
            if "seed" in getattr(proto, "params", lambda: {})():
                return make_codec(self.codec, seed=self.seed)
            return proto
        return make_codec(self.codec)

    def wire(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype K/V travel in ("auto": the model's)."""
        return WIRE_DTYPES[self.wire_dtype] or model_dtype

    def to_dict(self) -> dict:
        """The init fields as plain data (`ccomm.configs`); `policy` stays the callable."""
        return config_dict(self)

    def fingerprint(self) -> str:
        """Digest of every field (`ccomm.configs`), compared across ranks; `policy` by qualified name."""
        return fingerprint(self)
