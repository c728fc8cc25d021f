"""compactfusion.bench.config: example files load, quick overrides apply, bad values name their field."""
from __future__ import annotations

from pathlib import Path

import pytest

from compactfusion.bench.config import BenchConfig, LinkConfig, config_from_dict, load_config
from compactfusion.bench.methods import METHODS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "compactfusion"


@pytest.mark.parametrize("name", ["ethernet.yaml", "fast_link.yaml"])
def test_examples_load_and_quick(name: str) -> None:
    cfg = load_config(EXAMPLES / name)
    assert set(cfg.methods) == set(METHODS)
    assert cfg.wire_dtype == "fp16" and cfg.timing_ranks == 2 and max(cfg.ranks) == 4
    q = cfg.quick_version()
    assert q.ranks == (2,) and q.steps == 8 and len(q.labels) == 2 and q.quick == {}
    assert q.link.sweep == () and q.link.bandwidth_mbps == cfg.link.bandwidth_mbps


def test_ethernet_is_shaped_and_fast_link_is_not() -> None:
    eth, fast = load_config(EXAMPLES / "ethernet.yaml"), load_config(EXAMPLES / "fast_link.yaml")
    assert eth.link.bandwidth_mbps == "auto" and eth.link.target_slowdown == pytest.approx(136.52 / 28.06, abs=0.01)
    assert eth.link.sweep == (2, 3, 4)
    assert fast.link.bandwidth_mbps is None and not fast.link.shaped


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"steps": 0}, "steps"),
        ({"labels": [10]}, "labels"),
        ({"labels": []}, "labels"),
        ({"ranks": [1]}, "ranks"),
        ({"timing_ranks": 3}, "timing_ranks"),
        ({"methods": ["ring", "bogus"]}, "methods"),
        ({"methods": ["ring"]}, "methods"),  # single missing
        ({"methods": ["single", "ring", "patch+int2"]}, "methods"),  # its reference, patch, missing
        ({"wire_dtype": "fp8"}, "wire_dtype"),
        ({"raw_steps": 0}, "raw_steps"),
        ({"repeats": 0}, "repeats"),
        ({"backend": "nope"}, "backend"),
        ({"ablation_variants": ["ef", "second_order"]}, "ablation_variants"),
        ({"link": {"bandwidth_mbps": -1}}, "link.bandwidth_mbps"),
        ({"link": {"target_slowdown": 1.0}}, "link.target_slowdown"),
        ({"link": {"tolerance": 0}}, "link.tolerance"),
        ({"link": {"sweep": [0]}}, "link.sweep"),
        ({"link": {"bandwidth_mbps": None, "sweep": [2]}}, "link.sweep"),
        ({"link": {"colour": 1}}, "link.colour"),
        ({"colour": 1}, "colour"),
        ({"paper_bytes": "yes"}, "paper_bytes"),
        ({"quick": {"colour": 1}}, "quick"),
    ],
)
def test_bad_values_name_the_field(patch: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_from_dict(patch)


def test_quick_override_is_validated_and_merges_link() -> None:
    cfg = config_from_dict({"link": {"bandwidth_mbps": 40, "sweep": [2]}, "quick": {"steps": 0}})
    with pytest.raises(ValueError, match="steps"):
        cfg.quick_version()
    cfg = config_from_dict({"link": {"bandwidth_mbps": 40, "sweep": [2]}, "quick": {"link": {"sweep": []}}})
    q = cfg.quick_version()
    assert q.link == LinkConfig(bandwidth_mbps=40, sweep=())


def test_defaults_and_roundtrip() -> None:
    cfg = BenchConfig()
    assert cfg.link.bandwidth_mbps == "auto" and cfg.ablation_codec == "int2"
    assert config_from_dict(cfg.to_dict()) == cfg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["tiny_dit", "tiny_dit_random", "wide_dit_random", "toy"])
def test_every_backend_has_the_three_operations(name: str) -> None:
    from compactfusion.bench.backend import make_backend

    be = make_backend(name)
    for op in ("load", "parallelize", "sample"):
        assert callable(getattr(be, op, None)), (name, op)


def test_random_tiny_dit_samples_in_one_process() -> None:
    pytest.importorskip("diffusers")
    import torch

    from compactfusion.bench.backend import make_backend

    be = make_backend("tiny_dit_random")
    out = be.sample(be.load(), torch.tensor([3]), steps=2, guidance=2.0, seed=0)
    assert out.shape == (1, 1, 32, 32) and bool(torch.isfinite(out).all())


def test_batch16_example_loads() -> None:
    cfg = load_config(EXAMPLES / "ethernet_batch16.yaml")
    assert len(cfg.labels) == 16 and cfg.ranks == (2,) and cfg.ablation_variants == ()
    assert cfg.quick_version().steps == 8


def test_wide_example_and_backend() -> None:
    cfg = load_config(EXAMPLES / "ethernet_wide.yaml")
    assert cfg.backend == "wide_dit_random" and cfg.ranks == (2,) and not cfg.paper_bytes
    assert cfg.link.bandwidth_mbps == "auto" and cfg.quick_version().steps == 8
    pytest.importorskip("diffusers")
    import torch

    from compactfusion.bench.backend import make_backend

    be = make_backend("wide_dit_random")
    a, b = be.load(), be.load()
    assert a.config.num_attention_heads * a.config.attention_head_dim == 768 and a.config.num_layers == 2
    # Seeded: every rank (and every method's copy) holds the same weights.
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    out = be.sample(a, torch.tensor([3]), steps=2, guidance=2.0, seed=0)
    assert out.shape == (1, 1, 32, 32) and bool(torch.isfinite(out).all())


def test_distrifusion_runs_the_originals_four_warmup_steps() -> None:
    """The benchmark's DistriFusion baseline uses DistriFusion's default W = 4; every other method the config's."""
    from types import SimpleNamespace

    from compactfusion.bench.methods import DISTRIFUSION_WARMUP
    from compactfusion.bench.worker import RunKey, job_prepare

    assert DISTRIFUSION_WARMUP == 4 and METHODS["distrifusion"].raw(1) == 4
    assert all(m.raw(1) == 1 for n, m in METHODS.items() if n != "distrifusion")
    seen: dict[str, int] = {}

    class Spy:  # a backend that records what the worker asks for
        def load(self) -> object:
            return object()

        def parallelize(self, model: object, method: object, *, raw_steps: int, **_: object) -> object:
            seen[method.name] = raw_steps  # type: ignore[attr-defined]
            return None

    ctx = SimpleNamespace(cache={"backend": Spy()})
    job_prepare(ctx, "toy", [RunKey(m) for m in ("ring", "distrifusion", "ring+int2")], "fp16", 1, 0)
    assert seen == {"ring": 1, "distrifusion": 4, "ring+int2": 1}


def test_renamed_keys_still_load_with_a_deprecation_warning() -> None:
    new = config_from_dict({"name": "x", "raw_steps": 2, "quick": {"raw_steps": 3}})
    with pytest.warns(DeprecationWarning, match="'warmup_steps' is deprecated, use 'raw_steps'"):
        old = config_from_dict({"name": "x", "warmup_steps": 2, "quick": {"warmup_steps": 3}})
    assert old == new and old.quick_version().raw_steps == 3
    with pytest.warns(DeprecationWarning, match="link: 'target_ratio' is deprecated, use 'target_slowdown'"):
        assert config_from_dict({"name": "x", "link": {"target_ratio": 3.0}}).link.target_slowdown == 3.0
    with pytest.raises(ValueError, match="give 'raw_steps' only"):
        config_from_dict({"name": "x", "warmup_steps": 2, "raw_steps": 2})
