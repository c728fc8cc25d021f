"""`deco-sgd calibrate`: samples from a results.json's grid, fit through fit_surrogate."""
from __future__ import annotations

import math

import pytest

from deco_sgd.cli import calibrate
from deco_sgd.surrogate import SurrogateParams, iterations


def _results(b: float, kappa: float, r: float, n: int, scale: float) -> dict:
    p = SurrogateParams(b=b, kappa=kappa)
    meth = {}
    for d in (0.1, 0.01, 0.001):
        for t in (0, 1, 2, 4):
            steps = scale * iterations(p, d, t, r, n)
            meth[f"static_d{d:g}_t{t}"] = {"kind": "static", "params": {"ratio": d, "staleness": t},
                                           "per_seed": [{"steps_to_target": steps}] * 3}
    meth["static_d0.001_t8"] = {"kind": "static", "params": {"ratio": 0.001, "staleness": 8},
                                "per_seed": [{"steps_to_target": None}] * 2 + [{"steps_to_target": 5.0}]}
    meth["dsgd"] = {"kind": "dsgd", "params": {"ratio": 1.0, "staleness": 0},
                    "per_seed": [{"steps_to_target": scale * iterations(p, 1.0, 0, r, n)}]}
    meth["deco"] = {"kind": "deco", "per_seed": [{"r_est": r}, {"r_est": r}]}
    return {"methods": meth, "config": {"deco": {"warmup_steps": 30}, "workers": n}}


def test_calibrate_recovers_constants_and_skips_censored() -> None:
    out = calibrate(_results(b=0.3, kappa=0.05, r=0.5, n=8, scale=0.2))
    assert out["n_samples"] == 13  # 12 grid points + D-SGD; the mostly-unreached member is left out
    assert all(s[:2] != (0.001, 8) for s in out["samples"])
    assert out["r"] == 0.5 and out["n"] == 8
    assert out["b"] == pytest.approx(0.3, rel=1e-3) and out["kappa"] == pytest.approx(0.05, rel=1e-3)
    assert out["rms_log_error"] < 1e-6 and math.isfinite(out["scale"])


def test_calibrate_needs_r() -> None:
    res = _results(b=0.3, kappa=0.05, r=0.5, n=8, scale=0.2)
    del res["methods"]["deco"]
    with pytest.raises(ValueError, match="r:"):
        calibrate(res)
    assert calibrate(res, r=0.5)["b"] == pytest.approx(0.3, rel=1e-3)
