"""Single-process units of the CompactFusion core: attention math, config, keys, byte sizes."""
from __future__ import annotations

import math

import pytest
import torch

import _harness  # noqa: F401  (imports the real compactfusion package)
from compactfusion import CompactConfig, CompactState, CompactStateError, KVKey
from compactfusion.attention import block_attention, block_attention_reference, full_attention, merge, ring_attention


def _qkv(b: int = 2, sq: int = 6, sk: int = 12, h: int = 3, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, sq, h, d, generator=g), torch.randn(b, sk, h, d, generator=g) * 2,
            torch.randn(b, sk, h, d, generator=g))


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", w, v.double())


@pytest.mark.parametrize("splits", [[12], [6, 6], [1, 5, 6], [3, 3, 3, 3], [11, 1]])
def test_lse_merge_equals_full_softmax(splits: list[int]) -> None:
    q, k, v = _qkv()
    scale = 8**-0.5
    ref = _softmax_attention(q, k, v, scale)
    out = lse = None
    for kb, vb in zip(k.split(splits, dim=1), v.split(splits, dim=1)):
        out, lse = merge(out, lse, *block_attention(q, kb, vb, scale))
    assert out is not None and lse is not None
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    full_lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale, dim=-1)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-5)


def test_merge_is_order_independent() -> None:
    q, k, v = _qkv(seed=1)
    blocks = [block_attention(q, kb, vb, 0.3) for kb, vb in zip(k.split(4, 1), v.split(4, 1))]
    a = b = None
    la = lb = None
    for o, l in blocks:
        a, la = merge(a, la, o, l)
    for o, l in reversed(blocks):
        b, lb = merge(b, lb, o, l)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [block_attention, block_attention_reference])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_block_attention_matches_sdpa_and_large_logits_stay_finite(fn, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    q, k, v = (t.to(dtype) for t in _qkv(seed=2))
    out, lse = fn(q, k, v, 8**-0.5)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == (2, 3, 6)
    torch.testing.assert_close(out, full_attention(q.float(), k.float(), v.float()), rtol=1e-5, atol=1e-6)
    ref_out, ref_lse = block_attention_reference(q, k, v, 8**-0.5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    out, lse = fn(q.float() * 1e3, k, v, 1.0)  # exp would overflow without the LSE shift
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("codec", ["none", "int2"])
def test_single_rank_ring_is_plain_attention_with_joint_front(codec: str) -> None:
    q, k, v = _qkv(seed=3)
    jk, jv = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)
    st = CompactState(CompactConfig(codec=codec))
    st.begin_forward()
    out = ring_attention(q, k, v, state=st, layer=0, joint_k=jk, joint_v=jv)
    ref = full_attention(q, torch.cat([jk, k], 1), torch.cat([jv, v], 1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert out.shape == q.shape and out.dtype == q.dtype


BAD_CONFIGS = [
    ({"mode": "tree"}, "mode"),
    ({"codec": "nope"}, "codec"),
    ({"codec": ""}, "codec"),
    ({"codec": "lowrank:rank=0"}, "codec"),
    ({"raw_steps": 0}, "raw_steps"),
    ({"raw_steps": 1.5}, "raw_steps"),
    ({"variant": "ema"}, "variant"),
    ({"wire_dtype": "fp8"}, "wire_dtype"),
    ({"layers": (1, 1)}, "layers"),
    ({"layers": (-1,)}, "layers"),
    ({"layers": "01"}, "layers"),
    ({"calls_per_step": 0}, "calls_per_step"),
    ({"patch_exact_local": True}, "patch_exact_local"),
    ({"on_shape_change": "ignore"}, "on_shape_change"),
    ({"new_request": "always"}, "new_request"),
    ({"nonfinite": "zero"}, "nonfinite"),
    ({"check_every": -1}, "check_every"),
    ({"check_every": 1, "variant": "no_ef"}, "check_every"),
    ({"record_errors": 1}, "record_errors"),
    ({"max_state_mb": 0}, "max_state_mb"),
    ({"max_state_mb": True}, "max_state_mb"),
    ({"seed": -1}, "seed"),
    ({"policy": 3}, "policy"),
]


@pytest.mark.parametrize("kwargs,field", BAD_CONFIGS)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CompactConfig(**kwargs)


def test_config_defaults_and_derived_values() -> None:
    c = CompactConfig()
    assert (c.mode, c.codec, c.raw_steps, c.variant, c.wire_dtype, c.layers, c.calls_per_step) == (
        "ring", "int2", 1, "ef", "auto", None, 1)
    assert (c.patch_exact_local, c.on_shape_change, c.new_request, c.nonfinite, c.check_every) == (
        False, "raise", "timestep", "raise", 0)
    assert (c.record_errors, c.max_state_mb, c.seed) == (False, None, 0)
    assert CompactConfig(layers=[2, 0]).layers == (2, 0)
    assert CompactConfig(mode="patch", patch_exact_local=True).patch_exact_local
    assert CompactConfig(wire_dtype="fp16").wire(torch.float32) == torch.float16
    assert CompactConfig().wire(torch.bfloat16) == torch.bfloat16
    assert CompactConfig(codec="lowrank:rank=4", seed=7).make_codec().seed == 7
    assert CompactConfig(codec="lowrank:rank=4,seed=2", seed=7).make_codec().seed == 2
    with pytest.raises(Exception):
        c.mode = "patch"  # type: ignore[misc]  # frozen


def test_kvkey_is_hashable_and_validated() -> None:
    assert KVKey(1, 0, "k") == KVKey(1, 0, "k", 0) and len({KVKey(1, 0, "k"), KVKey(1, 0, "v")}) == 2
    with pytest.raises(ValueError, match="kind"):
        KVKey(0, 0, "q")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("codec", ["none", "identity", "int2", "binary", "lowrank:rank=3", "lowrank_int4:rank=2", "topk:ratio=0.1"])
def test_payload_sizes_are_exact_on_odd_shapes(dtype: torch.dtype, codec: str) -> None:
    """Receivers preallocate `recv_nbytes`; it must equal what the sender produces, every step."""
    sender, receiver = CompactState(CompactConfig(codec=codec)), CompactState(CompactConfig(codec=codec))
    g = torch.Generator().manual_seed(0)
    shape = (2, 7, 13)  # a layer's (K, V) stack of 7 x 13 tensors
    x = torch.randn(shape, generator=g).to(dtype)
    comp = codec != "none"
    for step in range(3):
        key = KVKey(0, 1, "kv")
        expect = receiver.recv_nbytes(key, shape, dtype, comp)
        assert expect == sender.recv_nbytes(key, shape, dtype, comp)
        data = sender.send(key, x, comp)
        assert data.dtype == torch.uint8 and data.numel() == expect, (step, codec)
        out = receiver.receive(key, data, shape, dtype, comp)
        assert out.shape == shape and out.dtype == dtype
        if comp:
            assert torch.equal(sender.rc.base(key), receiver.rc.base(key))  # mirrored, bit for bit
        x = x + 0.1 * torch.randn(shape, generator=g).to(dtype)


def test_shape_change_errors_or_resets() -> None:
    st = CompactState(CompactConfig())
    st.begin_forward()
    st.observe(0, 0, (2, 4, 2, 8), torch.float32, torch.device("cpu"))
    with pytest.raises(CompactStateError, match="reset"):
        st.observe(0, 0, (2, 8, 2, 8), torch.float32, torch.device("cpu"))
    st = CompactState(CompactConfig(on_shape_change="reset"))
    for _ in range(3):
        st.begin_forward()
    st.observe(0, 0, (2, 4, 2, 8), torch.float32, torch.device("cpu"))
    st.observe(0, 0, (2, 8, 2, 8), torch.float32, torch.device("cpu"))
    assert st.step == 0


def test_nonfinite_is_raised_after_the_exchange() -> None:
    st = CompactState(CompactConfig(codec="int2"))
    st.begin_forward()
    x = torch.randn(2, 4, 8)
    x[1, 1, 2] = math.inf
    st.send(KVKey(3, 0, "kv"), x, True)  # recorded, not raised: the exchange must complete first
    with pytest.raises(FloatingPointError, match="layer 3"):
        st.raise_nonfinite(3)
    st.raise_nonfinite(3)  # cleared
    ign = CompactState(CompactConfig(codec="int2", nonfinite="ignore"))
    ign.send(KVKey(3, 0, "kv"), x, True)
    ign.raise_nonfinite(3)
