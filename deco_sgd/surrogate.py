"""Convergence surrogate N(δ,τ) and its least-squares calibration (docs/design/deco_sgd.md#template-surrogate) [ours].

Iterations to reach ε = eps_rel·G², dimensionless, with r = σ²/G² and n workers:

    N(δ,τ) = a·r/(n·ε²) + b·sqrt(τ² + κ·Φ(δ,τ))/ε^{3/2} + c·(τ+1)/ε

Φ is one of the registered functions of :mod:`deco_sgd.phi`. κ (default 1) is the
multiplier that `fit_surrogate` calibrates together with b.

`fit_surrogate` (least squares on log steps-to-target):

1. Each sample is (δ, τ, steps) from a static run; Φ is evaluated at (δ, τ) and must be finite.
2. The model of a run's steps is s·N(δ,τ; b, κ): the scale s absorbs the unknown L·F₀/G²
   factor, which drops out of every argmin, so a, c, r, n, ε stay fixed.
3. Parameters are fitted in log space (log s, log b, log κ) so they stay positive; the
   residual is log steps − log(s·N).
4. Levenberg–Marquardt with an analytic Jacobian, started from a small grid of (b, κ)
   (the objective is not convex); the best end point wins.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .phi import PHI_FUNCTIONS, phi_value

if TYPE_CHECKING:
    from .config import DecoConfig

__all__ = ["SurrogateParams", "iterations", "FitResult", "fit_surrogate"]

logger = logging.getLogger(__name__)

_LM_ITERS = 200
_LM_TOL = 1e-12
_START_LOGS = (-4.0, -1.0, 2.0)  # log b and log κ starting points


@dataclass(frozen=True)
class SurrogateParams:
    """Constants of N(δ,τ); see the module docstring."""

    a: float = 1.0
    b: float = 1.0
    c: float = 1.0
    kappa: float = 1.0
    eps_rel: float = 0.05
    phi: str = "exp2"
    phi_base: float = 2.0

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "kappa"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: must be finite and >= 0, got {v!r}")
        if not (math.isfinite(self.eps_rel) and self.eps_rel > 0):
            raise ValueError(f"eps_rel: must be finite and > 0, got {self.eps_rel!r}")
        if self.phi not in PHI_FUNCTIONS:
            raise ValueError(f"phi: must be one of {sorted(PHI_FUNCTIONS)}, got {self.phi!r}")
        if not (math.isfinite(self.phi_base) and self.phi_base > 1):
            raise ValueError(f"phi_base: must be finite and > 1, got {self.phi_base!r}")

    @classmethod
    def from_config(cls, cfg: "DecoConfig") -> "SurrogateParams":
        return cls(cfg.a, cfg.b, cfg.c, cfg.kappa, cfg.eps_rel, cfg.phi, cfg.phi_base)


def iterations(p: SurrogateParams, delta: float, tau: int, r: float, n: int) -> float:
    """N(δ,τ); NaN when Φ is NaN (e.g. `reported` at δ = 1), inf when Φ diverges."""
    if not (math.isfinite(r) and r >= 0):
        raise ValueError(f"r: must be finite and >= 0, got {r!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be an integer >= 1, got {n!r}")
    ph = phi_value(p.phi, delta, tau, p.phi_base)
    e = p.eps_rel
    # κ·Φ with κ = 0 and Φ = inf would be NaN; an infinite Φ stays infinite.
    kphi = ph if (math.isinf(ph) or math.isnan(ph)) else p.kappa * ph
    return p.a * r / (n * e * e) + p.b * math.sqrt(tau * tau + kphi) / e**1.5 + p.c * (tau + 1) / e


@dataclass(frozen=True)
class FitResult:
    """Fitted b, κ and scale s of steps ≈ s·N, with the RMS of the log residuals."""

    b: float
    kappa: float
    scale: float
    rms_log_error: float
    n_samples: int

    def apply(self, cfg: "DecoConfig") -> "DecoConfig":
        """`cfg` with the fitted b and κ (the scale is not part of the argmin)."""
        return cfg.replace(b=self.b, kappa=self.kappa)


def _residuals(x: np.ndarray, y: np.ndarray, tau: np.ndarray, phi: np.ndarray, base_const: np.ndarray,
               e: float) -> tuple[np.ndarray, np.ndarray]:
    # N = A + b·sqrt(τ² + κΦ)/e^1.5 + C with A, C fixed per sample (base_const = A + C).
    ls, lb, lk = x
    b, k = math.exp(lb), math.exp(lk)
    root = np.sqrt(tau * tau + k * phi)
    mid = b * root / e**1.5
    nval = base_const + mid
    res = y - (ls + np.log(nval))
    jac = np.empty((len(y), 3))
    jac[:, 0] = -1.0
    jac[:, 1] = -mid / nval
    # d/dlogκ of b·sqrt(τ² + κΦ) = b·κΦ/(2·sqrt(...)); guard root = 0 (τ = 0, Φ = 0).
    with np.errstate(divide="ignore", invalid="ignore"):
        dk = np.where(root > 0, b * k * phi / (2 * root), 0.0) / e**1.5
    jac[:, 2] = -dk / nval
    return res, jac


def _lm(x0: np.ndarray, y: np.ndarray, tau: np.ndarray, phi: np.ndarray, base_const: np.ndarray,
        e: float) -> tuple[np.ndarray, float]:
    x = x0.copy()
    res, jac = _residuals(x, y, tau, phi, base_const, e)
    cost_ = float(res @ res)
    lam = 1e-3
    for _ in range(_LM_ITERS):
        jtj = jac.T @ jac
        g = jac.T @ res
        try:
            # Marquardt's scaling; the 1e-12 keeps a flat direction (e.g. κ with Φ ≈ 0) solvable.
            step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), -g)
        except np.linalg.LinAlgError:
            lam *= 4
            continue
        xn = np.clip(x + step, -50.0, 50.0)  # keep exp() finite
        rn, jn = _residuals(xn, y, tau, phi, base_const, e)
        cn = float(rn @ rn)
        if math.isfinite(cn) and cn < cost_:
            done = cost_ - cn < _LM_TOL * max(1.0, cost_)
            x, res, jac, cost_ = xn, rn, jn, cn
            lam = max(lam / 3, 1e-12)
            if done:
                break
        else:
            lam *= 4
            if lam > 1e12:
                break
    return x, cost_


def fit_surrogate(
    samples: Sequence[tuple[float, int, float]], cfg: "DecoConfig | SurrogateParams", *, r: float, n: int
) -> FitResult:
    """Fit b and κ (and a free scale) to (δ, τ, steps-to-target) samples; see the module docstring."""
    p = cfg if isinstance(cfg, SurrogateParams) else SurrogateParams.from_config(cfg)
    rows = [(float(d), int(t), float(s)) for d, t, s in samples]
    if len(rows) < 3:
        raise ValueError(f"samples: need at least 3 (δ, τ, steps) tuples for 3 parameters, got {len(rows)}")
    if any(not (math.isfinite(s) and s > 0) for _, _, s in rows):
        raise ValueError("samples: steps-to-target must be finite and > 0")
    phis = np.array([phi_value(p.phi, d, t, p.phi_base) for d, t, _ in rows])
    if not np.all(np.isfinite(phis)):
        bad = [rows[i][:2] for i in np.flatnonzero(~np.isfinite(phis))]
        raise ValueError(f"samples: Φ {p.phi!r} is not finite at (δ, τ) = {bad}")
    if not np.any(phis > 0):
        raise ValueError("samples: κ is not identifiable without a compressed (δ < 1) sample")
    tau = np.array([t for _, t, _ in rows], dtype=float)
    y = np.log([s for _, _, s in rows])
    e = p.eps_rel
    base_const = p.a * r / (n * e * e) + p.c * (tau + 1) / e
    best: tuple[np.ndarray, float] | None = None
    for lb in _START_LOGS:
        for lk in _START_LOGS:
            x0 = np.array([0.0, lb, lk])
            n0 = base_const + math.exp(lb) * np.sqrt(tau * tau + math.exp(lk) * phis) / e**1.5
            x0[0] = float(np.mean(y - np.log(n0)))  # best scale for this start, in closed form
            x, c = _lm(x0, y, tau, phis, base_const, e)
            if best is None or c < best[1]:
                best = (x, c)
    assert best is not None
    x, c = best
    out = FitResult(math.exp(x[1]), math.exp(x[2]), math.exp(x[0]), math.sqrt(c / len(rows)), len(rows))
    logger.info("fit_surrogate: b=%.4g kappa=%.4g scale=%.4g rms_log=%.3g on %d samples",
                out.b, out.kappa, out.scale, out.rms_log_error, out.n_samples)
    return out
