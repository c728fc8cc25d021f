"""The benchmark's plan: which (method, seed) runs a scenario trains, in which order
(docs/design/deco_sgd.md#virtual-time).

`build_plan(cfg)` lists every `RunSpec` of a bench invocation. A spec is what the runner
hashes into the run's cache fingerprint (`runner.fingerprint`) and what every rank receives,
so its fields and their values are part of the cache format: changing them retrains every
cached run. `first_decision` reads DeCo-SGD's first choice from its decision log, which the
static-a-priori method then trains with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .config import BenchConfig

__all__ = ["RunSpec", "build_plan", "grid_name", "first_decision"]


def grid_name(ratio: float, tau: int) -> str:
    return f"static_d{ratio:g}_t{tau}"


@dataclass(frozen=True)
class RunSpec:
    """One (method, seed) training run; picklable so the parent can hand it to every rank."""

    name: str
    kind: str  # dsgd | deco | static | static_apriori | cocktail | dga | powersgd
    seed: int
    deco: dict[str, Any] = field(default_factory=dict)  # mode/codec/ratio/staleness for DeCo runs
    rank: int = 0  # PowerSGD rank

    @property
    def key(self) -> str:
        return f"{self.name}__s{self.seed}"


def build_plan(cfg: BenchConfig) -> list[RunSpec]:
    """Every run of a bench invocation, in the order the ranks execute them.

    D-SGD first (it sets the target), DeCo-SGD before static-a-priori (which freezes DeCo's
    first decision), the grid last (its seeds may be fewer).
    """
    m = cfg.methods
    skip = set(m.skip)
    plan: list[RunSpec] = []
    for s in cfg.train.seeds:
        plan.append(RunSpec("dsgd", "dsgd", s, {"mode": "static", "codec": "topk", "ratio": 1.0, "staleness": 0}))
        if "deco" not in skip:
            # No ratio: adaptive runs start at DecoConfig's conservative compressed point.
            plan.append(RunSpec("deco", "deco", s, {"mode": "adaptive", "codec": "topk", "staleness": 0}))
        if "static_apriori" not in skip:
            plan.append(RunSpec("static_apriori", "static_apriori", s, {"mode": "static", "codec": "topk"}))
        if "cocktail" not in skip:
            plan.append(RunSpec("cocktail", "cocktail", s, {"mode": "static", "codec": m.cocktail_codec,
                                                            "ratio": 1.0, "staleness": m.cocktail_staleness}))
        if "dga" not in skip:
            plan.append(RunSpec("dga", "dga", s))
        if "powersgd" not in skip:
            for r in m.powersgd_ranks:
                plan.append(RunSpec(f"powersgd_r{r}", "powersgd", s, rank=r))
    if "grid" not in skip:
        for s in cfg.train.static_seeds:
            for ratio, tau in m.grid:
                plan.append(RunSpec(grid_name(ratio, tau), "static", s,
                                    {"mode": "static", "codec": "topk", "ratio": ratio, "staleness": tau}))
    return plan


def first_decision(decisions: Sequence[dict[str, Any]]) -> tuple[float, int, str]:
    """DeCo's first choice: the (δ, τ, value format) in force after its first evaluated decision."""
    for d in decisions:
        if d["reason"].split(":")[1] in ("switch", "optimal", "hysteresis", "fallback"):
            return float(d["ratio"]), int(d["staleness"]), str(d.get("values") or "fp32")
    return 1.0, 0, "fp32"
