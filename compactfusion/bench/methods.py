"""The benchmarked methods: result key -> (parallel mode, codec, quality reference).

Quality is measured against the uncompressed output of the same mode (spec §7, as in the
repo): ring codecs against ``ring``, patch codecs and ``distrifusion`` against ``patch``.
``single`` is the unmodified model in one process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["Method", "METHODS"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One benchmarked configuration; ``mode`` is None for the single process."""

    name: str
    mode: str | None
    codec: str
    reference: str | None

    @property
    def parallel(self) -> bool:
        return self.mode is not None

    @property
    def compressed(self) -> bool:
        return self.codec != "none"


def _m(name: str, mode: str | None, codec: str, reference: str | None) -> tuple[str, Method]:
    return name, Method(name, mode, codec, reference)


#: Every method the benchmark knows, in the order of the tables.
METHODS: dict[str, Method] = dict(
    [
        _m("single", None, "none", None),
        _m("ring", "ring", "none", None),
        _m("patch", "patch", "none", None),
        _m("distrifusion", "distrifusion", "none", "patch"),
        _m("ring+binary", "ring", "binary", "ring"),
        _m("ring+int2", "ring", "int2", "ring"),
        _m("ring+lowrank", "ring", "lowrank:rank=8", "ring"),
        _m("ring+lowrank_int4", "ring", "lowrank_int4:rank=32", "ring"),
        _m("patch+int2", "patch", "int2", "patch"),
    ]
)
