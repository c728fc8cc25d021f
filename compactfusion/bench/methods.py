"""The benchmarked methods: result key -> (parallel mode, codec, quality reference).

Quality is measured against the uncompressed output of the same mode (docs/design/compactfusion.md#metrics, as in the
repo): ring codecs against ``ring``, patch codecs and ``distrifusion`` against ``patch``.
``single`` is the unmodified model in one process.

Raw steps (the leading steps sent uncompressed; docs/glossary.md): every method uses the
benchmark's ``raw_steps`` (W = 1, the CompactFusion
repository's setting for FLUX and PixArt) except ``distrifusion``, which runs the
DistriFusion original's default of 4 synchronous steps (``DistriConfig(warmup_steps=4)`` in
mit-han-lab/distrifuser), so the baseline is the published one.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Method", "METHODS", "DISTRIFUSION_WARMUP"]


#: Synchronous warm-up steps of the original DistriFusion (its DistriConfig default).
DISTRIFUSION_WARMUP = 4


@dataclass(frozen=True)
class Method:
    """One benchmarked configuration; ``mode`` is None for the single process."""

    name: str
    mode: str | None
    codec: str
    reference: str | None
    #: Raw steps of this method; None: the benchmark config's ``raw_steps``.
    raw_steps: int | None = None

    def raw(self, default: int) -> int:
        """The raw steps this method runs with when the benchmark's setting is ``default``."""
        return default if self.raw_steps is None else self.raw_steps

    @property
    def parallel(self) -> bool:
        return self.mode is not None

    @property
    def compressed(self) -> bool:
        return self.codec != "none"


def _m(name: str, mode: str | None, codec: str, reference: str | None, raw_steps: int | None = None) -> tuple[str, Method]:
    return name, Method(name, mode, codec, reference, raw_steps)


#: Every method the benchmark knows, in the order of the tables.
METHODS: dict[str, Method] = dict(
    [
        _m("single", None, "none", None),
        _m("ring", "ring", "none", None),
        _m("patch", "patch", "none", None),
        _m("distrifusion", "distrifusion", "none", "patch", DISTRIFUSION_WARMUP),
        _m("ring+binary", "ring", "binary", "ring"),
        _m("ring+int2", "ring", "int2", "ring"),
        _m("ring+lowrank", "ring", "lowrank:rank=8", "ring"),
        _m("ring+lowrank_int4", "ring", "lowrank_int4:rank=32", "ring"),
        _m("patch+int2", "patch", "int2", "patch"),
    ]
)
