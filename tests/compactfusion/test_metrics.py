"""compactfusion.metrics: PSNR / SSIM identities, hand-computed values, crop, and byte ratios."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compactfusion import metrics
from compactfusion.metrics import analytic_compression_ratio, compression_ratio, gaussian_window, psnr, ssim


def _rand(seed: int, shape=(3, 1, 32, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


def test_identical_images_give_inf_psnr_and_unit_ssim() -> None:
    a = _rand(0)
    assert torch.isinf(psnr(a, a.clone())).all() and (psnr(a, a) > 0).all()
    torch.testing.assert_close(ssim(a, a.clone()), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_psnr_of_a_known_error_level() -> None:
    # A ±0.2 checkerboard error in [-1, 1] is ±0.1 in [0, 1]: MSE = 0.01 exactly -> 20 dB.
    a = torch.zeros(2, 1, 32, 32)
    sign = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2 - 1
    b = a + 0.2 * sign
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0, dtype=torch.float64), rtol=0, atol=1e-6)
    # value_range (0, 1): the same tensors now differ by 0.2 -> 10*log10(1/0.04).
    torch.testing.assert_close(psnr(a, b, value_range=(0.0, 1.0)),
                               torch.full((2,), 10 * math.log10(25.0), dtype=torch.float64), rtol=0, atol=1e-6)


def test_psnr_of_gaussian_noise_matches_its_variance() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.zeros(4, 1, 32, 32)
    sigma = 0.05  # in [0, 1] units -> expected PSNR = -20 log10(sigma) = 26.02 dB
    b = a + 2 * sigma * torch.randn(a.shape, generator=g)
    got = psnr(a, b)
    assert got.shape == (4,)
    assert (got - (-20 * math.log10(sigma))).abs().max() < 0.5  # 784 samples: MSE within ~10 %


def test_metrics_use_only_the_centre_crop() -> None:
    a = _rand(2)
    b = a.clone()
    b[..., :2, :] = 5.0  # the 2-pixel padding ring only
    b[..., :, -2:] = -7.0
    assert torch.isinf(psnr(a, b)).all()
    torch.testing.assert_close(ssim(a, b), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.isfinite(psnr(a, b, crop=None)).all()
    assert (ssim(a, b, crop=None) < 1).all()


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # Constant images have zero variance and covariance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    ca, cb = 0.3, 0.7
    a = torch.full((1, 1, 28, 28), ca, dtype=torch.float64)
    b = torch.full((1, 1, 28, 28), cb, dtype=torch.float64)
    c1 = 0.01 ** 2
    expected = (2 * ca * cb + c1) / (ca ** 2 + cb ** 2 + c1)
    got = ssim(a, b, value_range=(0.0, 1.0))
    assert abs(float(got) - expected) < 1e-12


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Loop-by-loop SSIM of two 2-D [0, 1] images over every valid 11x11 window position."""
    r = np.arange(11) - 5.0
    g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx = (w * (px - mx) ** 2).sum()
            vy = (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert len(vals) == 18 * 18
    return float(np.mean(vals))


def test_ssim_matches_a_loop_reference() -> None:
    a = _rand(3, (2, 1, 32, 32))
    b = (a + 0.3 * _rand(4, (2, 1, 32, 32))).clamp(-1, 1)
    got = ssim(a, b)
    for k in range(2):
        x = ((a[k, 0, 2:30, 2:30].double() + 1) / 2).numpy()
        y = ((b[k, 0, 2:30, 2:30].double() + 1) / 2).numpy()
        assert abs(float(got[k]) - _ssim_reference(x, y)) < 1e-10


def test_ssim_is_symmetric_bounded_and_falls_with_noise() -> None:
    a = _rand(5, (1, 1, 32, 32))
    vals = []
    for level in (0.05, 0.2, 0.8):
        b = a + level * _rand(6, (1, 1, 32, 32))
        s = ssim(a, b)
        torch.testing.assert_close(s, ssim(b, a), rtol=0, atol=1e-12)
        assert float(s) < 1.0
        vals.append(float(s))
    assert vals[0] > vals[1] > vals[2]


def test_gaussian_window_is_normalised_and_peaked() -> None:
    w = gaussian_window()
    assert w.shape == (11, 11) and abs(float(w.sum()) - 1.0) < 1e-12
    assert int(w.argmax()) == 5 * 11 + 5
    torch.testing.assert_close(w, w.T)


@pytest.mark.parametrize("bad", [
    lambda: psnr(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 30)),
    lambda: psnr(torch.zeros(32, 32), torch.zeros(32, 32)),
    lambda: ssim(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), crop=40),
    lambda: ssim(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), crop=8),
    lambda: psnr(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), value_range=(1.0, 1.0)),
    lambda: compression_ratio(10, 0),
])
def test_bad_inputs_raise_value_error(bad) -> None:
    with pytest.raises(ValueError):
        bad()


def test_compression_ratios() -> None:
    assert compression_ratio(800, 100) == 8.0
    n, c, b = 1024, 3072, 2
    # the formulas of docs/design/compactfusion.md#codec-contract at the FLUX shape (table column "vs fp16")
    assert analytic_compression_ratio("int2", (n, c)) == pytest.approx(n * c * b / ((n + c) * b + math.ceil(n * c / 4)))
    assert analytic_compression_ratio("binary", (n, c)) == pytest.approx(n * c * b / ((n + c) * b + math.ceil(n * c / 8)))
    assert round(analytic_compression_ratio("int2", (n, c)), 1) == 7.9
    assert round(analytic_compression_ratio("binary", (n, c)), 1) == 15.7
    assert analytic_compression_ratio("identity", (64, 128), torch.float32) == 1.0
    assert set(metrics.__all__) >= {"psnr", "ssim", "compression_ratio"}
