"""DecoConfig: defaults as docs/deco_sgd.md#configuration-and-tuning-deco_sgddecoconfig lists
them, one ValueError per bad field naming it, round trips and hash."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deco_sgd.config import DEFAULT_RATIO_GRID, DecoConfig


def test_defaults_follow_the_spec() -> None:
    c = DecoConfig()
    assert (c.mode, c.codec, c.phi, c.phi_base) == ("adaptive", "topk", "exp2", 2.0)
    assert c.ratio_grid == DEFAULT_RATIO_GRID and c.tau_max == 16
    # Issue 14: compressed from the first step (no dense warm-up), first decision within a few steps.
    assert (c.warmup_steps, c.measure_every, c.decide_every, c.min_dwell_steps) == (0, 2, 20, 10)
    assert c.ratio == 0.01 and DecoConfig(mode="static").ratio == 1.0
    assert c.convergence == "measured" and c.monitor
    assert c.value_formats == ("fp32", "fp16", "q8", "q4")
    assert DecoConfig(codec="randomk").value_formats == ("fp32", "fp16")
    assert (c.change_threshold, c.hysteresis, c.eps_rel) == (0.2, 0.05, 0.05)
    assert (c.ema_comp, c.ema_bandwidth) == (0.1, 0.3)
    assert (c.nonfinite, c.max_consecutive_skips, c.decision_mode) == ("skip", 10, "replicated")
    assert (c.checkpoint_queue, c.flush, c.flush_residual, c.lr_tau_scaling) == ("snapshot", "apply", False, False)
    # top-k is not additive: it travels by all-gather; random-k with a shared seed is.
    assert c.exchange_pattern == "allgather"
    assert DecoConfig(codec="randomk").exchange_pattern == "allreduce"
    assert c.value_bytes == 4 and DecoConfig(value_dtype="bf16").value_bytes == 2


BAD = [
    ("ratio", {"ratio": 0.0}, "(0, 1]"),
    ("ratio", {"ratio": 1.5}, "(0, 1]"),
    ("ratio", {"ratio": float("nan")}, "(0, 1]"),
    ("ratio_grid", {"ratio_grid": (0.5, 0.0)}, "(0, 1]"),
    ("ratio_grid", {"ratio_grid": (0.1, 0.1)}, "distinct"),
    ("ratio_grid", {"ratio_grid": ()}, "at least one"),
    ("staleness", {"staleness": -1}, "[0, 16]"),
    ("staleness", {"staleness": 5, "tau_max": 4}, "[0, 4]"),
    ("tau_max", {"tau_max": 65}, "[0, 64]"),
    ("warmup_steps", {"warmup_steps": -1}, ">= 0"),
    ("measure_every", {"measure_every": 0}, ">= 1"),
    ("decide_every", {"decide_every": 25}, "multiple of measure_every=2"),
    ("change_threshold", {"change_threshold": 1.0}, "(0, 1)"),
    ("change_threshold", {"change_threshold": 0.0}, "(0, 1)"),
    ("hysteresis", {"hysteresis": 0.5}, "[0, 0.5)"),
    ("hysteresis", {"hysteresis": -0.01}, "[0, 0.5)"),
    ("ema_comp", {"ema_comp": 0.0}, "(0, 1]"),
    ("ema_bandwidth", {"ema_bandwidth": 1.1}, "(0, 1]"),
    ("ema_grad", {"ema_grad": -0.1}, "(0, 1]"),
    ("eps_rel", {"eps_rel": 0.0}, "(0, inf)"),
    ("timeout_s", {"timeout_s": -3}, "(0, inf)"),
    ("a", {"a": -1.0}, "[0, inf)"),
    ("a, b, c", {"a": 0.0, "b": 0.0, "c": 0.0}, "not all zero"),
    ("phi_base", {"phi_base": 1.0}, "(1, inf)"),
    ("phi", {"phi": "cubic"}, "exp2"),
    ("phi", {"phi": "reported"}, "<= 0.5"),
    ("nonfinite", {"nonfinite": "ignore"}, "['skip', 'raise']"),
    ("value_dtype", {"value_dtype": "fp64"}, "['fp32', 'fp16', 'bf16']"),
    ("exchange", {"exchange": "ring"}, "['auto', 'allgather', 'allreduce']"),
    ("exchange", {"exchange": "allreduce"}, "additive"),  # top-k is not additive
    ("mode", {"mode": "dynamic"}, "['static', 'adaptive']"),
    ("codec", {"codec": "nosuchcodec"}, "unknown codec 'nosuchcodec'"),
    ("codec", {"codec": "topk:ratio=0.1"}, "`ratio` field"),
    ("codec", {"codec": "quantize:bits=4"}, "one-ratio family"),
    ("codec", {"codec": "randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4"}, "static-only"),
    ("ratio", {"codec": "quantize:bits=4", "mode": "static", "ratio": 0.5}, "takes no ratio"),
    ("decision_mode", {"decision_mode": "rank1"}, "['replicated', 'rank0']"),
    ("checkpoint_queue", {"checkpoint_queue": "keep"}, "['snapshot', 'drain']"),
    ("flush", {"flush": "drop"}, "['apply', 'discard']"),
    ("flush_residual", {"flush_residual": 1}, "bool"),
    ("max_consecutive_skips", {"max_consecutive_skips": 0}, ">= 1"),
    ("bucket_mb", {"bucket_mb": 0}, "(0, inf)"),
    ("seed", {"seed": -1}, ">= 0"),
    ("min_dwell_steps", {"min_dwell_steps": True}, "integer"),
]


@pytest.mark.parametrize("field,kwargs,allowed", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_bad_values_name_the_field_and_the_allowed_range(field: str, kwargs: dict, allowed: str) -> None:
    with pytest.raises(ValueError) as ei:
        DecoConfig(**kwargs)
    msg = str(ei.value)
    assert msg.startswith(field + ":"), msg
    assert allowed in msg, msg


def test_accepted_edge_values() -> None:
    DecoConfig(ratio=1.0, staleness=64, tau_max=64, hysteresis=0.0, warmup_steps=0, a=0.0, b=0.0)
    DecoConfig(phi="reported", ratio_grid=(0.5, 0.1, 0.01))
    chain = DecoConfig(mode="static", codec="randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4")
    assert chain.codec_family == "chain" and chain.exchange_pattern == "allgather"
    DecoConfig(codec="randomk", exchange="allreduce", ratio=0.01)
    DecoConfig(mode="static", codec="identity", exchange="allreduce")


def test_grid_is_normalised_to_a_tuple_of_floats() -> None:
    c = DecoConfig(ratio_grid=[1, 0.5])  # type: ignore[arg-type]
    assert c.ratio_grid == (1.0, 0.5) and all(isinstance(v, float) for v in c.ratio_grid)
    hash(c)  # frozen and hashable


def test_hook_no_longer_needs_a_warmup_step() -> None:
    # The hook's first step is dense by itself (DecoState.effective), so 0 is accepted.
    DecoConfig(warmup_steps=0).validate_for_hook()


def test_value_formats_are_validated() -> None:
    with pytest.raises(ValueError, match="^value_formats:"):
        DecoConfig(value_formats=("fp32", "q3"))
    with pytest.raises(ValueError, match="^value_formats:"):
        DecoConfig(codec="randomk", value_formats=("q8",))
    assert DecoConfig().make_codec(0.01, "q4").spec.startswith("topk:ratio=0.01|quantize:bits=4")


def test_make_codec_applies_the_ratio() -> None:
    c = DecoConfig(ratio=0.1)
    assert c.make_codec().ratio == pytest.approx(0.1)  # type: ignore[attr-defined]
    assert c.make_codec(0.002).ratio == pytest.approx(0.002)  # type: ignore[attr-defined]


def test_dict_round_trip_and_json() -> None:
    c = DecoConfig(ratio=0.01, staleness=3, ratio_grid=(0.5, 0.01), codec="randomk", seed=7)
    d = c.to_dict()
    assert isinstance(d["ratio_grid"], list)
    back = DecoConfig.from_dict(json.loads(json.dumps(d)))
    assert back == c and back.fingerprint() == c.fingerprint()


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['tau'\]"):
        DecoConfig.from_dict({"tau": 3})


def test_hash_is_stable_and_sensitive() -> None:
    c = DecoConfig()
    assert c.fingerprint() == DecoConfig().fingerprint() and len(c.fingerprint()) == 64
    assert c.fingerprint() != c.replace(seed=1).fingerprint()
    assert c.fingerprint() != c.replace(ratio_grid=c.ratio_grid[:-1]).fingerprint()
    # Same value in another process (Python's own hash() is salted per process).
    code = "from deco_sgd.config import DecoConfig; print(DecoConfig().fingerprint())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == c.fingerprint()


def test_fingerprint_values_are_pinned() -> None:
    # Checkpoints store `config_hash` = the fingerprint: these values were produced by the
    # former hand-written `DecoConfig.hash()`; if they change, old checkpoints stop resuming.
    # The adaptive default start moved from 0.1 to 0.01 (issue 14), which changes the default
    # config; a checkpoint of the old default resumes under an explicit ratio=0.1.
    assert DecoConfig().fingerprint() == "021267d5fc46f1bd299e35e7909d02325e342a370e9012f3168f34c26ad11f4f"
    assert DecoConfig(ratio=0.1).fingerprint() == "322bef7117b69c651347cf80c47afa765d36756453e0fe1da7a6fe569ae725ca"
    c = DecoConfig(mode="static", codec="topk", ratio=0.01, staleness=2, ratio_grid=[0.5, 0.1], nonfinite="raise")
    assert c.fingerprint() == "9b07cb1125f9dfa175f4b1a7aaaa6fc3c24575a82015e072cdb934e7e2b1f61d"


def test_hash_is_a_deprecated_alias_of_fingerprint() -> None:
    with pytest.warns(DeprecationWarning, match=r"use DecoConfig\.fingerprint\(\)"):
        assert DecoConfig().hash() == DecoConfig().fingerprint()


#: A valid value other than the default for every init field (a new field without one fails
#: the test below, so the fingerprint cannot silently leave it out).
OTHER_VALUES: dict[str, object] = {
    "mode": "static", "codec": "randomk", "ratio": 0.2, "staleness": 1, "value_dtype": "fp16",
    "exchange": "allgather", "collective_algo": "ring", "seed": 1, "bucket_mb": 5.0, "lr_tau_scaling": True,
    "ratio_grid": (1.0, 0.1), "value_formats": ("fp32",), "tau_max": 8, "warmup_steps": 3, "measure_every": 1,
    "decide_every": 10, "change_threshold": 0.3, "hysteresis": 0.1, "min_dwell_steps": 5,
    "decision_mode": "rank0", "lut_rebuild_threshold": 0.2, "convergence": "template", "drift_prior": 0.4,
    "drift_floor": 0.03, "monitor": False, "monitor_tolerance": 0.5, "monitor_rise": 0.2, "monitor_window": 8,
    "ema_loss": 0.5, "phi": "poly", "phi_base": 3.0, "kappa": 2.0, "a": 2.0, "b": 2.0, "c": 2.0,
    "eps_rel": 0.1, "ema_comp": 0.2, "ema_bandwidth": 0.2, "ema_grad": 0.2, "bw_min_transfer_frac": 0.1,
    "latency_window": 10, "sigma_coords": 1024, "profile_coords": 1024, "nonfinite": "raise",
    "max_consecutive_skips": 3, "timeout_s": 60.0, "checkpoint_queue": "drain", "flush": "discard",
    "flush_residual": True,
}


def test_every_field_changes_the_fingerprint() -> None:
    import dataclasses

    from ccomm.configs import fingerprint_excluded

    base = DecoConfig()
    excluded = fingerprint_excluded(base)
    fields = [f.name for f in dataclasses.fields(DecoConfig) if f.init and f.name not in excluded]
    assert sorted(OTHER_VALUES) == sorted(fields), "give OTHER_VALUES a value for each new field"
    for name in fields:
        other = DecoConfig(**{name: OTHER_VALUES[name]})
        assert other.fingerprint() != base.fingerprint(), name


def test_numbers_are_normalised_before_hashing() -> None:
    # YAML gives `ratio: 1` as an int; it must be the same config as 1.0.
    assert DecoConfig(ratio=1).fingerprint() == DecoConfig(ratio=1.0).fingerprint()  # type: ignore[arg-type]
    assert isinstance(DecoConfig(eps_rel=1).eps_rel, float)  # type: ignore[arg-type]


def test_registered_phi_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    import deco_sgd.config as config_mod
    import deco_sgd.phi as phi_mod

    # A private copy of the registry, so the registration does not leak into other tests.
    registry = dict(phi_mod.PHI_FUNCTIONS)
    monkeypatch.setattr(phi_mod, "PHI_FUNCTIONS", registry)
    monkeypatch.setattr(config_mod, "PHI_FUNCTIONS", registry)
    register_phi = phi_mod.register_phi
    with pytest.raises(ValueError, match="^phi:"):
        DecoConfig(phi="linear")
    register_phi("linear", lambda d, t, base: (1 - d) / d * (t + 1))
    assert DecoConfig(phi="linear").phi == "linear"
    with pytest.raises(ValueError, match="already registered"):
        register_phi("exp2", lambda d, t, base: 0.0)


def test_replace_revalidates() -> None:
    with pytest.raises(ValueError, match="^tau_max:"):
        DecoConfig().replace(tau_max=100)
