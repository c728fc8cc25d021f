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
    snd, rcv = ResidualCodec(spec, warmup_steps=2), ResidualCodec(spec, warmup_steps=2)
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
def test_bad_warmup_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        ResidualCodec("int2", bad)  # type: ignore[arg-type]


def test_bad_variant_and_codec_rejected() -> None:
    with pytest.raises(ValueError, match="variant"):
        ResidualCodec("int2", 1, variant="fast")
    with pytest.raises(ValueError, match="unknown name"):
        ResidualCodec("int3", 1)
    assert "int2" in available_codecs()
