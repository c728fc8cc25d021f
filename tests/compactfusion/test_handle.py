"""One handle base for both front-ends (`compactfusion.handle`): `parallelize`'s `Handle` and the
xfuser adapter's `XfuserHandle` check consistency on the same steps and guard autograd alike.

Single process, no process group (world size 1): the hooks, counters and checks run exactly as
on P ranks; only the exchange is skipped. Neither test imports xfuser (the adapter imports it
only inside `patch`), so they run wherever CompactFusion does.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import pytest
import torch

from _harness import model_inputs, tiny_model  # first: makes `compactfusion` the real package

from compactfusion import CompactConfig, CompactState
from compactfusion.adapters.xfuser import XfuserHandle
from compactfusion.attention import ring_attention
from compactfusion.handle import HandleBase, check_due
from compactfusion.parallel import MODEL_SPECS, Handle, attn_processors

STEPS = 7


def _dit_handle(cfg: CompactConfig) -> tuple[Handle, Callable[[float, bool], None]]:
    """`parallelize`'s Handle on a tiny DiT (built as `parallelize` builds it, minus the group checks)."""
    model = tiny_model("dit")
    spec = MODEL_SPECS["DiTTransformer2DModel"]
    names = [n for n in attn_processors(model) if re.fullmatch(spec.attn_pattern, n)]
    handle = Handle(model, cfg, None, spec, names, heads=2, head_dim=8, stats=None)
    handle._install()
    inputs = model_inputs("dit")

    def call(t: float, grad: bool = False) -> None:
        with torch.set_grad_enabled(grad):
            model(**dict(inputs, timestep=torch.full((2,), t).long()), return_dict=False)

    return handle, call


class _StandIn(torch.nn.Module):
    """An xfuser transformer stand-in: two attention layers through the seam, (B, H, S, D) as usp.ring_attn."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.ring_attn: Callable[..., torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Any = None, timestep: Any = None) -> torch.Tensor:
        x = hidden_states
        for _ in range(2):
            q = self.proj(x).view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
            assert self.ring_attn is not None
            x = self.ring_attn(None, q, q, q).transpose(1, 2).reshape(x.shape)
        return x


def _xfuser_handle(cfg: CompactConfig) -> tuple[XfuserHandle, Callable[[float, bool], None]]:
    """The adapter's handle on the stand-in, with its usp seam function wired in as `patch` does."""
    model = _StandIn().requires_grad_(False)
    handle = XfuserHandle(model, cfg, None, "usp", ring_attention, CompactState(cfg, None))
    handle._install_hooks()
    model.ring_attn = handle._usp_ring_attn()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))

    def call(t: float, grad: bool = False) -> None:
        with torch.set_grad_enabled(grad):
            model(x, None, torch.full((2,), t))

    return handle, call


FRONT_ENDS = {"parallelize": _dit_handle, "xfuser": _xfuser_handle}


def _checked_steps(make: Callable, cfg: CompactConfig) -> list[int]:
    """Steps (0-based) after which `make`'s handle ran the consistency check in one STEPS-step request."""
    handle, call = make(cfg)
    seen: list[int] = []
    handle.state.check_consistency = lambda: seen.append(handle.state.step) or 0  # type: ignore[method-assign]
    try:
        for i in range(STEPS):
            for _ in range(cfg.calls_per_step):
                call(900.0 - 100.0 * i)
        assert handle.step == STEPS
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("calls_per_step", [1, 2])
@pytest.mark.parametrize("every", [1, 2, 3])
def test_both_front_ends_check_on_the_same_steps(every: int, calls_per_step: int) -> None:
    cfg = CompactConfig(codec="int2", check_every=every, calls_per_step=calls_per_step)
    got = {name: _checked_steps(make, cfg) for name, make in FRONT_ENDS.items()}
    # After every `every`-th completed step: completed steps every, 2*every, ... (0-based step + 1).
    expected = [s for s in range(STEPS) if (s + 1) % every == 0]
    assert got == {name: expected for name in FRONT_ENDS}


def test_check_every_zero_never_checks() -> None:
    cfg = CompactConfig(codec="int2", check_every=0)
    assert {name: _checked_steps(make, cfg) for name, make in FRONT_ENDS.items()} == {n: [] for n in FRONT_ENDS}


def test_check_due_counts_completed_steps_over_branches() -> None:
    cfg = CompactConfig(check_every=2, calls_per_step=2)
    st = CompactState(cfg)
    due = []
    for _ in range(8):  # 4 steps of 2 branches
        st.begin_forward()
        due.append(check_due(cfg, st))
    assert due == [False, False, False, True, False, False, False, True]


@pytest.mark.parametrize("name", list(FRONT_ENDS))
def test_both_front_ends_guard_autograd_alike(name: str) -> None:
    handle, call = FRONT_ENDS[name](CompactConfig(codec="int2"))
    try:
        call(900.0, True)  # a frozen model under grad mode records nothing: allowed
        model = handle._model if isinstance(handle, Handle) else handle._transformer
        model.requires_grad_(True)
        with pytest.raises(RuntimeError, match="inference only"):
            call(800.0, True)
        call(800.0, False)  # the same forward under no_grad runs
        model.requires_grad_(False)
    finally:
        handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        handle.reset()
    assert isinstance(handle, HandleBase)


def test_guard_refuses_an_input_that_requires_grad() -> None:
    handle, _ = _xfuser_handle(CompactConfig(codec="int2"))
    x = torch.randn(1, 6, 16, requires_grad=True)
    try:
        with pytest.raises(RuntimeError, match="inference only"):
            handle._transformer(x, None, torch.tensor([900.0]))
    finally:
        handle.remove()
