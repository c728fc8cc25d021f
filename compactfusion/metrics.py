"""Quality and traffic metrics of CompactFusion runs (docs/design/compactfusion.md#metrics).

Image metrics compare generated digits against a reference run (normally the uncompressed
parallel output of the same mode, P and seed). Both take batches (B, C, H, W) in `value_range`
(default [−1, 1], the range `compactfusion.models.sample` returns) and return one value per image
(float64 tensor of shape (B,)):

* `psnr`: 1. map both to [0, 1]; 2. centre-crop to `crop`×`crop` (28: the digit without the
  32-pixel padding); 3. MSE over C, H, W; 4. 10·log10(1 / MSE) (data range 1), +inf when equal.
* `ssim` (Wang et al. 2004): steps 1–2 as above; 3. local means, variances and covariance with an
  11×11 Gaussian window (σ 1.5, normalised to sum 1) over "valid" positions only (no padding:
  an 18×18 map on 28×28); 4. map = (2μaμb + C1)(2σab + C2) / ((μa² + μb² + C1)(σa² + σb² + C2)),
  C1 = (0.01·L)², C2 = (0.03·L)², L = 1; 5. mean over the map and the channels. All in float64.
  No clamping: inputs outside the range are scored as they are.

Traffic: `compression_ratio(reference_bytes, actual_bytes)` (reference = bytes of `none` in the
same wire dtype) and `analytic_compression_ratio(codec, shape, dtype)` = raw bytes of a (N, C)
tensor / the codec's exact `nbytes` (the formulas of docs/design/compactfusion.md#codec-contract).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.nn import functional as F

from ccomm import make_codec

__all__ = ["psnr", "ssim", "gaussian_window", "to_unit_crop", "compression_ratio", "analytic_compression_ratio",
           "SSIM_WINDOW", "SSIM_SIGMA", "SSIM_K1", "SSIM_K2", "DEFAULT_CROP"]


SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DEFAULT_CROP = 28


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError("a, b: must be torch tensors")
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"a, b: must both be (B, C, H, W) of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def to_unit_crop(x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
                 crop: int | None = DEFAULT_CROP) -> torch.Tensor:
    """float64 copy of (B, C, H, W) `x` mapped from `value_range` to [0, 1], centre-cropped to `crop`."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range: need hi > lo, got {value_range!r}")
    x = (x.detach().to(torch.float64) - lo) / (hi - lo)
    if crop is None:
        return x
    h, w = x.shape[-2:]
    if isinstance(crop, bool) or not isinstance(crop, int) or not 1 <= crop <= min(h, w):
        raise ValueError(f"crop: must be an int in [1, {min(h, w)}] or None, got {crop!r}")
    top, left = (h - crop) // 2, (w - crop) // 2
    return x[..., top:top + crop, left:left + crop]


def psnr(a: torch.Tensor, b: torch.Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0),
         crop: int | None = DEFAULT_CROP) -> torch.Tensor:
    """Per-image PSNR in dB (data range 1 after mapping to [0, 1]); +inf for identical images."""
    _check_pair(a, b)
    x, y = to_unit_crop(a, value_range, crop), to_unit_crop(b, value_range, crop)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)  # mse = 0 gives +inf, as it should


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(size, size) float64 Gaussian centred on the middle pixel, normalised to sum 1."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(r ** 2) / (2.0 * sigma ** 2))
    w = torch.outer(g, g)
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0),
         crop: int | None = DEFAULT_CROP) -> torch.Tensor:
    """Per-image SSIM (11×11 Gaussian σ 1.5, K1 0.01, K2 0.03, data range 1, valid window positions)."""
    _check_pair(a, b)
    x, y = to_unit_crop(a, value_range, crop), to_unit_crop(b, value_range, crop)
    n, c, h, w = x.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"a, b: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} after cropping, got {h}x{w}")
    win = gaussian_window().to(x.device).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, win, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x ** 2
    var_y = filt(y * y) - mu_y ** 2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return smap.flatten(1).mean(dim=1)


def compression_ratio(reference_bytes: int | float, actual_bytes: int | float) -> float:
    """reference / actual (e.g. bytes of `none` in the same wire dtype over bytes actually sent)."""
    if not reference_bytes >= 0 or not actual_bytes > 0:
        raise ValueError(f"reference_bytes >= 0 and actual_bytes > 0 required, got {reference_bytes!r}, {actual_bytes!r}")
    return float(reference_bytes) / float(actual_bytes)


def analytic_compression_ratio(codec: str, shape: Sequence[int], dtype: torch.dtype = torch.float16) -> float:
    """Raw bytes of a tensor of `shape` in `dtype` over `make_codec(codec).nbytes(shape, dtype)`."""
    raw = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return compression_ratio(raw, make_codec(codec).nbytes(tuple(shape), dtype))
