"""Convergence side of the objective from quantities measured in the run (issue 14) [ours].

The controller minimises W(δ, τ, v) = S(δ, τ, v) · T_iter(δ, τ, v): T_iter is the time model,
S the predicted number of steps to target relative to the point in force's reference
(S = 1 for plain D-SGD). Nothing here is fitted to a task; every input is measured while
training, on every rank alike (`deco_sgd.adaptive`):

- **φ, the signal fraction** of ‖ḡ‖², from the same sample (between-rank variance σ²);
  reported in the decision log, no longer a factor of S (D below counts signal only).
- **ρ, the relative drift of the mean gradient per step** (delay-compensated ASGD treats this
  change over the delay as the cost of staleness): on S coordinates every rank samples from
  a shared seed, ρ² = (‖ḡ_t − ḡ_{t−1}‖² − 2σ²/n) / (‖ḡ‖² − σ²/n), the sampling noise of two
  independent mini-batches removed. At the edge of stability the sharpest direction flips
  sign every step and ρ approaches 2.
- **D, the held-back signal** (the error-feedback gap): the mean residual over ranks after
  the previous step, projected on the current mean gradient, in units of one step of its
  signal, D = ⟨ē_{t−1}, ḡ_t⟩ / (‖ḡ_t‖² − σ²/n) on the shared sample (`held_back_signal`).
  With error feedback, compression delays gradient mass: D is how many steps' worth of the
  current descent direction is held back at the δ in force. The first version divided the
  residual's norm by the gradient's, ‖ē‖/‖ḡ‖ (times φ in S), which counts the noise the
  residual accumulates: on the byte-level LM it read up to 4.7 where the projection reads
  0.55–0.86. The driver keeps the latest reading of every point it has run
  (`predicted_gap` combines them).
- **the energy profile**: q(δ), the (1 − δ)-quantile of |g| on a local sample, averaged over
  ranks. A coordinate's residual grows until it crosses the top-k threshold, so the gap at
  another δ' is predicted as D(δ') = D(δ)·q(δ')/q(δ).
- **quantized values**: the relative energy error err of the format's `quantize` codec on the
  top-δ values of the same local sample, measured per δ (heavy-tailed values quantize badly:
  one large value stretches a bucket's range). Before it is measured, b-bit min-max
  quantization of a bucket spanning about 6 standard deviations is assumed, 3/(2^b − 1)²
  (fp16: 2^-22). The format sends (1 − err) of the kept energy and error feedback returns
  the rest a step later: D(δ, v) = (D(δ) + √err)/(1 − err).

Steps to target relative to D-SGD, the product of a staleness and a compression factor:

    S(δ, τ, v) = (1 + τ·ρ/4) · (1 + D(δ, v)·ρ/4)

- 1 + τ·ρ/4: a stale gradient is off by the drift over τ steps. Pure oscillation (ρ = 2)
  costs half a step per step of staleness, a smooth path (ρ → 0) almost nothing. Stale
  gradients of an oscillating direction can destabilise it, which this first-order prior
  cannot see: the progress monitor (`deco_sgd.monitor`) checks every switch and the
  controller backs off.
- 1 + D·ρ/4: error feedback delays the signal it holds back by about D steps, which costs
  like staleness. Held-back noise costs nothing here: when noise dominates, compression is
  nearly free, as in the error-feedback SGD rates, where the compression term is of higher
  order than the noise term.

The one slope (1/4 per step of delay per unit of drift) is an a-priori choice, not fitted to
any task; the monitor's measured progress is what protects a run when it is wrong.

**How sure is ρ?** [ours] S coordinates make a noisy reading where sampling noise dominates
(the first reading of one task read 0.0, 0.31 and 0.71 on three seeds). The sample is split
into `DRIFT_BLOCKS` blocks of random coordinates, each with its own noise correction from
the per-coordinate spread over ranks (`drift_blocks`), and a delete-one-block jackknife of
the ratio ρ² = Σ drift² / Σ signal gives a standard error (`ratio_bounds`). The cost side of
S uses the upper bound ρ + `DRIFT_Z`·se: a reading that could be far larger than its point
value does not make staleness or compression look free. The stability guard keeps the
point value: guarding with the lower bound let through τ raises whose loss then rose.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .config import QUANT_BITS

__all__ = ["ConvergenceInputs", "DRIFT_BLOCKS", "DRIFT_Z", "drift_blocks", "format_error", "held_back_signal",
           "measured_format_error",
           "predicted_gap", "ratio_bounds", "slowdown", "STALENESS_SLOPE", "stability_limit", "shown_drift",
           "step_curvature"]

#: Steps of slowdown per step of staleness, per unit of drift ρ.
STALENESS_SLOPE = 0.25
#: Blocks of the shared-coordinate sample for the jackknife of ρ (a-priori, not fitted).
DRIFT_BLOCKS = 8
#: Standard errors above the point value of ρ that the cost side of S uses.
DRIFT_Z = 1.0


@dataclass(frozen=True)
class ConvergenceInputs:
    """Measured inputs (None: not measured yet).

    drift: ρ; gap: D at (gap_ratio, gap_values), the point it was measured at;
    quantiles: δ -> q(δ) for δ < 1.
    """

    drift: float | None = None
    gap: float | None = None
    gap_ratio: float | None = None
    gap_values: str = "fp32"
    quantiles: Mapping[float, float] | None = None
    signal: float | None = None
    quant_errors: Mapping[tuple[float, str], float] | None = None
    #: The staleness in force while `drift` was measured (a delay changes the drift it shows).
    drift_staleness: int = 0
    #: Confidence bounds of ρ (same staleness), None when unknown: the cost side uses the
    #: upper one; the lower one is for the decision log.
    drift_lo: float | None = None
    drift_hi: float | None = None
    #: The latest reading of D at every point run so far, (δ, v) -> D (`predicted_gap`
    #: combines them with `gap`, the current one).
    gaps: Mapping[tuple[float, str], float] | None = None


def drift_blocks(g_t: np.ndarray, g_prev: np.ndarray, sq: np.ndarray, n: int,
                 blocks: int = DRIFT_BLOCKS) -> tuple[np.ndarray, np.ndarray]:
    """Per block of sample coordinates: (Σ noise-corrected drift², Σ noise-corrected signal).

    g_t, g_prev: the mean gradient over n ranks on the sample at two consecutive steps;
    sq: per coordinate, the sum over ranks of g_i,t² + g_i,prev². The between-rank variance
    of each coordinate, σ_j² = n/(n − 1)·(sq_j/(2n) − (g_t,j² + g_prev,j²)/2), is removed
    coordinate by coordinate (unclamped: the block sums stay unbiased), as the module
    docstring does for the whole sample: drift_j² = (g_t,j − g_prev,j)² − 2σ_j²/n and
    signal_j = (g_t,j² + g_prev,j²)/2 − σ_j²/n. The sample's coordinates are random, so
    contiguous blocks are random blocks.
    """
    if n < 2:
        raise ValueError(f"n: need at least 2 ranks for a between-rank variance, got {n}")
    gbar2 = 0.5 * (g_t * g_t + g_prev * g_prev)
    sigma2 = n / (n - 1) * (sq / (2 * n) - gbar2)
    drift2 = (g_t - g_prev) ** 2 - 2.0 * sigma2 / n
    signal2 = gbar2 - sigma2 / n
    parts = np.array_split(np.arange(len(g_t)), max(1, min(blocks, len(g_t))))
    return (np.array([float(drift2[p].sum()) for p in parts]), np.array([float(signal2[p].sum()) for p in parts]))


def held_back_signal(e_prev: np.ndarray, g_t: np.ndarray, signal2: float) -> tuple[float, float]:
    """(numerator, denominator) of the held-back signal D = ⟨ē_{t−1}, ḡ_t⟩ / (‖ḡ_t‖² − σ²/n).

    e_prev: the mean error-feedback residual over ranks after step t − 1; g_t: the mean
    gradient at step t; signal2: the noise-corrected ‖ḡ‖² of the same sample. The residual
    predates step t's mini-batches, so their noise averages out of the product (the residual
    after step t would hold g_t's own unsent noise and read it as signal), and the noise the
    residual itself holds, most of its norm at small δ, is orthogonal to the signal on
    average. The driver keeps EMAs of both parts: a ratio of EMAs is steadier."""
    return float(np.dot(e_prev, g_t)), float(signal2)


def ratio_bounds(num: np.ndarray, den: np.ndarray, z: float = DRIFT_Z) -> tuple[float, float, float] | None:
    """(point, low, high) of √(Σnum/Σden) from per-block sums, by a delete-one-block jackknife
    of the ratio Σnum/Σden ± z standard errors (clamped at 0); None without signal."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    tn, td = float(num.sum()), float(den.sum())
    if not td > 0:
        return None
    r = max(0.0, tn / td)
    b = len(num)
    if b < 2:
        return math.sqrt(r), math.sqrt(r), math.sqrt(r)
    loo_den = td - den
    if not np.all(loo_den > 0):
        return math.sqrt(r), 0.0, math.inf  # one block carries all the signal: no bound
    loo = (tn - num) / loo_den
    se = math.sqrt((b - 1) / b * float(((loo - loo.mean()) ** 2).sum()))
    return math.sqrt(r), math.sqrt(max(0.0, r - z * se)), math.sqrt(max(0.0, r + z * se))


def stability_limit(tau: int) -> float:
    """Largest step curvature a = ηλ for which gradient descent with its gradient τ steps
    stale converges on a quadratic: x_{t+1} = x_t − a·x_{t−τ} is stable iff
    a < 2·sin(π / (2(2τ + 1))) (2 at τ = 0, 1 at τ = 1, 0.618 at τ = 2, 0.445 at τ = 3)."""
    if tau < 0:
        raise ValueError(f"tau: must be >= 0, got {tau!r}")
    return 2.0 * math.sin(math.pi / (2 * (2 * tau + 1)))


def _dominant_root(a: float, tau: int) -> complex:
    # Root of largest modulus of z^(τ+1) − z^τ + a = 0, the characteristic polynomial of
    # x_{t+1} = x_t − a·x_{t−τ}.
    coeffs = np.zeros(tau + 2)
    coeffs[0], coeffs[1] = 1.0, -1.0
    coeffs[-1] += a
    roots = np.roots(coeffs)
    return complex(roots[int(np.argmax(np.abs(roots)))])


def shown_drift(a: float, tau: int) -> float:
    """The relative change per step |z − 1| of the slowest mode of a quadratic direction with
    step curvature `a` under staleness τ: what the drift measurement reads there (a at τ = 0)."""
    if tau == 0:
        return a
    return abs(_dominant_root(a, tau) - 1.0)


@functools.lru_cache(maxsize=64)
def step_curvature(drift: float, tau: int) -> float:
    """The step curvature a = ηλ that shows `drift` under staleness τ (inverse of
    `shown_drift`, monotone in a on [0, 2]; capped at 2, where even τ = 0 stops converging).

    A delay makes a direction oscillate (complex roots), so the same curvature shows a larger
    drift at τ > 0 than at τ = 0: the drift must be read back to a before it is compared
    across staleness levels. Cached: a decision asks it once per candidate with the same
    measured drift, and each answer costs 40 polynomial root solves."""
    if tau == 0 or drift <= 0:
        return max(0.0, drift)
    hi = 2.0
    if shown_drift(hi, tau) <= drift:
        return hi
    lo = 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if shown_drift(mid, tau) < drift:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def format_error(values: str) -> float:
    """Relative energy error of one value format (see the module docstring)."""
    if values in QUANT_BITS:
        return 3.0 / float((1 << QUANT_BITS[values]) - 1) ** 2
    if values in ("fp16", "bf16"):
        return 2.0 ** (-22 if values == "fp16" else -16)
    return 0.0


def measured_format_error(c: ConvergenceInputs, delta: float, values: str) -> float:
    """The measured error of a quantized format at δ (`quant_errors`), else the a-priori one."""
    if values in QUANT_BITS and c.quant_errors is not None and (delta, values) in c.quant_errors:
        return min(1.0, max(0.0, float(c.quant_errors[(delta, values)])))
    return format_error(values)


def _with_format(base: float, err: float) -> float:
    # A format that loses a fraction err of the kept energy sends (1 − err) of it: the gap
    # grows by that factor, plus the √err of one step error feedback returns later.
    return math.inf if err >= 1.0 else (base + math.sqrt(err)) / (1.0 - err)


def _moved_gap(c: ConvergenceInputs, gap: float, ratio: float, values: str, delta: float, err: float) -> float | None:
    """One reading D at (ratio, values) moved to (δ, v): the format removed, scaled by the
    energy profile, the new format's error added; None without a profile entry."""
    e0 = measured_format_error(c, ratio, values)
    base = max(0.0, gap * (1.0 - e0) - math.sqrt(e0)) if e0 < 1.0 else 0.0
    if delta != ratio:
        q = c.quantiles or {}
        qd, qr = q.get(delta), q.get(ratio)
        if qd is None or qr is None or not (qr > 0):
            return None
        base *= qd / qr
    return _with_format(base, err)


def predicted_gap(c: ConvergenceInputs, delta: float, values: str) -> float | None:
    """D(δ, v); 0 at δ = 1 with fp32; None when no gap or profile has been measured.

    Every reading (the current one and the latest of each earlier point in `gaps`) is moved
    to δ by the energy profile. A smaller δ holds back at least as much, so the readings taken
    at δ or above are lower bounds and the largest of them is the prediction. Only when every
    reading comes from below δ is the nearest one used. The profile's scaling alone is not enough:
    right after a large δ the residual is nearly empty (D ≈ 0), and 0 scales to 0 at any δ,
    which made a tiny δ look free (seen on the quick high-latency run: 0.2 → 0.001)."""
    err = measured_format_error(c, delta, values)
    if delta >= 1.0:
        return _with_format(0.0, err)
    readings = dict(c.gaps or {})
    if c.gap is not None and c.gap_ratio is not None and c.gap_ratio < 1.0:
        readings[(c.gap_ratio, c.gap_values)] = c.gap  # the latest reading of its point
    above = [(r, v, g) for (r, v), g in readings.items() if r >= delta]
    if above:
        moved = [_moved_gap(c, g, r, v, delta, err) for r, v, g in above]
        known = [x for x in moved if x is not None]
        return max(known) if known else None
    if not readings:
        return None
    r, v = max(readings)  # every reading is below δ: the nearest one
    return _moved_gap(c, readings[(r, v)], r, v, delta, err)


def slowdown(c: ConvergenceInputs, delta: float, tau: int, values: str, *, drift_prior: float,
             drift_floor: float, tau_now: int = 0) -> float:
    """S(δ, τ, v) of the module docstring; inf when the gap cannot be predicted yet, or when
    τ is above `tau_now` (the staleness in force) and the measured step curvature reaches its
    stability limit. τ ≤ `tau_now` is not guarded: training adapts its sharpness to the
    optimizer in use (it rises until the step curvature reaches that optimizer's limit, the
    edge of stability), so at the point in force the curvature sits near its own limit by
    design, and the progress monitor judges it; what the limit predicts is the loss spike
    of raising τ into a region the current sharpness cannot survive."""
    drift = c.drift if c.drift is not None and math.isfinite(c.drift) and c.drift >= 0 else None
    a = drift_prior if drift is None else max(drift_floor, step_curvature(drift, c.drift_staleness))
    if tau > tau_now and a >= stability_limit(tau):
        return math.inf
    gap = predicted_gap(c, delta, values)
    if gap is None:
        return math.inf
    # The cost side takes the upper confidence bound of the drift (module docstring).
    hi = c.drift_hi
    if drift is not None and hi is not None and math.isfinite(hi) and hi > drift:
        # Capped at 2: step_curvature returns a drift read at τ = 0 as it is.
        a = max(a, min(2.0, step_curvature(hi, c.drift_staleness)))
    return (1.0 + tau * a * STALENESS_SLOPE) * (1.0 + gap * a * STALENESS_SLOPE)
