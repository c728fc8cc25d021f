"""ResidualCodec in one process: a sender and a receiver instance mirror each other."""
from __future__ import annotations

import pytest
import torch

from ccomm import ResidualCodec
from ccomm.registry import available_codecs

ACTIVATION_CODECS = ["binary", "int2", "lowrank:rank=4", "lowrank_int4:rank=4", "identity", "sign", "quantize:bits=4"]


def _walk(steps: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """A slowly drifting activation, like K/V across denoising steps."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    out = []
    for _ in range(steps):
        x = x + 0.05 * torch.randn(shape, generator=gen)
        out.append(x.to(dtype))
    return out


def _relay(sender: ResidualCodec, receiver: ResidualCodec, key: object, x: torch.Tensor) -> torch.Tensor:
    payload = sender.encode(key, x)
    assert payload.nbytes == receiver.expected_nbytes(key, x.shape, x.dtype)
    # Only the buffer crosses: the receiver rebuilds the payload from what it expects.
    return receiver.decode(key, receiver.wrap(key, payload.buffer.clone(), x.shape, x.dtype))


@pytest.mark.parametrize("spec", ACTIVATION_CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bases_bit_identical_over_30_steps(spec: str, dtype: torch.dtype) -> None:
    snd, rcv = ResidualCodec(spec, raw_sends=2), ResidualCodec(spec, raw_sends=2)
    for t, x in enumerate(_walk(30, (48, 40), dtype)):
        out = _relay(snd, rcv, "kv", x)
        assert out.shape == x.shape and out.dtype == dtype
        sb, rb = snd.base("kv"), rcv.base("kv")
        assert sb is not None and rb is not None
        # Bit identity, not just equality (which would let -0.0 == 0.0 through).
        assert torch.equal(sb.reshape(-1).view(torch.uint8), rb.reshape(-1).view(torch.uint8)), f"step {t}"
        if t < 2:
            assert torch.equal(out, x)  # warm-up steps are raw


def test_error_feedback_bounded_while_no_ef_grows_and_naive_is_worse() -> None:
    xs = _walk(30, (64, 96), torch.float32, seed=1)
    err = {}
    for variant in ("ef", "no_ef", "naive"):
        snd, rcv = ResidualCodec("int2", 1, variant=variant), ResidualCodec("int2", 1, variant=variant)
        err[variant] = [float((_relay(snd, rcv, 0, x) - x).norm() / x.norm()) for x in xs]
    # With EF the error is one compression error of a small residual: flat over time.
    assert max(err["ef"][5:]) < 1.5 * min(err["ef"][5:])
    # Without EF the per-step errors accumulate: the last error is several times the first.
    assert err["no_ef"][-1] > 3 * err["no_ef"][1]
    # Naive compression errs with the size of x, not of the residual.
    assert min(err["naive"][1:]) > 5 * max(err["ef"][1:])


def test_ef_error_much_smaller_than_naive_compression_of_x() -> None:
    xs = _walk(10, (32, 32), torch.float32, seed=2)
    snd, rcv = ResidualCodec("binary", 1), ResidualCodec("binary", 1)
    outs = [_relay(snd, rcv, "a", x) for x in xs]
    assert float((outs[-1] - xs[-1]).norm() / xs[-1].norm()) < 0.2


def test_reset_restarts_warmup_and_shape_change_without_reset_fails() -> None:
    rc = ResidualCodec("int2", 1)
    x = torch.randn(8, 16)
    rc.encode("k", x)
    assert rc.step("k") == 1
    with pytest.raises(ValueError, match="reset"):
        rc.encode("k", torch.randn(4, 16))
    rc.reset()
    assert rc.step("k") == 0 and rc.base("k") is None
    p = rc.encode("k", torch.randn(4, 16))
    assert p.nbytes == 4 * 16 * 4  # raw again after reset


def test_receiver_that_missed_a_reset_gets_clear_error() -> None:
    snd, rcv = ResidualCodec("int2", 1), ResidualCodec("int2", 1)
    _relay(snd, rcv, "k", torch.randn(8, 8))
    snd.reset()  # a new request of another shape; the receiver forgot to reset
    x = torch.randn(4, 8)
    snd.encode("k", x)
    p = snd.encode("k", x)
    with pytest.raises(ValueError, match="reset"):
        rcv.decode("k", rcv.wrap("k", p.buffer, x.shape, x.dtype))


def test_raw_payload_received_as_bytes() -> None:
    snd, rcv = ResidualCodec("int2", 1), ResidualCodec("int2", 1)
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    p = snd.encode("k", x)
    out = rcv.decode("k", rcv.wrap("k", p.buffer.view(torch.uint8).clone(), x.shape, x.dtype))
    assert torch.equal(out, x)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_raw_sends_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="raw_sends: must be an integer >= 1"):
        ResidualCodec("int2", bad)  # type: ignore[arg-type]


def test_warmup_steps_is_a_deprecated_name_of_raw_sends() -> None:
    with pytest.warns(DeprecationWarning, match="'warmup_steps' is deprecated, use 'raw_sends'"):
        rc = ResidualCodec("int2", warmup_steps=3)
    assert rc.raw_sends == 3
    with pytest.warns(DeprecationWarning, match="use raw_sends"):
        assert rc.warmup_steps == 3


def test_bad_variant_and_codec_rejected() -> None:
    with pytest.raises(ValueError, match="variant"):
        ResidualCodec("int2", 1, variant="fast")
    with pytest.raises(ValueError, match="unknown name"):
        ResidualCodec("int3", 1)
    assert "int2" in available_codecs()


# --- deferred own-base update: encode(defer=True) + settle() --------------------------------

DEFER_CODECS = ["binary", "int2", "lowrank:rank=2"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits(t: torch.Tensor | None) -> bytes | None:
    return None if t is None else t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("spec", DEFER_CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deferred_sender_bases_bit_identical_to_eager_sender_and_receiver(spec: str, dtype: torch.dtype) -> None:
    lazy, eager, rcv = ResidualCodec(spec, 1), ResidualCodec(spec, 1), ResidualCodec(spec, 1)
    for t, x in enumerate(_walk(7, (21, 30), dtype, seed=3)):
        p = lazy.encode("kv", x, defer=True)
        # The payload is computed against the (implicitly settled) base of the last step.
        assert _bits(p.buffer) == _bits(eager.encode("kv", x).buffer), f"step {t}"
        rcv.decode("kv", rcv.wrap("kv", p.buffer.clone(), x.shape, x.dtype))
        mode = t % 3
        if mode == 0:  # explicit settle: the deferred key, then nothing
            settled = lazy.settle()
            # Step 0 is raw: nothing deferred. Later, "kv" once, even when base() or encode()
            # applied an earlier deferred update since the last settle().
            assert settled == ([] if t == 0 else ["kv"])
            assert lazy.settle() == []
        elif mode == 2:  # left pending: the next encode (or the final keys()) applies it
            continue
        # mode 1: base() before any settle already returns the updated base
        base = lazy.base("kv")
        assert base is not None and base.dtype == dtype
        assert _bits(base) == _bits(eager.base("kv")) == _bits(rcv.base("kv")), f"step {t}"
    assert lazy.keys() == ["kv"]
    assert lazy.settle() == []
    assert _bits(lazy.base("kv")) == _bits(eager.base("kv")) == _bits(rcv.base("kv"))


def test_deferred_base_is_updated_on_read_not_stale() -> None:
    xs = _walk(2, (16, 24), torch.float16, seed=4)
    lazy, eager = ResidualCodec("int2", 1), ResidualCodec("int2", 1)
    for x in xs:
        eager.encode("a", x)
    lazy.encode("a", xs[0], defer=True)
    before = lazy.base("a")
    assert before is not None and _bits(before) == _bits(xs[0])  # raw step: base is x itself
    lazy.encode("a", xs[1], defer=True)
    after = lazy.base("a")  # no settle() yet
    assert after is not None and _bits(after) == _bits(eager.base("a"))
    assert _bits(after) != _bits(before)
    assert _bits(before) == _bits(xs[0])  # updates replace the base, never modify it


def test_settle_returns_each_deferred_key_once_in_encode_order() -> None:
    rc = ResidualCodec("binary", 1)
    xs = {k: _walk(2, (8, 16), torch.float32, seed=i) for i, k in enumerate(["b", "a", "c"])}
    for k, (x0, _) in xs.items():
        rc.encode(k, x0, defer=True)  # raw: nothing deferred
    assert rc.settle() == []
    for k in ("b", "a"):
        rc.encode(k, xs[k][1], defer=True)
    rc.encode("c", xs["c"][1])  # not deferred
    assert rc.settle() == ["b", "a"]
    assert rc.settle() == []


def test_settle_lists_a_key_once_even_after_reads_applied_its_updates() -> None:
    rc = ResidualCodec("int2", 1)
    xs = _walk(3, (8, 16), torch.float32, seed=9)
    rc.encode("k", xs[0], defer=True)  # raw
    rc.encode("k", xs[1], defer=True)
    rc.base("k")  # applies the first deferred update
    rc.encode("k", xs[2], defer=True)  # deferred again: one pending update in all
    assert rc.settle() == ["k"]


def test_settle_applies_the_update_now() -> None:
    # Overwriting the payload's bytes after settle() (as reusing a send buffer would) must not
    # change the base: settle() decoded the payload then, not at the next read.
    xs = _walk(2, (8, 16), torch.float16, seed=10)
    lazy, eager = ResidualCodec("binary", 1), ResidualCodec("binary", 1)
    for x in xs:
        eager.encode("k", x)
        p = lazy.encode("k", x, defer=True)
    assert lazy.settle() == ["k"]
    p.buffer.view(torch.uint8).fill_(0)
    assert _bits(lazy.base("k")) == _bits(eager.base("k"))


def test_keys_settles_deferred_updates() -> None:
    xs = _walk(2, (8, 16), torch.bfloat16, seed=5)
    lazy, eager = ResidualCodec("int2", 1), ResidualCodec("int2", 1)
    for x in xs:
        p = lazy.encode(("k", 0), x, defer=True)
        eager.encode(("k", 0), x)
    assert lazy.keys() == [("k", 0)]
    assert lazy.settle() == []  # keys() already applied the update ...
    p.buffer.view(torch.uint8).fill_(0)  # ... so its payload bytes no longer matter
    assert _bits(lazy.base(("k", 0))) == _bits(eager.base(("k", 0)))


def test_reset_drops_deferred_work() -> None:
    xs = _walk(2, (8, 16), torch.float32, seed=6)
    rc = ResidualCodec("binary", 1)
    for x in xs:
        rc.encode("k", x, defer=True)
    rc.reset()
    assert rc.settle() == [] and rc.keys() == []
    assert rc.base("k") is None and rc.step("k") == 0
    # A new request under the same key, another shape: raw again, no stale update applied.
    y = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    p = rc.encode("k", y, defer=True)
    assert p.nbytes == y.numel() * 4
    assert rc.settle() == []
    assert _bits(rc.base("k")) == _bits(y)


@pytest.mark.parametrize("variant", ["no_ef", "naive"])
@pytest.mark.parametrize("spec", DEFER_CODECS)
def test_defer_is_a_no_op_for_no_ef_and_naive(variant: str, spec: str) -> None:
    lazy, eager = ResidualCodec(spec, 1, variant=variant), ResidualCodec(spec, 1, variant=variant)
    rcv = ResidualCodec(spec, 1, variant=variant)
    for t, x in enumerate(_walk(4, (12, 20), torch.float16, seed=8)):
        p = lazy.encode("k", x, defer=True)
        assert _bits(p.buffer) == _bits(eager.encode("k", x).buffer), f"step {t}"
        assert lazy.settle() == []  # nothing was deferred
        assert _bits(lazy.base("k")) == _bits(eager.base("k")), f"step {t}"
        out = rcv.decode("k", rcv.wrap("k", p.buffer.clone(), x.shape, x.dtype))
        assert out.shape == x.shape and out.dtype == x.dtype
    assert lazy.keys() == eager.keys()


# --- non-finite values are refused by default ----------------------------------------------

def _nan_at(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y.view(-1)[5] = float("nan")
    return y


@pytest.mark.parametrize("variant", ["ef", "no_ef", "naive"])
@pytest.mark.parametrize("step", [0, 2])  # raw warm-up and compressed steps
def test_encode_refuses_non_finite_input_and_leaves_the_state_alone(variant: str, step: int) -> None:
    from ccomm.finite import NonFiniteError

    xs = _walk(step + 1, (16, 8), torch.float32)
    rc = ResidualCodec("int2", 1, variant=variant)
    for x in xs[:step]:
        rc.encode("k", x)
    base = rc.base("k")
    with pytest.raises(NonFiniteError, match="key 'k', input"):
        rc.encode("k", _nan_at(xs[step]))
    assert rc.step("k") == step
    assert (rc.base("k") is None) == (base is None)
    if base is not None:
        assert torch.equal(rc.base("k"), base)
    rc.encode("k", xs[step])  # a finite tensor is still accepted afterwards


@pytest.mark.parametrize("step", [0, 2])
def test_decode_refuses_a_peer_payload_that_makes_the_base_non_finite(step: int) -> None:
    from ccomm.finite import NonFiniteError

    xs = _walk(step + 1, (16, 8), torch.float32)
    sender = ResidualCodec("identity", 1, allow_nonfinite=True)
    receiver = ResidualCodec("identity", 1)
    for x in xs[:step]:
        _relay(sender, receiver, "k", x)
    before = receiver.base("k")
    with pytest.raises(NonFiniteError, match="key 'k'"):
        _relay(sender, receiver, "k", _nan_at(xs[step]))
    if before is not None:
        assert torch.equal(receiver.base("k"), before)


def test_allow_nonfinite_keeps_the_old_behaviour() -> None:
    rc = ResidualCodec("identity", 1, allow_nonfinite=True)
    rc.encode("k", _nan_at(torch.ones(16)))
    assert torch.isnan(rc.base("k")).any()
    with pytest.raises(ValueError, match="allow_nonfinite"):
        ResidualCodec("identity", allow_nonfinite=1)  # type: ignore[arg-type]


def test_deferred_update_that_overflows_is_refused_at_settle() -> None:
    """fp16 bases near the limit: base + D(p) overflows to inf in the deferred update."""
    from ccomm.finite import NonFiniteError

    rc = ResidualCodec("identity", 1)
    rc.encode("k", torch.full((4,), 60000.0, dtype=torch.float16))
    rc.encode("k", torch.full((4,), -60000.0, dtype=torch.float16), defer=True)
    # r = x - base = -120000 -> -inf in fp16: the input was finite, the residual is not.
    with pytest.raises(NonFiniteError, match="updated base"):
        rc.settle()
