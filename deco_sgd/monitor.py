"""`ProgressMonitor`: is the (δ, τ) in force still making the progress it was chosen for? [ours]

Safe adaptation (issue 14, item 2). The controller switches to a point because it predicts
a shorter wall time to target, accepting a predicted per-step slowdown S_new/S_old. The
monitor checks that prediction against training progress measured in the run:

1. `observe(step, loss)` takes the loss averaged over ranks and over the steps of one
   measurement period (replicated: every rank feeds the same number) and keeps an EMA.
2. Progress per step is the slope of that EMA: a least-squares line through the points of
   a window. The *reference* slope is the one of the last point that was judged good.
3. `on_switch(step, expected)` opens a trial: `expected` = S_new/S_old is the slowdown of
   progress per step the controller accepted. After `settle` steps (the pipeline refills and
   the old point's in-flight gradients drain) the trial's slope is measured over `window`.
4. `verdict(step)`:
   - "rise": the loss EMA rose more than `rise` (relative) above its value at the switch,
     at any time during the trial: the point is unstable;
   - "slow": the trial's slope fell below (1 − tolerance) × reference / expected;
   - "ok": the trial passed; its slope becomes the reference;
   - "pending": still settling or measuring (or no reference yet).
   A trial opened before any reference exists (the first decision comes within a few
   steps, before a window of losses) is judged on "rise" only, and its slope becomes the
   first reference.

A falling learning curve flattens by itself, which biases "slow" against the newer point;
the default tolerance (0.75: back off below a quarter of the predicted progress) keeps that
bias from triggering back-offs on healthy switches. The controller acts on "rise" and
"slow" (`deco_sgd.controller`): it backs off and remembers the bad region.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["ProgressMonitor", "slope"]


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope d(loss)/d(step) of (step, loss) points; None with < 2 distinct steps."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


class ProgressMonitor:
    """Loss-EMA progress check of the point in force; see the module docstring."""

    __slots__ = ("alpha", "tolerance", "rise", "window", "ema", "history", "ref_slope", "trial")

    def __init__(self, alpha: float = 0.3, tolerance: float = 0.75, rise: float = 0.1, window: int = 10) -> None:
        if not (0.0 < alpha <= 1.0):
            raise ValueError(f"alpha: must be in (0, 1], got {alpha!r}")
        if not (0.0 < tolerance < 1.0):
            raise ValueError(f"tolerance: must be in (0, 1), got {tolerance!r}")
        if not (rise > 0 and math.isfinite(rise)):
            raise ValueError(f"rise: must be finite and > 0, got {rise!r}")
        if not (isinstance(window, int) and window >= 2):
            raise ValueError(f"window: must be an integer >= 2, got {window!r}")
        self.alpha, self.tolerance, self.rise, self.window = float(alpha), float(tolerance), float(rise), window
        self.ema: float | None = None
        #: (step, loss EMA) points since the start of the current point's record.
        self.history: list[tuple[int, float]] = []
        self.ref_slope: float | None = None
        #: Open trial: {"start", "settle", "expected", "ema0", "peak"} or None.
        self.trial: dict[str, Any] | None = None

    def observe(self, step: int, loss: float) -> None:
        """Feed the period-mean loss at `step` (non-finite values count as a rise)."""
        if not math.isfinite(loss):
            if self.trial is not None:
                self.trial["peak"] = math.inf
            return
        self.ema = loss if self.ema is None else self.ema + self.alpha * (loss - self.ema)
        self.history.append((step, self.ema))
        if self.trial is not None:
            self.trial["peak"] = max(self.trial["peak"], self.ema)
        else:
            # At a good point the reference follows the latest window.
            pts = [p for p in self.history if p[0] > step - self.window]
            s = slope(pts)
            if s is not None and len(pts) >= 3:
                self.ref_slope = s
            self.history = self.history[-4 * self.window:]

    def on_switch(self, step: int, expected: float, settle: int) -> None:
        """Open a trial for a point that applies from `step`; `expected` = S_new/S_old (> 0).

        Without a reference slope (a switch in the first measurement periods) or a usable
        `expected`, the trial judges only "rise": its slope, once measured, becomes the
        reference. Without any loss seen there is nothing to judge, and no trial opens.
        """
        self.history = []
        if self.ema is None:
            self.trial = None
            return
        judged = self.ref_slope is not None and expected > 0 and math.isfinite(expected)
        self.trial = {"start": int(step), "settle": int(settle), "expected": float(expected) if judged else None,
                      "ema0": self.ema, "peak": self.ema}

    def verdict(self, step: int) -> str:
        """'ok', 'slow', 'rise' or 'pending' for the point in force (see the module docstring)."""
        t = self.trial
        if t is None:
            return "pending" if self.ref_slope is None else "ok"
        if t["peak"] > t["ema0"] + self.rise * abs(t["ema0"]):
            return "rise"
        begin = t["start"] + t["settle"]
        if step < begin + self.window:
            return "pending"
        pts = [p for p in self.history if p[0] >= begin]
        s = slope(pts)
        if s is None or len(pts) < 3:
            return "pending"
        if t["expected"] is not None:
            assert self.ref_slope is not None
            need = -(1.0 - self.tolerance) * max(0.0, -self.ref_slope) / t["expected"]
            if s > need:  # slopes are negative when the loss falls: a larger slope is less progress
                return "slow"
        self.trial = None
        self.ref_slope = s
        return "ok"

    def reset_trial(self) -> None:
        """Forget the open trial (after a back-off the restored point is trusted again)."""
        self.trial = None
        self.history = []

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "history": [list(p) for p in self.history], "ref_slope": self.ref_slope,
                "trial": None if self.trial is None else dict(self.trial)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.ema, self.ref_slope = sd["ema"], sd["ref_slope"]
        self.history = [(int(a), float(b)) for a, b in sd["history"]]
        self.trial = None if sd["trial"] is None else dict(sd["trial"])
