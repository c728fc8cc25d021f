"""The xfuser adapter: CompactFusion's compressed ring inside an xDiT pipeline (docs/design/compactfusion.md#xdit).

A tiny random-weight PixArt pipeline is built in memory (no downloads: no tokenizer, text
encoder or VAE; prompt embeddings are passed in) and wrapped by xfuser 0.7.0 with
ring_degree=2 on 2 gloo ranks. `cpu_env_patch()` makes xfuser importable on CPU; the
compressed ring replaces xfuser's `usp.ring_attn`, which has no CPU implementation.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from ccomm.header import HEADER_BYTES

from _harness import RankPool  # first: makes `compactfusion` the real package in rank processes

from compactfusion.adapters.xfuser import (
    LONG_CTX_RING_PARAMS,
    USP_RING_PARAMS,
    XfuserVersionError,
    cpu_env_patch,
    patch,
    xfuser_version,
)
from compactfusion.config import CompactConfig

try:
    cpu_env_patch()
except ImportError as exc:  # xfuser, triton or yunchang missing
    pytest.skip(f"xfuser is not usable here ({exc}); install the xdit extra", allow_module_level=True)
xfuser = pytest.importorskip("xfuser", reason="needs the xdit extra (xfuser 0.7.0 and triton)")

pytestmark = [pytest.mark.xfuser]

STEPS = 3
LAYERS = 2
HEADS, HEAD_DIM = 2, 8
SAMPLE = 8  # latent side; patch 2 -> 16 tokens, 8 per rank
TEXT = 5


# -- helpers run on the ranks ----------------------------------------------------------------
def _tiny_pipeline(scheduler: str = "DDIMScheduler") -> Any:
    """A random-weight PixArt-alpha pipeline with a 2-layer transformer (same weights every call)."""
    import diffusers
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(
        sample_size=SAMPLE, patch_size=2, in_channels=4, out_channels=8, num_layers=LAYERS,
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, cross_attention_dim=HEADS * HEAD_DIM,
        caption_channels=16, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        use_additional_conditions=False,
    )
    # No clipping of the predicted sample: saturated latents would hide attention differences.
    kw = {"clip_sample": False} if scheduler == "DDIMScheduler" else {}
    return PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                               scheduler=getattr(diffusers, scheduler)(**kw))


def _generate(pipe: Any) -> torch.Tensor | None:
    """Latents of one 3-step request with batched CFG (None on ranks xfuser returns nothing to)."""
    emb = torch.randn(1, TEXT, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, TEXT)
    out = pipe(
        prompt=None, prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt=None,
        negative_prompt_embeds=torch.zeros_like(emb), negative_prompt_attention_mask=mask,
        num_inference_steps=STEPS, guidance_scale=2.0, height=SAMPLE * 8, width=SAMPLE * 8,
        generator=torch.Generator().manual_seed(1), output_type="latent", use_resolution_binning=False,
    )
    return None if out is None else out.images


def _xfuser_pipeline(world: int, ulysses: int = 1, scheduler: str = "DDIMScheduler") -> Any:
    import torch.distributed as dist
    from xfuser import xFuserArgs, xFuserPixArtAlphaPipeline
    from xfuser.core.distributed import init_distributed_environment

    cpu_env_patch()
    # The harness already joined the gloo group; this only builds xfuser's world group (once).
    init_distributed_environment(rank=dist.get_rank(), world_size=world, backend="gloo")
    engine_config, _ = xFuserArgs(model="in-memory", ring_degree=world // ulysses, ulysses_degree=ulysses).create_config()
    return xFuserPixArtAlphaPipeline(_tiny_pipeline(scheduler), engine_config)


def _reference() -> torch.Tensor:
    """xfuser's single-process output: with one process it runs the unmodified diffusers pipeline."""
    out = _generate(_tiny_pipeline())
    assert out is not None
    return out


def _run_codec(rank: int, world: int, codec: str, check_every: int, ulysses: int = 1) -> dict[str, Any]:
    ref = _reference()
    xpipe = _xfuser_pipeline(world, ulysses)
    handle = patch(xpipe, CompactConfig(codec=codec, check_every=check_every))
    try:
        out = _generate(xpipe)
        return {
            "diff": None if out is None else float((out - ref).abs().max()),
            "finite": None if out is None else bool(torch.isfinite(out).all()),
            "bytes": handle.stats.get("kv_ring").bytes,
            "step": handle.step,
            "layers": handle.layers_per_forward,
            "seam": handle.seam,
        }
    finally:
        handle.remove()


def _run_restore(rank: int, world: int) -> dict[str, Any]:
    from xfuser.model_executor.layers import usp

    xpipe = _xfuser_pipeline(world)
    tr = xpipe.transformer
    original = usp.ring_attn
    hooks_before = (len(tr._forward_pre_hooks), len(tr._forward_hooks))
    handle = patch(xpipe, CompactConfig(codec="int2"))
    replaced = usp.ring_attn is not original
    with pytest.raises(ValueError, match="already patched"):
        patch(xpipe, CompactConfig(codec="int2"))
    _generate(xpipe)
    nbytes = handle.state_nbytes()
    handle.remove()
    handle.remove()  # idempotent
    with pytest.raises(RuntimeError, match="removed"):
        handle.reset()
    return {
        "replaced": replaced,
        "restored": usp.ring_attn is original,
        "hooks": (len(tr._forward_pre_hooks), len(tr._forward_hooks)) == hooks_before,
        "state_nbytes": nbytes,
    }


def _run_new_request(rank: int, world: int, scheduler: str) -> dict[str, Any]:
    """Two requests on one handle: the watched scheduler starts each, so both are identical and
    each request's bytes equal those of a request after an explicit reset()."""
    xpipe = _xfuser_pipeline(world, scheduler=scheduler)
    handle = patch(xpipe, CompactConfig(codec="int2", check_every=1))
    try:
        first = _generate(xpipe)
        bytes_first = handle.stats.get("kv_ring").bytes
        second = _generate(xpipe)
        same = None if first is None else bool(torch.equal(first, second))
        req = handle.requests
        out = {"same": same, "step": handle.step, "bytes": (bytes_first, handle.stats.get("kv_ring").bytes),
               "requests": (req.requests, req.scheduler, req.timestep, req.suspect)}
        handle.reset()
        _generate(xpipe)
        out["bytes_explicit"] = handle.stats.get("kv_ring").bytes
        calls = xpipe.scheduler.timesteps.numel()
        out["calls"] = calls
        return out
    finally:
        handle.remove()


def _run_refusals(rank: int, world: int) -> list[str]:
    from xfuser.core.distributed import parallel_state as ps
    from xfuser.model_executor.layers import usp

    xpipe = _xfuser_pipeline(world)
    seen = []
    original = usp.ring_attn

    def wrong(attention_function, query, key, value, dropout_p=0.0):  # an older/newer signature
        raise AssertionError("never called")

    usp.ring_attn = wrong
    try:
        with pytest.raises(XfuserVersionError, match=f"xfuser {xfuser_version()}"):
            patch(xpipe, CompactConfig(codec="int2"))
        seen.append("signature")
    finally:
        usp.ring_attn = original
    real_pp = ps.get_pipeline_parallel_world_size
    ps.get_pipeline_parallel_world_size = lambda: 2
    try:
        with pytest.raises(ValueError, match="PipeFusion"):
            patch(xpipe, CompactConfig(codec="int2"))
        seen.append("pipefusion")
    finally:
        ps.get_pipeline_parallel_world_size = real_pp
    with pytest.raises(ValueError, match="long_ctx"):  # PixArt has no xFuserLongContextAttention
        patch(xpipe, CompactConfig(codec="int2"), seam="long_ctx")
    seen.append("long_ctx_absent")
    assert usp.ring_attn is original
    return seen


class _LongCtxModel(torch.nn.Module):
    """Stand-in transformer calling an xFuserLongContextAttention's `ring_attn_fn` like Sana does.

    On CPU xfuser's LongContextAttention base is `object` and its ring module does not import
    (yunchang's kernels need CUDA), so the instance is created without __init__ and holds a
    stand-in with the signature of xfuser 0.7.0's `xdit_ring_flash_attn_func`.
    """

    def __init__(self, group: Any) -> None:
        super().__init__()
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention

        lc = object.__new__(xFuserLongContextAttention)
        lc.ring_attn_fn = _xdit_ring_stand_in
        self.processor = type("Proc", (), {})()
        self.processor.hybrid_seq_parallel_attn = lc
        self.group = group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, jk: torch.Tensor, jv: torch.Tensor,
                timestep: torch.Tensor) -> torch.Tensor:
        lc = self.processor.hybrid_seq_parallel_attn
        return lc.ring_attn_fn(q, k, v, group=self.group, joint_tensor_key=jk, joint_tensor_value=jv,
                               joint_strategy="front")


def _xdit_ring_stand_in(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None, attn_type=None,
                        attn_processor=None, attn_layer=None, joint_tensor_key=None, joint_tensor_value=None,
                        joint_strategy="none", q_descale=None, k_descale=None, v_descale=None):
    raise AssertionError("xfuser's own ring must not run: the adapter replaces it")


def _run_long_ctx(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist
    from xfuser.core.distributed import get_sp_group

    _xfuser_pipeline(world)  # initializes xfuser's groups
    group = get_sp_group().ring_group
    model = _LongCtxModel(group)
    gen = torch.Generator().manual_seed(10)
    b, s, h, d = 2, 6, HEADS, HEAD_DIM
    qs, ks, vs = (torch.randn(world, b, s, h, d, generator=gen) for _ in range(3))
    jk, jv = torch.randn(b, 3, h, d, generator=gen), torch.randn(b, 3, h, d, generator=gen)
    handle = patch(model, CompactConfig(codec="none"), seam="long_ctx")
    try:
        with torch.no_grad():
            out = model(qs[rank], ks[rank], vs[rank], jk, jv, timestep=torch.tensor([999]))
        full_k = torch.cat([jk, *ks], dim=1).transpose(1, 2)
        full_v = torch.cat([jv, *vs], dim=1).transpose(1, 2)
        ref = torch.nn.functional.scaled_dot_product_attention(qs[rank].transpose(1, 2), full_k, full_v).transpose(1, 2)
        nbytes = handle.stats.get("kv_ring").bytes
    finally:
        handle.remove()
    lc = model.processor.hybrid_seq_parallel_attn
    dist.barrier(group)
    return {"out": out, "ref": ref, "bytes": nbytes, "restored": lc.ring_attn_fn is _xdit_ring_stand_in}


# -- tests ---------------------------------------------------------------------------------------
def _ring_bytes(codec: str, ulysses: int = 1) -> int:
    """Analytic kv_ring bytes per rank for one request: STEPS x LAYERS x (K, V) x (P-1) hops,
    plus one wire header per hop (K and V travel as one payload, checked with the data by
    ccomm.comm.send_recv).

    Ring of 2: after Ulysses' all-to-all a rank holds half the tokens and 1/ulysses of the heads.
    """
    headers = STEPS * LAYERS * HEADER_BYTES
    n = 2 * (SAMPLE // 2) ** 2 // 2  # batched CFG (2) x 8 tokens per ring rank
    c = HEADS * HEAD_DIM // ulysses
    raw = n * c * 4  # fp32
    if codec == "none":
        return STEPS * LAYERS * 2 * raw + headers
    assert codec == "int2"
    compressed = (n + c) * 4 + math.ceil(n * c / 4)
    return LAYERS * 2 * (raw + (STEPS - 1) * compressed) + headers  # raw_steps=1: step 0 raw


@pytest.fixture
def pool(cf_pool: Callable[[int], RankPool]) -> RankPool:
    return cf_pool(2)


def test_installed_xfuser_has_the_seam_signatures() -> None:
    import ast
    import inspect

    from xfuser.model_executor.layers import usp

    assert tuple(inspect.signature(usp.ring_attn).parameters) == USP_RING_PARAMS
    # The long-context ring module does not import without CUDA (yunchang's AttnType is None
    # there), so read its signature from the installed source.
    src = Path(xfuser.__file__).parent / "core" / "long_ctx_attention" / "ring" / "ring_flash_attn.py"
    fn = next(n for n in ast.parse(src.read_text()).body
              if isinstance(n, ast.FunctionDef) and n.name == "xdit_ring_flash_attn_func")
    assert tuple(a.arg for a in fn.args.args) == LONG_CTX_RING_PARAMS


def test_cpu_env_patch_is_idempotent_and_selects_gloo() -> None:
    import xfuser.envs as envs

    if torch.cuda.is_available():
        pytest.skip("cpu_env_patch() is a no-op with an accelerator")
    assert cpu_env_patch() is True
    assert cpu_env_patch() is True
    assert envs.get_torch_distributed_backend() == "gloo"
    assert envs.get_device_version() is None


_NO_TRITON = """
import sys
import compactfusion.adapters.xfuser as adapter
assert "xfuser" not in sys.modules and "diffusers" not in sys.modules  # the adapter imports lazily

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError("No module named 'triton'", name="triton")

sys.meta_path.insert(0, NoTriton())
try:
    adapter.cpu_env_patch()
except ModuleNotFoundError as exc:
    assert exc.name == "triton", exc
else:
    raise AssertionError("xfuser imported without triton")
left = sorted(n for n in sys.modules if n == "xfuser" or n.startswith("xfuser."))
assert not left, left  # a failed patch leaves no half-imported xfuser behind
print("ok")
"""


@pytest.mark.slow  # a fresh interpreter importing torch, diffusers and most of xfuser: 10-30 s here
def test_cpu_env_patch_without_triton_fails_cleanly() -> None:
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("cpu_env_patch() is a no-op with an accelerator")
    res = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@pytest.mark.parametrize("mode", ["patch", "distrifusion"])
def test_modes_other_than_ring_are_refused(mode: str) -> None:
    with pytest.raises(ValueError, match="only mode='ring'"):
        patch(object(), CompactConfig(mode=mode, codec="none"))


def test_unknown_seam_is_refused() -> None:
    with pytest.raises(ValueError, match="seam='ring_fn'"):
        patch(object(), CompactConfig(), seam="ring_fn")


@pytest.mark.multiprocess
def test_none_matches_single_process_output(pool: RankPool) -> None:
    res = pool.run(_run_codec, "none", 0, timeout=240.0)
    assert [r["diff"] is None for r in res] == [True, False]  # xfuser returns latents on the last rank only
    assert res[1]["diff"] <= 1e-4, res
    for r in res:
        assert (r["seam"], r["step"], r["layers"]) == ("usp", STEPS, LAYERS)
        assert r["bytes"] == _ring_bytes("none")


@pytest.mark.multiprocess
def test_int2_bases_stay_identical_every_step(pool: RankPool) -> None:
    res = pool.run(_run_codec, "int2", 1, timeout=240.0)  # check_every=1 raises on any base mismatch
    for r in res:
        assert (r["step"], r["layers"]) == (STEPS, LAYERS)
        assert r["bytes"] == _ring_bytes("int2")
    assert res[1]["finite"]
    # Lossy but close: measured 0.014 max abs deviation (latents up to 25 in magnitude; replacing
    # self-attention by a uniform average moves them by 0.54, so the 1e-4 parity is not vacuous).
    assert 0.0 < res[1]["diff"] < 0.1, res


@pytest.mark.multiprocess
def test_remove_restores_xfuser(pool: RankPool) -> None:
    for r in pool.run(_run_restore, timeout=240.0):
        assert r["replaced"] and r["restored"] and r["hooks"], r
        assert r["state_nbytes"] > 0


@pytest.mark.multiprocess
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "HeunDiscreteScheduler"])
def test_second_request_starts_at_set_timesteps(pool: RankPool, scheduler: str) -> None:
    res = pool.run(_run_new_request, scheduler, timeout=240.0)
    assert res[1]["same"] is True
    for r in res:
        assert r["step"] == r["calls"]  # no reset inside a request (Heun repeats its timesteps)
        assert r["bytes"][0] == r["bytes"][1] == r["bytes_explicit"]  # per-request stats were reset too
        assert r["requests"] == (2, 1, 0, 0)
        if scheduler == "DDIMScheduler":
            assert r["calls"] == STEPS and r["bytes_explicit"] == _ring_bytes("int2")


@pytest.mark.multiprocess
def test_refusals_on_xfuser_runtime(pool: RankPool) -> None:
    for seen in pool.run(_run_refusals, timeout=240.0):
        assert seen == ["signature", "pipefusion", "long_ctx_absent"]


@pytest.mark.multiprocess
def test_long_ctx_seam_with_joint_tokens_matches_full_attention(pool: RankPool) -> None:
    for r in pool.run(_run_long_ctx, timeout=240.0):
        assert r["restored"]
        torch.testing.assert_close(r["out"], r["ref"], rtol=1e-4, atol=1e-5)  # spec 3.4, one forward
        # K and V as one payload, one hop, fp32, plus its wire header.
        assert r["bytes"] == 2 * 2 * 6 * HEADS * HEAD_DIM * 4 + HEADER_BYTES


@pytest.mark.slow
@pytest.mark.multiprocess
def test_hybrid_usp_ulysses2_ring2_on_4_ranks(cf_pool: Callable[[int], RankPool]) -> None:
    """Ulysses 2 x ring 2: only the ring part is ours; `none` still matches, int2 stays mirrored."""
    for codec, check_every in (("none", 0), ("int2", 1)):
        res = cf_pool(4).run(_run_codec, codec, check_every, 2, timeout=300.0)
        for r in res:
            assert (r["seam"], r["step"], r["layers"]) == ("usp", STEPS, LAYERS)
            assert r["bytes"] == _ring_bytes(codec, ulysses=2)
        assert [r["diff"] is None for r in res] == [True, True, True, False]
        if codec == "none":
            assert res[3]["diff"] <= 1e-4, res
        else:
            assert 0.0 < res[3]["diff"] < 0.1, res
