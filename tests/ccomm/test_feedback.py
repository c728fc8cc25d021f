"""ErrorFeedback: the conservation invariant, shape changes, state round trip."""
from __future__ import annotations

import pytest
import torch

from ccomm import ErrorFeedback, make_codec

# float32 sums of 20 unit-variance tensors: rounding stays far below this.
SUM_ATOL = 1e-4


@pytest.mark.parametrize("spec", ["topk:ratio=0.05", "sign", "quantize:bits=2", "randomk:ratio=0.1,unbiased=false"])
def test_decoded_plus_residual_equals_inputs(spec: str) -> None:
    gen = torch.Generator().manual_seed(0)
    codec, ef = make_codec(spec), ErrorFeedback()
    total_in = torch.zeros(500)
    total_out = torch.zeros(500)
    for _ in range(20):
        g = torch.randn(500, generator=gen)
        total_in += g
        corrected = ef.compensate("w", g)
        decoded = codec.decode(codec.encode(corrected))
        ef.update("w", corrected, decoded)
        total_out += decoded
    residual = ef.residual("w")
    assert residual is not None
    torch.testing.assert_close(total_out + residual, total_in, atol=SUM_ATOL, rtol=0)
    # The residual is not trivially zero: the codec really dropped something.
    assert residual.abs().max() > 1e-3


def test_compensate_adds_residual_and_leaves_input_alone() -> None:
    ef = ErrorFeedback()
    x = torch.ones(4)
    assert ef.compensate("a", x) is x  # nothing stored yet
    ef.update("a", torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 0.0, 3.0, 0.0]))
    out = ef.compensate("a", x)
    assert torch.equal(out, torch.tensor([1.0, 3.0, 1.0, 5.0]))
    assert torch.equal(x, torch.ones(4))


def test_shape_change_resets_key_with_warning() -> None:
    ef = ErrorFeedback()
    ef.update("bucket0", torch.ones(6), torch.zeros(6))
    with pytest.warns(RuntimeWarning, match="changed shape"):
        out = ef.compensate("bucket0", torch.full((3,), 2.0))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert "bucket0" not in ef


def test_update_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="decoded"):
        ErrorFeedback().update("k", torch.ones(3), torch.ones(4))


def test_fp32_residuals_for_half_inputs() -> None:
    ef = ErrorFeedback(residual_dtype=torch.float32)
    x = torch.tensor([1.0, 1e-4], dtype=torch.float16)
    ef.update("h", x, torch.zeros(2, dtype=torch.float16))
    res = ef.residual("h")
    assert res is not None and res.dtype == torch.float32
    assert ef.compensate("h", torch.zeros(2, dtype=torch.float16)).dtype == torch.float16


def test_state_dict_round_trip_is_a_copy() -> None:
    ef = ErrorFeedback()
    ef.update(("layer", 1), torch.arange(4.0), torch.zeros(4))
    state = ef.state_dict()
    other = ErrorFeedback()
    other.load_state_dict(state)
    res = other.residual(("layer", 1))
    assert res is not None and torch.equal(res, torch.arange(4.0))
    state["residuals"][("layer", 1)].zero_()
    assert torch.equal(other.residual(("layer", 1)), torch.arange(4.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="residuals"):
        other.load_state_dict({})


# --- non-finite values are refused by default ----------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_update_refuses_a_non_finite_residual_and_keeps_the_old_one(bad: float) -> None:
    from ccomm.finite import NonFiniteError

    codec, ef = make_codec("topk:ratio=0.5"), ErrorFeedback()
    g = torch.arange(1.0, 9.0)
    ef.update("w", g, codec.decode(codec.encode(g)))
    before = ef.residual("w").clone()
    x = g.clone()
    x[3] = bad
    corrected = ef.compensate("w", x)
    with pytest.raises(NonFiniteError, match="ErrorFeedback: residual of key 'w'.*allow_nonfinite=True"):
        ef.update("w", corrected, codec.decode(codec.encode(corrected)))
    assert torch.equal(ef.residual("w"), before)


def test_update_refuses_a_decode_that_overflowed() -> None:
    """A finite input whose decode overflowed (inf) would leave -inf in the residual."""
    from ccomm.finite import NonFiniteError

    ef = ErrorFeedback()
    with pytest.raises(NonFiniteError):
        ef.update("w", torch.ones(4, dtype=torch.float16), torch.tensor([1.0, float("inf"), 1.0, 1.0]).half())
    assert "w" not in ef


def test_allow_nonfinite_keeps_nan_as_before() -> None:
    ef = ErrorFeedback(allow_nonfinite=True)
    ef.update("w", torch.tensor([1.0, float("nan")]), torch.zeros(2))
    assert torch.isnan(ef.residual("w")[1])
    state = ef.state_dict()
    ErrorFeedback(allow_nonfinite=True).load_state_dict(state)
    from ccomm.finite import NonFiniteError

    with pytest.raises(NonFiniteError, match="load_state_dict: residual of key 'w'"):
        ErrorFeedback().load_state_dict(state)


def test_allow_nonfinite_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="allow_nonfinite"):
        ErrorFeedback(allow_nonfinite="no")  # type: ignore[arg-type]
