"""Scenario config validation, --quick, the method plan and run fingerprints (no processes)."""
from __future__ import annotations

from pathlib import Path

import pytest

from deco_sgd.bench.config import QUICK_GRID, QUICK_MNIST_HIDDEN, config_from_dict, load_config
from deco_sgd.bench.plan import build_plan, first_decision
from deco_sgd.bench.runner import fingerprint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "deco_sgd"
BASE = {"scenario": "s", "network": {"latency_ms": 50, "bandwidth_mbps": 50}}


def _cfg(**over: object) -> dict:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


@pytest.mark.parametrize("over, field", [
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"train": {"compute_time_s": 0}}, "train.compute_time_s"),
    ({"train": {"seeds": [0, 0]}}, "train.seeds"),
    ({"train": {"seeds": [0], "grid_seeds": [1]}}, "train.grid_seeds"),
    ({"train": {"stepz": 3}}, "train: unknown field"),
    ({"network": {"latency_ms": -5}}, "network.latency_ms"),
    ({"network": {"bandwidth_mbps": 0}}, "network.bandwidth_mbps"),
    ({"network": {"bandwidth_mbps": None, "trace": {"kind": "zigzag"}}}, "network.trace.kind"),
    ({"network": {"bandwidth_mbps": None, "trace": {"kind": "random_walk", "low_mbps": -1}}}, "network.trace"),
    ({"workers": 0}, "workers"),
    ({"task": {"name": "cifar"}}, "task.name"),
    ({"task": {"name": "mnist", "batch_size": 0}}, "batch_size"),
    ({"methods": {"grid_ratios": [0.0]}}, "methods.grid_ratios"),
    ({"methods": {"grid_taus": [-1]}}, "methods.grid_taus"),
    ({"methods": {"grid_pairs": [[0.1, 1], [0.1, 1]]}}, "methods.grid_pairs"),
    ({"methods": {"skip": ["dsgd"]}}, "methods.skip"),
    ({"methods": {"skip": ["deco"]}}, "methods.skip"),
    ({"methods": {"cocktail_codec": "nonsense"}}, "methods.cocktail_codec"),
    ({"deco": {"warmup_steps": -1}}, "deco.warmup_steps"),
    ({"deco": {"ratio": 0.1}}, "deco.ratio"),
    ({"target": {"factor": 1.5}}, "target.factor"),
    ({"extra": 1}, "config: unknown section"),
])
def test_validation_names_the_field(over: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_from_dict(_cfg(**over))


def test_examples_load_and_quick_reduces() -> None:
    for name in ("high_latency", "varying_bandwidth"):
        cfg = load_config(EXAMPLES / f"{name}.yaml")
        assert cfg.scenario == name and cfg.workers == 8 and cfg.task["name"] == "mnist"
        assert len(cfg.methods.grid) >= 12
        q = load_config(EXAMPLES / f"{name}.yaml", quick=True)
        assert (q.workers, q.train.seeds, q.train.steps, q.methods.grid, q.methods.powersgd_ranks, q.quick) == \
            (4, (0,), 300, QUICK_GRID, (1,), True)
        assert q.network == cfg.network  # --quick never changes the scenario's network
        assert tuple(q.task["hidden"]) == QUICK_MNIST_HIDDEN != tuple(cfg.task.get("hidden", ()))
    vb = load_config(EXAMPLES / "varying_bandwidth.yaml").network.link()
    rates = vb.rate_trace.mbps
    assert min(rates) >= 5 and max(rates) <= 50 and vb.rate_trace.times_s[1] == 5.0
    assert load_config(EXAMPLES / "high_latency.yaml").network.link().rtt_s == pytest.approx(0.150)


def test_holdout_fast_swings_trace_swings_while_the_compressed_methods_train() -> None:
    # The hold-out trace is for adaptation: it must start on the slow phase (so the first
    # decision is made there) and swing at least 15x, twice, before the 12-20 s at which
    # the compressed methods reach the target on the tuned scenarios.
    for name, arch in (("holdout_fast_swings", None), ("holdout_cnn_fast_swings", "cnn")):
        cfg = load_config(EXAMPLES / f"{name}.yaml")
        assert cfg.workers == 4 and cfg.task.get("arch") == arch
        assert "static_apriori" not in cfg.methods.skip and "cocktail" not in cfg.methods.skip
        trace = cfg.network.link().rate_trace
        early = [(t, r) for t, r in zip(trace.times_s, trace.mbps) if t <= 20]
        assert early[0] == (0.0, 4) and len(early) >= 3
        assert all(max(a[1], b[1]) / min(a[1], b[1]) >= 15 for a, b in zip(early, early[1:]))


def test_plan_and_fingerprints() -> None:
    cfg = load_config(EXAMPLES / "high_latency.yaml")
    plan = build_plan(cfg)
    names = [s.name for s in plan]
    assert names[0] == "dsgd" and names.index("deco") < names.index("static_apriori")
    assert {"cocktail", "dga", "powersgd_r1", "powersgd_r4", "static_d0.001_t8"} <= set(names)
    assert sum(s.kind == "static" for s in plan) == 15 * len(cfg.train.static_seeds)
    other = load_config(EXAMPLES / "varying_bandwidth.yaml")
    by = {s.key: s for s in plan}
    # Static runs do not depend on the network (shared across scenarios); deco and dga do.
    assert fingerprint(cfg, by["dsgd__s0"]) == fingerprint(other, by["dsgd__s0"])
    assert fingerprint(cfg, by["static_d0.01_t2__s0"]) == fingerprint(other, by["static_d0.01_t2__s0"])
    assert fingerprint(cfg, by["deco__s0"]) != fingerprint(other, by["deco__s0"])
    assert fingerprint(cfg, by["dga__s0"]) != fingerprint(other, by["dga__s0"])
    # Calibrating the surrogate invalidates the controller's runs only (deco, static_apriori).
    import dataclasses

    cal = dataclasses.replace(cfg, deco={**cfg.deco, "b": 0.5, "kappa": 0.1})
    assert fingerprint(cal, by["static_d0.01_t2__s0"]) == fingerprint(cfg, by["static_d0.01_t2__s0"])
    assert fingerprint(cal, by["deco__s0"]) != fingerprint(cfg, by["deco__s0"])
    assert fingerprint(cal, by["static_apriori__s0"]) != fingerprint(cfg, by["static_apriori__s0"])
    assert fingerprint(cal, by["dga__s0"]) == fingerprint(cfg, by["dga__s0"])


@pytest.mark.parametrize("name,quick,digest", [
    ("high_latency", False, "425b40298949756c"),
    ("high_latency", True, "767a881a759c9005"),
    ("varying_bandwidth", False, "07d61652b379ceae"),
    ("varying_bandwidth", True, "69087e59f7d5c834"),
])
def test_run_fingerprints_are_pinned(name: str, quick: bool, digest: str) -> None:
    # Run records are cached under these fingerprints (a benchmark cache takes hours to
    # fill): a refactor must leave them byte-identical. The values were produced before the
    # vocabulary refactor (issue 12: `apply_quick` -> `quick_version`, `ccomm.validate`); a
    # deliberate change to what a run depends on updates them, and says so.
    import hashlib

    cfg = load_config(EXAMPLES / f"{name}.yaml", quick=quick)
    lines = "".join(f"{s.key}={fingerprint(cfg, s)}\n" for s in build_plan(cfg))
    assert hashlib.sha256(lines.encode()).hexdigest()[:16] == digest


def test_rtt_ms_is_deprecated_for_one_way_latency_ms() -> None:
    import warnings

    with pytest.warns(DeprecationWarning, match="'rtt_ms' \\(round trip\\) is deprecated, use 'latency_ms'"):
        old = config_from_dict({**BASE, "network": {"rtt_ms": 100, "bandwidth_mbps": 50}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = config_from_dict(BASE)
    assert old.network == new.network and old.network.link() == new.network.link()
    assert old.network.latency_ms == 50 and old.network.rtt_ms is None
    # Run fingerprints key on the round trip exactly as the former `rtt_ms` spelled it.
    assert old.network.round_trip_ms == new.network.round_trip_ms == 100
    plan = build_plan(old)
    assert [fingerprint(old, s) for s in plan] == [fingerprint(new, s) for s in plan]
    from deco_sgd.bench.config import NetworkConfig

    assert NetworkConfig(**new.to_dict()["network"]) == new.network  # the report reads results.json back


def test_apply_quick_is_a_deprecated_alias() -> None:
    from deco_sgd.bench.config import apply_quick

    cfg = load_config(EXAMPLES / "high_latency.yaml")
    with pytest.warns(DeprecationWarning, match=r"use cfg\.quick_version\(\)"):
        assert apply_quick(cfg) == cfg.quick_version() == load_config(EXAMPLES / "high_latency.yaml", quick=True)


def test_first_decision_skips_holds() -> None:
    log = [{"reason": "initial:unknown_latency", "ratio": 1.0, "staleness": 0},
           {"reason": "initial:switch", "ratio": 0.01, "staleness": 4, "values": "q8"},
           {"reason": "period:switch", "ratio": 0.1, "staleness": 1}]
    assert first_decision(log) == (0.01, 4, "q8")  # the value format is part of the choice
    assert first_decision(log[:1]) == (1.0, 0, "fp32")


@pytest.mark.parametrize("values", ["fp32", "fp16", "q8", "q4"])
def test_static_apriori_freezes_the_value_format_too(values: str) -> None:
    # static_apriori must run the point DeCo-SGD chose, bytes included: a quantized format
    # becomes the static chain DeCo-SGD's own codec builds, with the same payload size.
    import torch

    from deco_sgd.bench.methods import apriori_fields
    from deco_sgd.config import DecoConfig
    from deco_sgd.controller import Controller

    adaptive = DecoConfig()
    static = DecoConfig(mode="static", **apriori_fields(adaptive, 0.02, 1, values))
    assert static.staleness == 1
    numels = (784 * 256, 256, 2570)
    ctl = Controller(adaptive, 4, numels)
    wire = {"fp16": torch.float16}.get(values, torch.float32)
    sent = sum(static.make_codec().nbytes(torch.Size([d]), wire) for d in numels) + 1  # + validity byte
    assert sent == ctl.payload(0.02, values)[1]
