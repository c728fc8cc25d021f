"""`make_codec` / `available_codecs`: names, spec parsing and the errors bad specs raise."""
from __future__ import annotations

import pytest
import torch

from ccomm import Codec, available_codecs, make_codec
from ccomm.registry import parse_spec

#: The codec names issue 2 requires.
REQUIRED_NAMES = {
    "identity",
    "fp16",
    "bf16",
    "topk",
    "approx_topk",
    "randomk",
    "quantize",
    "qsgd",
    "sign",
    "binary",
    "int2",
    "lowrank",
    "lowrank_int4",
}

CHAINS = [
    "randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4",
    "approx_topk:ratio=0.1|quantize:bits=2",
    "randomk:ratio=0.5|fp16",
]


def test_available_codecs_lists_the_required_names() -> None:
    names = available_codecs()
    assert REQUIRED_NAMES <= set(names), sorted(REQUIRED_NAMES - set(names))
    assert names == sorted(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", available_codecs())
def test_every_name_builds_with_defaults(name: str) -> None:
    codec = make_codec(name)
    assert isinstance(codec, Codec)
    assert codec.name == name
    assert isinstance(codec.additive, bool)


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("nosuchcodec", ["nosuchcodec", "topk", "quantize"]),  # names the bad one and lists the good ones
        ("topk:ratio=0", ["ratio", "(0, 1]"]),
        ("topk:ratio=1.5", ["ratio", "(0, 1]"]),
        ("topk:ratio=-1", ["ratio", "(0, 1]"]),
        ("approx_topk:ratio=0", ["ratio", "(0, 1]"]),
        ("randomk:ratio=2", ["ratio", "(0, 1]"]),
        ("topk:ratio=abc", ["ratio", "(0, 1]"]),
        ("quantize:bits=0", ["bits", "1", "8"]),
        ("quantize:bits=9", ["bits", "1", "8"]),
        ("lowrank:rank=0", ["rank", "1"]),
        ("lowrank_int4:rank=0", ["rank", "1"]),
        ("topk:ratio=0.1,foo=1", ["foo", "ratio"]),  # unknown keyword: names it and the allowed ones
        ("sign:bits=2", ["bits", "none"]),
        ("topk:ratio", ["key=value", "ratio"]),  # malformed: key without value
        ("topk:=0.1", ["key=value"]),
        ("", ["spec"]),
        ("quantize:bits=4|topk:ratio=0.1", ["quantize", "topk", "randomk"]),  # non-sparsifier first
        ("topk:ratio=0.1|sign|quantize:bits=4", ["sign", "sparsifiers"]),
        ("topk:ratio=0.1|nosuchcodec", ["nosuchcodec"]),
    ],
)
def test_bad_spec_raises_value_error_naming_field_and_allowed(spec: str, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make_codec(spec)
    msg = str(info.value).lower()
    for frag in fragments:
        assert frag.lower() in msg, f"{frag!r} not in error message {msg!r}"


def test_kwargs_with_a_chain_are_rejected() -> None:
    with pytest.raises(ValueError, match="kwargs"):
        make_codec("topk:ratio=0.1|quantize:bits=4", ratio=0.2)


def test_kwargs_validate_like_spec_values() -> None:
    with pytest.raises(ValueError, match="ratio"):
        make_codec("topk", ratio=0.0)
    with pytest.raises(ValueError, match="bits"):
        make_codec("quantize", bits=9)
    with pytest.raises(ValueError, match="nope"):
        make_codec("quantize", nope=1)


def test_kwargs_override_spec_values() -> None:
    codec = make_codec("topk:ratio=0.1", ratio=0.5)
    assert codec.spec == "topk:ratio=0.5"


def test_topk_spec_round_trips() -> None:
    codec = make_codec("topk", ratio=0.5)
    again = make_codec(codec.spec)
    assert type(again) is type(codec)
    assert again.spec == codec.spec
    x = torch.randn(40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.decode(again.encode(x)), codec.decode(codec.encode(x)))
    # 40 * 0.5 = 20 kept entries, so the spec carried the ratio (the default is 0.01).
    assert int((again.decode(again.encode(x)) != 0).sum()) == 20


@pytest.mark.parametrize("spec", available_codecs() + CHAINS + ["quantize:bits=2,stochastic=true,bucket=64,seed=3"])
def test_spec_round_trips_through_make_codec(spec: str) -> None:
    codec = make_codec(spec)
    again = make_codec(codec.spec)
    assert type(again) is type(codec)
    assert again.spec == codec.spec
    assert again.additive == codec.additive


def test_chain_spec_keeps_stage_parameters() -> None:
    codec = make_codec(CHAINS[0])
    stages = parse_spec(codec.spec)
    assert [name for name, _ in stages] == ["randomk", "topk", "quantize"]
    assert stages[0][1]["ratio"] == 0.1
    assert stages[1][1]["ratio"] == 0.1
    assert stages[2][1]["bits"] == 4


def test_parse_spec_values() -> None:
    stages = parse_spec("quantize:bits=4,stochastic=true,scheme=absmax|fp16")
    assert stages == [("quantize", {"bits": 4, "stochastic": True, "scheme": "absmax"}), ("fp16", {})]


def test_make_codec_passes_instances_through() -> None:
    codec = make_codec("sign")
    assert make_codec(codec) is codec
    with pytest.raises(ValueError, match="kwargs"):
        make_codec(codec, ratio=0.1)
