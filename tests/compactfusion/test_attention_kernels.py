"""`block_attention`'s kernel dispatch (issue 11, item 2), tested on a host without a GPU.

- `select_kernel`: which kernel for which device, dtype, head size and compute capability.
- The CUDA glue (`_cuda_flash`, `_cuda_efficient`) run with torch's real aten ops on the `meta`
  device: shapes, dtypes and the efficient kernel's padded log-sum-exp as torch defines them.
- Numerics of every path that runs here against `block_attention_reference`: the CPU flash
  kernel, and the CUDA glue fed by CPU stand-ins that honour the aten ops' contracts
  (including garbage in the padded LSE rows), through `block_attention`'s dispatch seam.
- A fused kernel that raises falls back to the reference, warns once and is not retried.
The CUDA kernels themselves have never run in this project (no GPU): docs/compactfusion.md.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

from compactfusion import attention as A

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    "device, dtype, head_dim, cap, expect",
    [
        ("cpu", F32, 64, None, "cpu_flash"),
        ("cpu", F16, 40, None, "cpu_flash"),
        ("cuda", F16, 64, (8, 0), "cuda_flash"),
        ("cuda", BF16, 128, (9, 0), "cuda_flash"),
        ("cuda", BF16, 256, (8, 6), "cuda_flash"),
        ("cuda", F16, 264, (8, 0), "cuda_efficient"),  # flash: head_dim <= 256
        ("cuda", F16, 64, (7, 5), "cuda_efficient"),  # flash: sm80+
        ("cuda", F32, 64, (8, 0), "cuda_efficient"),  # flash: fp16/bf16 only
        ("cuda", F32, 36, (8, 0), "cuda_efficient"),  # fp32: multiple of 4
        ("cuda", F16, 36, (8, 0), "reference"),  # fp16: neither a multiple of 8
        ("cuda", F32, 30, (8, 0), "reference"),
        ("cuda", F16, 64, (4, 0), "reference"),  # too old for either
        ("cuda", torch.float64, 64, (8, 0), "reference"),
        ("mps", F16, 64, None, "reference"),
        ("xpu", BF16, 64, None, "reference"),
    ],
)
def test_select_kernel(device: str, dtype: torch.dtype, head_dim: int, cap: tuple[int, int] | None, expect: str) -> None:
    assert A.select_kernel(device, dtype, head_dim, capability=cap) == expect


def test_select_kernel_honours_torch_sdp_switches() -> None:
    flash, eff = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()
    try:
        torch.backends.cuda.enable_flash_sdp(False)
        assert A.select_kernel("cuda", F16, 64, capability=(8, 0)) == "cuda_efficient"
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        assert A.select_kernel("cuda", F16, 64, capability=(8, 0)) == "reference"
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
        torch.backends.cuda.enable_mem_efficient_sdp(eff)


@pytest.mark.parametrize("fn, dtype", [(A._cuda_flash, F16), (A._cuda_flash, BF16), (A._cuda_efficient, F16),
                                       (A._cuda_efficient, F32)])
def test_cuda_glue_on_meta_tensors_with_the_real_aten_ops(fn, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    b, sq, sk, h, d = 2, 37, 50, 3, 64  # Sq not a multiple of 32: the efficient LSE is padded to 64
    q = torch.empty(b, sq, h, d, device="meta", dtype=dtype)
    k = torch.empty(b, sk, h, d, device="meta", dtype=dtype)
    out, lse = fn(q, k, k, 0.125)
    assert out.shape == (b, sq, h, d) and out.dtype == F32
    assert lse.shape == (b, h, sq) and lse.dtype == F32


def _fake_flash(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):  # type: ignore[no-untyped-def]
    """CPU stand-in with the CUDA flash op's contract: (B, H, S, D) in the input dtype, lse fp32 (B, H, Sq)."""
    assert dropout_p == 0.0 and not is_causal and not return_debug_mask and q.stride(-1) == 1
    o, lse = A.block_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    return (o.transpose(1, 2).to(q.dtype), lse, None, None, 0, 0, None, None, None)


def _fake_efficient(q, k, v, bias, compute_lse, dropout_p, is_causal, *, scale):  # type: ignore[no-untyped-def]
    """CPU stand-in with the efficient op's contract: lse (B, H, ceil(Sq/32)*32), padding rows arbitrary."""
    assert bias is None and compute_lse and dropout_p == 0.0 and not is_causal
    o, lse = A.block_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    sq = q.shape[2]
    padded = torch.full((*lse.shape[:2], math.ceil(sq / 32) * 32), float("nan"))
    padded[..., :sq] = lse
    return (o.transpose(1, 2).to(q.dtype), padded, None, None)


@pytest.mark.parametrize("kernel", ["cpu_flash", "cuda_flash", "cuda_efficient"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_every_runnable_path_matches_the_reference(monkeypatch: pytest.MonkeyPatch, kernel: str, dtype: torch.dtype) -> None:
    if kernel == "cuda_flash" and dtype == F32:
        pytest.skip("flash has no fp32 kernel; select_kernel never picks it")
    monkeypatch.setattr(A, "_CUDA_FLASH", _fake_flash)
    monkeypatch.setattr(A, "_CUDA_EFFICIENT", _fake_efficient)
    monkeypatch.setattr(A, "select_kernel", lambda *a, **k: kernel)  # the dispatch seam
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g).to(dtype) * 3 for n in (37, 50, 50))
    out, lse = A.block_attention(q, k, v, 0.25)
    ref_out, ref_lse = A.block_attention_reference(q, k, v, 0.25)
    assert out.dtype == lse.dtype == F32 and out.shape == q.shape and lse.shape == (2, 3, 37)
    tol = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}[dtype]  # CUDA paths round the output to the input dtype
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_a_failing_fused_kernel_falls_back_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(A, "_CUDA_EFFICIENT", broken)
    monkeypatch.setattr(A, "select_kernel", lambda *a, **k: "cuda_efficient")
    monkeypatch.setattr(A, "_FAILED", set())
    q = torch.randn(1, 5, 2, 8)
    with caplog.at_level(logging.WARNING, logger="compactfusion.attention"):
        first = A.block_attention(q, q, q, 0.3)
        second = A.block_attention(q, q, q, 0.3)
    ref = A.block_attention_reference(q, q, q, 0.3)
    assert all(torch.equal(a, b) for r in (first, second) for a, b in zip(r, ref))
    assert len(calls) == 1 and len([r for r in caplog.records if "using the reference" in r.getMessage()]) == 1


def test_cpu_tensors_take_the_cpu_flash_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = A._RUN["cpu_flash"]
    monkeypatch.setitem(A._RUN, "cpu_flash", lambda *a: seen.append(1) or real(*a))
    q = torch.randn(1, 4, 2, 8, dtype=BF16)
    A.block_attention(q, q, q, 0.3)
    assert seen == [1]
