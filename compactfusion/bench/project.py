"""Projection of the paper's setting with the netsim cost model (FLUX.1, 1024², 28 steps, 4 ranks).

Only the compression ratios come from our run; everything else is the paper's setting:

1. Shapes: 4096 image tokens (64 × 64 patches of the 128 × 128 latent), 57 attention layers
   (19 double- + 38 single-stream), C = 24 heads × 128 = 3072, batch 1 (FLUX-dev has no CFG
   batch), so each rank exchanges K and V of ``N = 4096 / P`` rows per layer, in fp16.
2. Bytes per tensor: ``2·N·C`` uncompressed; compressed either by the codec's exact
   ``nbytes`` at this shape (``formula``) or by the ratio measured on the tiny model
   (``measured``, larger scale overhead, so pessimistic). Warm-up steps send raw tensors.
3. Link: a per-rank :class:`netsim.Link` at the paper's per-GPU MB/s (10^6 B/s), no latency.
   Ring: per layer ``P − 1`` hops of K+V, each costed by :func:`netsim.model.cost.p2p_time`;
   patch and DistriFusion: an all-gather of K+V per layer, :func:`netsim.model.cost.allgather_time`
   (ring algorithm, the same bytes).
4. Compute: the paper's single-GPU time (28.06 s, docs/design/compactfusion.md#paper-ethernet-numbers) split
   evenly over P ranks.
5. Time per image: ring and patch do not overlap communication with compute
   (``T = compute + Σ comm``, an upper bound: our ring posts the next hop before computing a
   block); DistriFusion overlaps each step's all-gather with the next step's compute
   (``max(compute, comm)`` per step after warm-up). Warm-up steps (raw, synchronous): 1 for
   the CompactFusion methods, 4 for DistriFusion (its original default).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from netsim import cost
from netsim.model.link import Link

from .methods import METHODS

__all__ = ["FluxSetting", "ProjectionRow", "PAPER_ETHERNET", "PAPER_MAP", "project", "codec_nbytes"]


#: Repo data (docs/design/compactfusion.md#paper-ethernet-numbers): seconds per image, FLUX.1-dev 1024², 28 steps, 4 GPUs.
PAPER_ETHERNET: dict[str, dict[int, float]] = {
    "single": {500: 28.06, 1000: 28.06, 1500: 28.06, 2000: 28.06},
    "ring": {500: 136.52, 1000: 76.12, 1500: 58.31, 2000: 44.41},
    "patch": {500: 141.55, 1000: 79.52, 1500: 44.63, 2000: 43.36},
    "distrifusion": {500: 139.73, 1000: 78.73, 1500: 58.41, 2000: 42.21},
    "ring+binary": {500: 20.91, 1000: 15.74, 1500: 14.76, 2000: 13.89},
    "ring+int2": {500: 27.48, 1000: 19.82, 1500: 17.76, 2000: 16.08},
}
#: Our method key -> the paper's name.
PAPER_MAP = {"single": "Original (1 GPU)", "ring": "Ring Attention", "patch": "Patch Parallel",
             "distrifusion": "DistriFusion", "ring+binary": "Compact-1bit", "ring+int2": "Compact-2bit"}


@dataclass(frozen=True)
class FluxSetting:
    """The paper's FLUX.1-dev run (docs/design/compactfusion.md#paper-setting)."""

    ranks: int = 4
    steps: int = 28
    raw_steps: int = 1
    image_tokens: int = 4096
    layers: int = 57
    channels: int = 3072
    heads: int = 24
    batch: int = 1
    t_single_s: float = 28.06

    @property
    def rows(self) -> int:
        return self.rows_at(self.ranks)

    def rows_at(self, ranks: int) -> int:
        """K/V rows each of ``ranks`` ranks holds per layer (batch × its share of the tokens)."""
        return self.batch * self.image_tokens // ranks


@dataclass(frozen=True)
class ProjectionRow:
    method: str
    mbps_per_rank: float  # MB/s (10^6 B/s)
    bytes_per_tensor: float
    time_s: float
    basis: str  # "formula" or "measured"


def codec_nbytes(spec: str, rows: int, channels: int) -> int:
    """Exact fp16 payload bytes of ``spec`` for a ``(rows, channels)`` tensor."""
    from ccomm import make_codec

    return int(make_codec(spec).nbytes((rows, channels), torch.float16))


def _time(method: str, raw: float, comp: float, mbps: float, s: FluxSetting) -> float:
    link = Link(mbps * 8.0, 0.0)
    compute_step = s.t_single_s / s.ranks / s.steps
    mode = METHODS[method].mode
    if mode is None:
        return s.t_single_s
    if mode == "ring":
        def comm(nb: float) -> float:
            return s.layers * (s.ranks - 1) * cost.p2p_time(2 * nb, link)
    else:
        def comm(nb: float) -> float:
            return s.layers * cost.allgather_time(2 * nb, link, n=s.ranks, algo="ring")
    w = METHODS[method].raw(s.raw_steps)
    warm = w * (compute_step + comm(raw))
    rest = s.steps - w
    if mode == "distrifusion":
        return warm + rest * max(compute_step, comm(comp))
    return warm + rest * (compute_step + comm(comp))


def project(measured_ratio: dict[str, float | None], mbps: tuple[float, ...] = (500, 1000, 1500, 2000),
            setting: FluxSetting | None = None) -> list[ProjectionRow]:
    """Projected seconds per image for every method in ``measured_ratio`` (see the module docstring).

    ``measured_ratio[m]`` is the compression ratio measured for method ``m`` over its compressed
    steps (None or 1 for uncompressed methods); compressed methods get a ``formula`` row too.
    """
    s = setting or FluxSetting()
    raw = 2.0 * s.rows * s.channels
    rows: list[ProjectionRow] = []
    for method, ratio in measured_ratio.items():
        spec = METHODS[method]
        for b in mbps:
            if spec.compressed:
                formula = float(codec_nbytes(spec.codec, s.rows, s.channels))
                rows.append(ProjectionRow(method, b, formula, _time(method, raw, formula, b, s), "formula"))
                if ratio:
                    rows.append(ProjectionRow(method, b, raw / ratio, _time(method, raw, raw / ratio, b, s), "measured"))
            else:
                rows.append(ProjectionRow(method, b, raw if spec.parallel else 0.0, _time(method, raw, raw, b, s), "formula"))
    return rows
