"""Estimators of the controller's inputs (docs/design/deco_sgd.md#estimators) [ours]: pure classes fed with numbers.

They see only what a rank observes (step times, timestamps of completed exchanges, gradient
norms), never the link configuration or a trace, so the controller is never an oracle. A
non-positive or non-finite sample is "unknown": it is counted in `rejected` and changes
nothing. The cross-rank reduction (MAX, MIN, SUM) is the caller's; see each class.

* `Ema`: exponential moving average, seeded with its first accepted sample (no bias to 0).
* `ComputeTimeEstimator` (MAX across ranks): EMA of step wall time minus time blocked on
  exchanges.
* `BandwidthEstimator` (MIN across ranks), per completed data exchange:
  1. start = max(t_launch + L̂, t_done_prev): the transfer cannot begin before its latency
     has passed, nor before the link finished the previous message (queueing correction);
  2. transfer = t_done − start; duration = t_done − max(t_launch, t_done_prev), the time
     the exchange was in charge of the link (queueing behind the previous one excluded);
  3. keep the sample only if transfer ≥ `min_transfer_frac`·duration (latency-dominated
     exchanges say nothing about bandwidth); sample = bytes/transfer, EMA (α 0.3);
  4. [ours] a rejected exchange still bounds B from below: its transfer took under
     `min_transfer_frac` of the duration, so B > bytes/(min_transfer_frac·duration);
     while no sample has been accepted and 4 were rejected, `value` is that lower bound;
  5. [ours] a step change: when `jump_samples` (2) samples in a row differ from the EMA by
     more than a factor `jump_factor` (2) in the same direction, the EMA restarts from the
     last sample. An EMA alone needs about five samples to follow a 10x drop, and at the
     old point each sample then takes a slow step.
     [ours] Excluding the queueing wait from the duration keeps the samples of a backlog,
     which are the most precise ones (transfer is then the gap between two completions).
  6. [ours] `settled`: the value is an EMA seeded at least `SETTLED_SAMPLES` samples ago. A
     lower bound, or the first samples of a (re)started EMA, are still converging: a move of
     B̂ from such a value is the estimate refining, not the link changing (the controller
     treats the two apart: a 38 → 100 Mbit/s climb on an unchanged 100 Mbit/s link, the bound
     giving way to samples, made it jump across its grid on the quick high-latency run).
* `LatencyEstimator` (MAX across ranks): per pattern, the minimum over the last `window`
  durations of a 1-element collective; the min-filter rejects queueing.
* `GradStatsEstimator`: G² = EMA of ‖g^i‖² (SUM/n across ranks) and
  σ² = n/(n−1)·(mean_i‖g^i‖² − ‖ḡ‖²), clamped ≥ 0, EMA; ‖ḡ‖² exact or sampled on S shared
  coordinates as (d/S)·‖ḡ_S‖² (`sampled_sq_norm`, `shared_coords`).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "Ema",
    "ComputeTimeEstimator",
    "BandwidthEstimator",
    "LatencyEstimator",
    "GradStatsEstimator",
    "shared_coords",
    "sampled_sq_norm",
]

logger = logging.getLogger(__name__)


#: Latency-dominated exchanges after which, with no accepted sample, B̂ is the lower bound.
LOWER_BOUND_AFTER = 4
#: Accepted samples since the EMA was (re)seeded after which B̂ counts as settled (at α 0.3
#: the seed then weighs 0.7² ≈ 0.5 of the value; a-priori, not fitted).
SETTLED_SAMPLES = 3


def _good(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
        raise ValueError(f"alpha: must be in (0, 1], got {alpha!r}")
    return float(alpha)


class Ema:
    """EMA over accepted (finite, positive, unless `allow_zero`) samples."""

    def __init__(self, alpha: float, allow_zero: bool = False) -> None:
        self.alpha = _alpha(alpha)
        self.allow_zero = allow_zero
        self.value: float | None = None
        self.count = 0
        self.rejected = 0

    def update(self, x: float) -> bool:
        ok = isinstance(x, (int, float)) and math.isfinite(x) and (x > 0 or (self.allow_zero and x == 0))
        if not ok:
            self.rejected += 1
            logger.debug("unknown sample %r ignored (%d so far)", x, self.rejected)
            return False
        x = float(x)
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        self.count += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "count": self.count, "rejected": self.rejected}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.value, self.count, self.rejected = sd["value"], int(sd["count"]), int(sd["rejected"])


class ComputeTimeEstimator:
    """T_comp: EMA (α 0.1) of step wall time minus time blocked waiting on exchanges."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.ema = Ema(alpha)

    def update(self, step_wall_s: float, blocked_s: float = 0.0) -> bool:
        if not (isinstance(blocked_s, (int, float)) and math.isfinite(blocked_s) and blocked_s >= 0):
            self.ema.rejected += 1
            return False
        return self.ema.update(step_wall_s - blocked_s)

    @property
    def value(self) -> float | None:
        return self.ema.value

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.ema.load_state_dict(sd)


class BandwidthEstimator:
    """B: bytes/s from completed exchanges with the queueing correction and transfer filter."""

    def __init__(self, alpha: float = 0.3, min_transfer_frac: float = 0.25, jump_factor: float = 2.0,
                 jump_samples: int = 2) -> None:
        if not (0.0 <= min_transfer_frac < 1.0):
            raise ValueError(f"min_transfer_frac: must be in [0, 1), got {min_transfer_frac!r}")
        if not (jump_factor > 1.0 and math.isfinite(jump_factor)):
            raise ValueError(f"jump_factor: must be finite and > 1, got {jump_factor!r}")
        if not (isinstance(jump_samples, int) and jump_samples >= 1):
            raise ValueError(f"jump_samples: must be an integer >= 1, got {jump_samples!r}")
        self.ema = Ema(alpha)
        self.jump_factor, self.jump_samples = float(jump_factor), jump_samples
        self._jump = 0  # consecutive samples past the factor: > 0 above, < 0 below
        self._since_seed = 0  # accepted samples since the EMA was (re)seeded
        self.min_transfer_frac = float(min_transfer_frac)
        self.last_done: float | None = None
        self.filtered = 0  # samples dropped because latency dominated them
        #: [ours] max over filtered exchanges of bytes / duration: a lower bound on B.
        self.lower_bound: float | None = None

    def update(self, nbytes: float, t_launch: float, t_done: float, latency: float | None = None) -> bool:
        """Feed one completed exchange (completion order); True when it gave a sample."""
        times_ok = all(isinstance(t, (int, float)) and math.isfinite(t) for t in (t_launch, t_done))
        if not times_ok or t_done <= t_launch or (self.last_done is not None and t_done < self.last_done):
            self.ema.rejected += 1
            return False
        lat = latency if latency is not None and math.isfinite(latency) and latency >= 0 else 0.0
        prev = self.last_done
        self.last_done = t_done  # the link is free from here, whatever this sample is worth
        if not _good(nbytes):
            self.ema.rejected += 1
            return False
        start = t_launch + lat if prev is None else max(t_launch + lat, prev)
        transfer = t_done - start
        duration = t_done - (t_launch if prev is None else max(t_launch, prev))
        if transfer <= 0 or transfer < self.min_transfer_frac * duration:
            self.filtered += 1
            # Still a lower bound: the transfer took less than min_transfer_frac of the
            # duration (that is why it was filtered), so B > V/(frac·duration). V/duration,
            # the bound used before, counts the latency as transfer time, and the time model
            # then charges that latency a second time (L_eff + V/B̂): on a 150 ms link it read
            # 2.7 Mbit/s for 100 Mbit/s and drove the first decisions to the smallest δ.
            span = self.min_transfer_frac * duration if self.min_transfer_frac > 0 else duration
            lb = nbytes / span if span > 0 else None
            if lb is not None and math.isfinite(lb):
                self.lower_bound = lb if self.lower_bound is None else max(self.lower_bound, lb)
            logger.debug("latency-dominated exchange (%.3g of %.3g s transfer) not used for bandwidth",
                         transfer, duration)
            return False
        return self._feed(nbytes / transfer)

    def _feed(self, x: float) -> bool:
        v = self.ema.value
        if v is not None and _good(x):
            side = 1 if x > self.jump_factor * v else (-1 if x * self.jump_factor < v else 0)
            # Count consecutive samples past the factor on one side; any other sample resets.
            self._jump = self._jump + side if side and self._jump * side > 0 else side
            if abs(self._jump) >= self.jump_samples:
                self._jump = 0
                self.ema.value = None  # restart: the next update seeds the EMA with x
        if self.ema.value is None:
            self._since_seed = 0
        ok = self.ema.update(x)
        self._since_seed += int(ok)
        return ok

    @property
    def settled(self) -> bool:
        """True when `value` is an EMA seeded at least `SETTLED_SAMPLES` samples ago (step 6)."""
        return self.ema.value is not None and self._since_seed >= SETTLED_SAMPLES

    @property
    def value(self) -> float | None:
        """The EMA; while no exchange has passed the filter but `LOWER_BOUND_AFTER` were
        latency-dominated, the lower bound (small payloads on a slow-latency link never show
        their transfer time, and the controller must still be able to decide)."""
        if self.ema.value is None and self.filtered >= LOWER_BOUND_AFTER:
            return self.lower_bound
        return self.ema.value

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "last_done": self.last_done, "filtered": self.filtered,
                "jump": self._jump, "lower_bound": self.lower_bound, "since_seed": self._since_seed}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.ema.load_state_dict(sd["ema"])
        self.last_done, self.filtered = sd["last_done"], int(sd["filtered"])
        self._jump = int(sd.get("jump", 0))
        self.lower_bound = sd.get("lower_bound")
        # Older checkpoints did not count: an EMA they hold is taken as settled.
        self._since_seed = int(sd.get("since_seed", SETTLED_SAMPLES if self.ema.value is not None else 0))


class LatencyEstimator:
    """L_eff per pattern: min over the last `window` durations of a 1-element collective."""

    def __init__(self, window: int = 50) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window: must be an integer >= 1, got {window!r}")
        self.window = window
        self.samples: dict[str, deque[float]] = {}
        self.rejected = 0

    def update(self, pattern: str, duration_s: float) -> bool:
        if not _good(duration_s):
            self.rejected += 1
            return False
        self.samples.setdefault(pattern, deque(maxlen=self.window)).append(float(duration_s))
        return True

    def value(self, pattern: str) -> float | None:
        q = self.samples.get(pattern)
        return min(q) if q else None

    def state_dict(self) -> dict[str, Any]:
        samples = {k: list(v) for k, v in self.samples.items()}
        return {"window": self.window, "samples": samples, "rejected": self.rejected}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd["window"] != self.window:
            raise ValueError(f"state_dict: window {sd['window']} differs from {self.window}")
        self.samples = {k: deque(v, maxlen=self.window) for k, v in sd["samples"].items()}
        self.rejected = int(sd["rejected"])


def shared_coords(d: int, s: int, seed: int, step: int) -> np.ndarray:
    """The S coordinates (sorted, without replacement) every rank samples at `step`."""
    if d < 1 or s < 1:
        raise ValueError(f"d, s: must be >= 1, got d={d}, s={s}")
    rng = np.random.default_rng([seed, step])
    return np.sort(rng.choice(d, size=min(s, d), replace=False))


def sampled_sq_norm(sum_on_coords: np.ndarray, n: int, d: int) -> float:
    """‖ḡ‖² ≈ (d/S)·‖ḡ_S‖² from the SUM over ranks of the gradients on S shared coordinates."""
    v = np.asarray(sum_on_coords, dtype=np.float64) / n
    return float(d / v.size * (v @ v))


class GradStatsEstimator:
    """G² (EMA of ‖g^i‖²) and σ² (between-worker variance, EMA) for n workers; r = σ²/G²."""

    def __init__(self, n_workers: int, alpha: float = 0.1) -> None:
        if not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"n_workers: must be an integer >= 1, got {n_workers!r}")
        self.n = n_workers
        self.g2 = Ema(alpha)
        self.sigma2 = Ema(alpha, allow_zero=True)  # identical gradients give a true 0

    def update(self, mean_sq_norm: float, mean_grad_sq_norm: float | None = None) -> None:
        """mean_i‖g^i‖² (SUM/n across ranks) and ‖ḡ‖² (exact or sampled); None skips σ²."""
        if not self.g2.update(mean_sq_norm) or mean_grad_sq_norm is None or self.n == 1:
            return  # σ² needs n ≥ 2 and a valid mean norm
        if not (math.isfinite(mean_grad_sq_norm) and mean_grad_sq_norm >= 0):
            self.sigma2.rejected += 1
            return
        self.sigma2.update(max(0.0, self.n / (self.n - 1) * (mean_sq_norm - mean_grad_sq_norm)))

    @property
    def r(self) -> float | None:
        """σ²/G², None until both are known."""
        if self.g2.value is None or self.sigma2.value is None:
            return None
        return self.sigma2.value / self.g2.value

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "g2": self.g2.state_dict(), "sigma2": self.sigma2.state_dict()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd["n"] != self.n:
            raise ValueError(f"state_dict: saved for {sd['n']} workers, this estimator has {self.n}")
        self.g2.load_state_dict(sd["g2"])
        self.sigma2.load_state_dict(sd["sigma2"])
