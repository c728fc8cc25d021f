"""`CompactConfig`: every option of a CompactFusion run, validated on construction.

Fields and defaults follow the design record (docs/design/compactfusion.md#configuration-and-faults). Additions:
- `policy`: optional `Callable[[layer, step], bool]`, evaluated identically on every rank;
  False means "exchange this layer's K/V raw at this step" (the codec is bypassed and the
  layer's bases are left untouched, so they stay mirrored; the next compressed step sends
  the residual against the older base). It combines with `layers=` (both must allow).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ccomm.codecs import Stacked
from ccomm.registry import available_codecs, make_codec, parse_spec

__all__ = ["CompactConfig", "MODES", "VARIANTS", "WIRE_DTYPES"]

logger = logging.getLogger(__name__)

MODES = ("ring", "patch", "distrifusion")
VARIANTS = ("ef", "no_ef", "naive")
WIRE_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SHAPE_CHANGE = ("error", "reset")
_NEW_REQUEST = ("timestep", "off")
_NONFINITE = ("error", "ignore")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _choice(field: str, value: object, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r}: allowed values are {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class CompactConfig:
    """Options of `compactfusion.parallelize` (see module docstring for `policy`)."""

    mode: str = "ring"
    codec: str = "int2"
    warmup_steps: int = 1
    variant: str = "ef"
    wire_dtype: str = "auto"
    layers: Optional[tuple[int, ...]] = None
    calls_per_step: int = 1
    patch_exact_local: bool = False
    on_shape_change: str = "error"
    new_request: str = "timestep"
    nonfinite: str = "error"
    check_every: int = 0
    record_errors: bool = False
    max_state_mb: Optional[float] = None
    seed: int = 0
    policy: Optional[Callable[[int, int], bool]] = None

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        if not isinstance(self.codec, str) or not self.codec.strip():
            raise ValueError(f"codec={self.codec!r}: 'none' or a codec spec; available: {', '.join(available_codecs())}")
        if self.codec != "none":
            try:
                Stacked(self.make_codec())  # a layer's K and V travel as one stack
            except ValueError as exc:
                raise ValueError(f"codec={self.codec!r}: {exc}; 'none' or one of {', '.join(available_codecs())}") from exc
        if not _is_int(self.warmup_steps) or self.warmup_steps < 1:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: must be an integer >= 1 (step 0 has no base)")
        _choice("variant", self.variant, VARIANTS)
        _choice("wire_dtype", self.wire_dtype, list(WIRE_DTYPES))
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ValueError(f"layers={self.layers!r}: must be None or distinct integers >= 0")
            layers = tuple(self.layers)
            if not all(_is_int(x) and x >= 0 for x in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"layers={self.layers!r}: must be None or distinct integers >= 0")
            object.__setattr__(self, "layers", layers)
        if not _is_int(self.calls_per_step) or self.calls_per_step < 1:
            raise ValueError(f"calls_per_step={self.calls_per_step!r}: must be an integer >= 1")
        if not isinstance(self.patch_exact_local, bool):
            raise ValueError(f"patch_exact_local={self.patch_exact_local!r}: must be True or False")
        if self.patch_exact_local and self.mode != "patch":
            raise ValueError(f"patch_exact_local=True: only allowed with mode='patch', got mode={self.mode!r}")
        _choice("on_shape_change", self.on_shape_change, _SHAPE_CHANGE)
        _choice("new_request", self.new_request, _NEW_REQUEST)
        _choice("nonfinite", self.nonfinite, _NONFINITE)
        if not _is_int(self.check_every) or self.check_every < 0:
            raise ValueError(f"check_every={self.check_every!r}: must be an integer >= 0")
        if self.check_every > 0 and self.variant == "no_ef":
            raise ValueError("check_every > 0 with variant='no_ef': no_ef bases differ between ranks by construction")
        if not isinstance(self.record_errors, bool):
            raise ValueError(f"record_errors={self.record_errors!r}: must be True or False")
        if self.max_state_mb is not None and (
            isinstance(self.max_state_mb, bool) or not isinstance(self.max_state_mb, (int, float)) or not self.max_state_mb > 0
        ):
            raise ValueError(f"max_state_mb={self.max_state_mb!r}: must be None or a number > 0")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: must be an integer >= 0")
        if self.policy is not None and not callable(self.policy):
            raise ValueError(f"policy={self.policy!r}: must be None or a callable (layer, step) -> bool")
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

    def fingerprint(self) -> tuple:
        """A picklable summary compared across ranks (the policy by qualified name only)."""
        pol = None if self.policy is None else getattr(self.policy, "__qualname__", repr(type(self.policy)))
        return (self.mode, self.codec, self.warmup_steps, self.variant, self.wire_dtype, self.layers,
                self.calls_per_step, self.patch_exact_local, self.on_shape_change, self.new_request,
                self.nonfinite, self.check_every, self.record_errors, self.max_state_mb, self.seed, pol)
