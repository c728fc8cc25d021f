"""CompactFusion core on 2 and 4 gloo ranks: parity (spec 3.4), bytes, bases, restore, refusals.

Rank functions (`_r_*`) run inside `RankPool` subprocesses, build tiny random-weight
models from fixed seeds and return plain data; the assertions run in the parent.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch

from _harness import RankPool, denoise, forward, model_inputs, tiny_model

pytestmark = pytest.mark.multiprocess

STEPS = 4


def _cfg(**kw: Any) -> Any:
    from compactfusion import CompactConfig

    return CompactConfig(**kw)


# -- rank functions ---------------------------------------------------------------------------


def _r_parity(rank: int, world: int, kinds: list[str], modes: list[str], codecs: list[str]) -> dict:
    import compactfusion as cf

    res: dict = {}
    for kind in kinds:
        model = tiny_model(kind)
        ref, ref_loop = forward(model, model_inputs(kind)), denoise(model, kind, STEPS)
        res[(kind, "ref")] = (ref, ref_loop)
        for mode in modes:
            for codec in codecs:
                h = cf.parallelize(model, cf.CompactConfig(mode=mode, codec=codec))
                out = forward(model, model_inputs(kind))
                h.reset()
                loop = denoise(model, kind, STEPS)
                h.remove()
                res[(kind, mode, codec)] = (out, loop)
        # distrifusion with warm-up >= steps never goes stale: bitwise equal to patch/none
        h = cf.parallelize(model, cf.CompactConfig(mode="distrifusion", codec="none", raw_steps=STEPS))
        res[(kind, "distrifusion", "W>=steps")] = (None, denoise(model, kind, STEPS))
        h.remove()
    return res


def _r_dtypes(rank: int, world: int) -> dict:
    import compactfusion as cf

    res = {}
    for dtype in (torch.float16, torch.bfloat16):
        model = tiny_model("dit", dtype=dtype)
        inp = model_inputs("dit", dtype=dtype)
        ref = forward(model, inp).float()
        for mode in ("ring", "patch"):
            for codec in ("none", "identity"):
                h = cf.parallelize(model, cf.CompactConfig(mode=mode, codec=codec))
                res[(str(dtype), mode, codec)] = ((forward(model, inp).float() - ref).abs().max().item(), ref.abs().max().item())
                h.remove()
    return res


def _r_spy(rank: int, world: int, codecs: list[str]) -> dict:
    """Ring: the first block of every layer is the exact local K/V, whatever the codec."""
    import compactfusion as cf
    from compactfusion import attention as A
    from compactfusion.state import CompactState

    model = tiny_model("dit")
    blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
    sent: dict = {}
    events: list[str] = []
    orig_block, orig_send, orig_sr = A.block_attention, CompactState.send, A.send_recv

    def spy_block(q, k, v, scale):  # type: ignore[no-untyped-def]
        blocks.append((k.clone(), v.clone()))
        events.append("block")
        return orig_block(q, k, v, scale)

    def spy_sr(*args, **kwargs):  # type: ignore[no-untyped-def]
        events.append("post")
        return orig_sr(*args, **kwargs)

    def spy_send(self, key, x, compressed, **kw):  # type: ignore[no-untyped-def]
        sent.setdefault((key.layer, key.kind), []).append(x.clone())
        return orig_send(self, key, x, compressed, **kw)

    A.block_attention, CompactState.send, A.send_recv = spy_block, spy_send, spy_sr
    res = {}
    try:
        for codec in codecs:
            blocks.clear()
            sent.clear()
            events.clear()
            h = cf.parallelize(model, cf.CompactConfig(codec=codec))
            denoise(model, "dit", 3)
            h.remove()
            n_layers = 2
            ok = []
            for i in range(0, len(blocks), world):  # block s = 0 of each (step, layer)
                layer, step = (i // world) % n_layers, (i // world) // n_layers
                k0, v0 = blocks[i]
                ek, ev = sent[(layer, "kv")][step]  # the (K, V) stack this rank encoded
                ok.append(torch.equal(k0.reshape(ek.shape), ek) and torch.equal(v0.reshape(ev.shape), ev))
                # later blocks are peers' reconstructions (lossy codecs: not the local K)
                if codec in ("int2", "binary") and step > 0:
                    ok.append(not torch.equal(blocks[i + 1][0].reshape(ek.shape), ek))
            # every hop is posted before the block it overlaps with is computed
            ok.append(events == (["post", "block"] * (world - 1) + ["block"]) * (3 * n_layers))
            res[codec] = (len(blocks), ok)
    finally:
        A.block_attention, CompactState.send, A.send_recv = orig_block, orig_send, orig_sr
    return res


def _digests(h: Any) -> dict:
    import hashlib

    rc = h.state.rc
    return {repr(k): hashlib.sha1(rc.base(k).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k in rc.keys()}


def _r_bases(rank: int, world: int, codecs: list[str], variants: list[str], mode: str, kind: str = "dit",
             debug_sizes: bool = False) -> dict:
    import os

    import compactfusion as cf

    if debug_sizes:
        os.environ["CCOMM_DEBUG_SIZES"] = "1"
    model = tiny_model(kind)
    res = {}
    for codec in codecs:
        for variant in variants:
            h = cf.parallelize(model, cf.CompactConfig(mode=mode, codec=codec, variant=variant, check_every=1))
            out = denoise(model, kind, 6)
            res[(codec, variant)] = (_digests(h), h.step, bool(torch.isfinite(out).all()))
            h.remove()
    os.environ.pop("CCOMM_DEBUG_SIZES", None)
    return res


def _r_mismatch(rank: int, world: int) -> str:
    """A base corrupted on rank 0 only must raise BaseMismatchError at the next check, on every rank."""
    import compactfusion as cf

    model = tiny_model("dit")
    h = cf.parallelize(model, cf.CompactConfig(codec="int2", check_every=1))
    inputs = model_inputs("dit")
    forward(model, inputs)
    if rank == 0:
        rc = h.state.rc
        key = sorted(rc.keys(), key=repr)[0]
        rc._state[key].base = rc.base(key) + 1e-3  # simulate a desync
    try:
        forward(model, dict(inputs, timestep=inputs["timestep"] - 100))
        return "no error"
    except cf.BaseMismatchError as exc:
        return "BaseMismatchError: " + str(exc)[:80]
    finally:
        h.remove()


def _r_bytes(rank: int, world: int, mode: str, codec: str) -> dict:
    import compactfusion as cf
    from ccomm import make_codec

    model = tiny_model("dit")
    h = cf.parallelize(model, cf.CompactConfig(mode=mode, codec=codec, wire_dtype="fp16"))
    steps = 3
    denoise(model, "dit", steps)
    snap = h.stats.snapshot()
    h.remove()
    b, s_loc, c, L = 2, 16 // world, 16, 2
    raw = b * s_loc * c * 2
    per = raw if codec == "none" else make_codec(codec).nbytes((b * s_loc, c), torch.float16)
    kv_per_step = [raw] + [per] * (steps - 1)  # step 0 always raw
    from ccomm.header import HEADER_BYTES

    if mode == "ring":
        # Plus one wire header per ring step (checked with the data: ccomm.comm.send_recv).
        expect = {"kv_ring": sum(2 * L * (world - 1) * x for x in kv_per_step) + steps * L * (world - 1) * HEADER_BYTES}
    else:
        # Plus one wire header per layer: the first gather of each signature is checked.
        expect = {"kv_gather": sum(2 * L * x for x in kv_per_step) + L * HEADER_BYTES}
    expect["token_gather"] = steps * b * s_loc * (2 * 2 * 4) * 4  # fp32 model output, patch 2x2, 4 channels
    got = {k: sum(o.bytes for o in ops.values()) for k, ops in snap.items()}
    return {"expect": expect, "got": got}


def _r_remove(rank: int, world: int) -> dict:
    import compactfusion as cf
    from compactfusion.parallel import attn_processors

    res = {}
    for kind in ("dit", "pixart"):
        fresh, model = tiny_model(kind), tiny_model(kind)
        procs = {k: type(v) for k, v in attn_processors(model).items()}
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        h = cf.parallelize(model, cf.CompactConfig(codec="int2"))
        denoise(model, kind, 3)
        h.remove()
        h.remove()  # idempotent
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        errors = []
        for fn in (h.reset, h.state_nbytes, lambda: h.step):
            try:
                fn()
            except RuntimeError:
                errors.append("RuntimeError")
        h2 = cf.parallelize(model, cf.CompactConfig(codec="none"))  # allowed again after remove
        h2.remove()
        res[kind] = {
            "equal": torch.equal(denoise(model, kind, 3), denoise(fresh, kind, 3)),
            "procs": {k: type(v) for k, v in attn_processors(model).items()} == procs,
            "state": all(torch.equal(sd[k], v) for k, v in model.state_dict().items()),
            "hooks": hooks,
            "errors": errors,
            "mark": hasattr(model, "_compactfusion_handle"),
        }
    return res


def _expect(exc_type: type, fn: Callable[[], Any]) -> str:
    try:
        fn()
    except exc_type as exc:
        return f"{exc_type.__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - report the wrong type
        return f"WRONG {type(exc).__name__}: {exc}"
    return "no error"


def _r_refusals(rank: int, world: int) -> dict:
    import compactfusion as cf

    res = {}
    model = tiny_model("dit")
    h = cf.parallelize(model, cf.CompactConfig(codec="int2", new_request="off"))
    res["twice"] = _expect(ValueError, lambda: cf.parallelize(model, cf.CompactConfig()))
    inp = model_inputs("dit")
    forward(model, inp)
    res["shape"] = _expect(cf.CompactStateError, lambda: forward(model, model_inputs("dit", batch=4)))

    def grad() -> None:
        model.requires_grad_(True)
        try:
            model(**inp)
        finally:
            model.requires_grad_(False)

    res["autograd"] = _expect(RuntimeError, grad)
    h.reset()
    res["indivisible"] = _expect(ValueError, lambda: forward(model, model_inputs("dit", side=6 if world == 4 else 10)))
    h.remove()
    res["after_remove"] = _expect(RuntimeError, h.reset)
    res["class"] = _expect(ValueError, lambda: cf.parallelize(torch.nn.Linear(2, 2), cf.CompactConfig()))
    # fingerprint: rank 0 uses another codec -> ValueError on every rank, nobody hangs
    res["fingerprint"] = _expect(ValueError, lambda: cf.parallelize(model, cf.CompactConfig(codec="int2" if rank else "binary")))
    res["layers"] = _expect(ValueError, lambda: cf.parallelize(model, cf.CompactConfig(layers=(5,))))
    # on_shape_change="reset": a new shape restarts the request (raw step 0), equal to a fresh handle
    h = cf.parallelize(model, cf.CompactConfig(codec="int2", on_shape_change="reset", new_request="off"))
    forward(model, inp)
    big = model_inputs("dit", side=16)
    a = forward(model, big)
    h.remove()
    h = cf.parallelize(model, cf.CompactConfig(codec="int2"))
    res["reset_equal"] = torch.equal(a, forward(model, big))
    h.remove()
    # non-finite K/V: every rank raises FloatingPointError after the layer's exchange
    h = cf.parallelize(model, cf.CompactConfig(codec="int2"))
    bad = dict(inp, hidden_states=torch.full_like(inp["hidden_states"], float("nan")))
    res["nonfinite"] = _expect(FloatingPointError, lambda: forward(model, bad))
    h.remove()
    return res


def _r_features(rank: int, world: int) -> dict:
    import compactfusion as cf

    res: dict = {}
    model = tiny_model("dit")
    # record_errors: with EF the receiver deviation is exactly one compression error
    rows = {}
    for variant in ("ef", "no_ef", "naive"):
        h = cf.parallelize(model, cf.CompactConfig(codec="int2", variant=variant, record_errors=True))
        denoise(model, "dit", 5)
        rows[variant] = [{k: v for k, v in r.items() if k != "key"} for r in h.errors]
        h.reset()
        res.setdefault("errors_after_reset", []).append(len(h.errors))
        h.remove()
    res["rows"] = rows
    # memory: projected bound and the measured state after one step
    h = cf.parallelize(model, cf.CompactConfig(codec="int2"))
    forward(model, model_inputs("dit"))
    res["nbytes"] = (h.state_nbytes(), h.projected_state_nbytes(2, 16))
    h.reset()
    res["nbytes_after_reset"] = h.state_nbytes()
    h.remove()
    h = cf.parallelize(model, cf.CompactConfig(codec="int2", max_state_mb=0.001))
    res["max_state"] = _expect(ValueError, lambda: forward(model, model_inputs("dit")))
    h.remove()
    # new_request="timestep": a second generation without reset() equals the first
    h = cf.parallelize(model, cf.CompactConfig(codec="int2"))
    first, second = denoise(model, "dit", 3), denoise(model, "dit", 3)
    res["new_request"] = torch.equal(first, second)
    h.remove()
    h = cf.parallelize(model, cf.CompactConfig(codec="int2", new_request="off"))
    first, second = denoise(model, "dit", 3), denoise(model, "dit", 3)
    res["new_request_off_differs"] = not torch.equal(first, second)
    h.remove()
    # two handles in one process, interleaved, each equal to its own solo run
    m2 = tiny_model("dit", seed=3)
    solo = {}
    for name, m in (("a", model), ("b", m2)):
        h = cf.parallelize(m, cf.CompactConfig(codec="int2"))
        solo[name] = [forward(m, model_inputs("dit", t=900 - 100 * i)) for i in range(3)]
        h.remove()
    ha = cf.parallelize(model, cf.CompactConfig(codec="int2"))
    hb = cf.parallelize(m2, cf.CompactConfig(codec="int2"))
    inter = {"a": [], "b": []}
    for i in range(3):
        inter["a"].append(forward(model, model_inputs("dit", t=900 - 100 * i)))
        inter["b"].append(forward(m2, model_inputs("dit", t=900 - 100 * i)))
    ha.remove()
    hb.remove()
    res["two_handles"] = all(torch.equal(x, y) for n in "ab" for x, y in zip(solo[n], inter[n]))
    # calls_per_step=2 (un-batched CFG): identity codec still exact, branches keyed apart
    ref = [forward(model, model_inputs("dit", seed=s, t=800)) for s in (1, 2)]
    h = cf.parallelize(model, cf.CompactConfig(codec="identity", calls_per_step=2, check_every=1))
    outs = [forward(model, model_inputs("dit", seed=s, t=800)) for s in (1, 2)]
    res["cfg_branches"] = (max((a - b).abs().max().item() for a, b in zip(ref, outs)), h.step,
                           sorted({k.branch for k in h.state.rc.keys()}))
    h.remove()
    # policy / layers: uncompressed layers exchange raw and keep no state
    h = cf.parallelize(model, cf.CompactConfig(codec="int2", layers=(1,), policy=_policy))
    denoise(model, "dit", 3)
    res["policy_keys"] = sorted({k.layer for k in h.state.rc.keys()})
    h.remove()
    # distrifusion with a codec keeps mirrored bases (check_every=1) and differs from patch
    h = cf.parallelize(model, cf.CompactConfig(mode="distrifusion", codec="int2", check_every=1))
    res["distrifusion_int2"] = bool(torch.isfinite(denoise(model, "dit", 4)).all())
    h.remove()
    return res


def _policy(layer: int, step: int) -> bool:
    return step % 2 == 0


# -- tests -----------------------------------------------------------------------------------


def _assert_parity(res: dict, kinds: list[str], modes: list[str], codecs: list[str]) -> None:
    for kind in kinds:
        ref, ref_loop = res[(kind, "ref")]
        for mode in modes:
            for codec in codecs:
                out, loop = res[(kind, mode, codec)]
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=f"{kind} {mode} {codec}")
                assert (loop - ref_loop).abs().max().item() <= 1e-4, (kind, mode, codec)
        assert torch.equal(res[(kind, "distrifusion", "W>=steps")][1], res[(kind, "patch", "none")][1]), kind


@pytest.mark.parametrize("world", [2, 4])
def test_parity_none_and_identity_vs_single_process(cf_pool: Callable[[int], RankPool], world: int) -> None:
    kinds = ["dit", "pixart"] if world == 2 else ["dit"]
    modes, codecs = ["ring", "patch"], ["none", "identity"]
    res = cf_pool(world).run(_r_parity, kinds, modes, codecs, timeout=600)
    for r in res:
        _assert_parity(r, kinds, modes, codecs)
    # every rank returns the same (gathered) output
    for key, (out, loop) in res[0].items():
        assert torch.equal(loop, res[-1][key][1]), key


def test_parity_flux(cf_pool: Callable[[int], RankPool]) -> None:
    res = cf_pool(2).run(_r_parity, ["flux"], ["ring", "patch"], ["none", "identity"], timeout=600)
    _assert_parity(res[0], ["flux"], ["ring", "patch"], ["none", "identity"])


def test_half_precision_models(cf_pool: Callable[[int], RankPool]) -> None:
    for key, (diff, ref_max) in cf_pool(2).run(_r_dtypes, timeout=600)[0].items():
        assert diff <= 2e-2 * ref_max, (key, diff, ref_max)


def test_ring_first_block_is_exact_local_kv(cf_pool: Callable[[int], RankPool]) -> None:
    codecs = ["none", "identity", "int2", "binary", "lowrank:rank=2"]
    for r in cf_pool(2).run(_r_spy, codecs, timeout=600):
        for codec in codecs:
            n_blocks, ok = r[codec]
            assert n_blocks == 3 * 2 * 2, codec  # steps x layers x P
            assert ok and all(ok), (codec, ok)


@pytest.mark.parametrize("mode", ["ring", "patch"])
def test_bases_bit_identical_over_a_generation(cf_pool: Callable[[int], RankPool], mode: str) -> None:
    codecs = ["int2", "binary", "lowrank:rank=2"] if mode == "ring" else ["int2"]
    variants = ["ef", "naive"] if mode == "ring" else ["ef"]
    res = cf_pool(2).run(_r_bases, codecs, variants, mode, timeout=600)
    for key in res[0]:
        d0, step, finite = res[0][key]
        assert step == 6 and finite, key
        if key[1] != "naive":
            assert len(d0) == 2 * 2, key  # layers x sources, each base a (K, V) stack
        assert d0 == res[1][key][0], key


def test_flux_int2_bases_with_size_handshake(cf_pool: Callable[[int], RankPool]) -> None:
    res = cf_pool(2).run(_r_bases, ["int2"], ["ef"], "ring", "flux", True, timeout=600)
    d0, step, finite = res[0][("int2", "ef")]
    assert step == 6 and finite and len(d0) == 2 * 2 and d0 == res[1][("int2", "ef")][0]


def test_base_mismatch_is_detected(cf_pool: Callable[[int], RankPool]) -> None:
    for msg in cf_pool(2).run(_r_mismatch, timeout=300):
        assert msg.startswith("BaseMismatchError"), msg


@pytest.mark.parametrize("mode,codec", [("ring", "none"), ("ring", "int2"), ("ring", "lowrank:rank=2"), ("patch", "binary")])
def test_stats_bytes_equal_formula(cf_pool: Callable[[int], RankPool], mode: str, codec: str) -> None:
    for r in cf_pool(2).run(_r_bytes, mode, codec, timeout=300):
        assert r["got"] == r["expect"]


def test_ring_bytes_four_ranks(cf_pool: Callable[[int], RankPool]) -> None:
    for r in cf_pool(4).run(_r_bytes, "ring", "int2", timeout=300):
        assert r["got"] == r["expect"]


def test_remove_restores_bitwise(cf_pool: Callable[[int], RankPool]) -> None:
    for r in cf_pool(2).run(_r_remove, timeout=600):
        for kind, got in r.items():
            assert got == {"equal": True, "procs": True, "state": True, "hooks": 0,
                           "errors": ["RuntimeError"] * 3, "mark": False}, kind


def test_refusals(cf_pool: Callable[[int], RankPool]) -> None:
    for r in cf_pool(2).run(_r_refusals, timeout=600):
        assert r["twice"].startswith("ValueError") and "already" in r["twice"]
        assert r["shape"].startswith("CompactStateError") and "reset()" in r["shape"]
        assert r["autograd"].startswith("RuntimeError") and "inference" in r["autograd"]
        assert r["indivisible"].startswith("ValueError") and "P=2" in r["indivisible"] and "patch size 2" in r["indivisible"]
        assert r["after_remove"].startswith("RuntimeError")
        assert r["class"].startswith("ValueError") and "Linear" in r["class"]
        assert r["fingerprint"].startswith("ValueError") and "ranks [" in r["fingerprint"]
        # The error names the differing field with both values, and nothing that agrees.
        assert "config.codec: " in r["fingerprint"] and "'int2'" in r["fingerprint"] and "'binary'" in r["fingerprint"]
        assert "config.mode" not in r["fingerprint"]
        assert r["layers"].startswith("ValueError") and "layers" in r["layers"]
        assert r["reset_equal"] is True
        assert r["nonfinite"].startswith("FloatingPointError") and "layer 0" in r["nonfinite"]


def test_features(cf_pool: Callable[[int], RankPool]) -> None:
    r = cf_pool(2).run(_r_features, timeout=600)[0]
    rows = r["rows"]
    for variant, rs in rows.items():
        assert len(rs) == 5 * 2 * 2, variant  # steps x layers x {k, v} (own source only)
        assert all(math.isfinite(x["comp_err"]) and math.isfinite(x["deviation"]) for x in rs)
    for x in rows["ef"]:  # EF: receiver deviation == one compression error
        assert x["deviation"] == pytest.approx(x["comp_err"], rel=1e-4, abs=1e-5), x
        if x["step"] == 0:
            assert x["raw"] and x["comp_err"] == 0.0
    last = lambda v: sum(x["deviation"] for x in rows[v] if x["step"] == 4)  # noqa: E731
    assert last("no_ef") > last("ef") and last("naive") > last("ef"), {v: last(v) for v in rows}
    measured, projected = r["nbytes"]
    assert measured == projected == 2 * 2 * 2 * 16 * 16 * 4  # K,V x layers x batch x tokens x C x fp32
    assert r["nbytes_after_reset"] == 0 and r["errors_after_reset"] == [0, 0, 0]
    assert r["max_state"].startswith("ValueError") and "max_state_mb" in r["max_state"]
    assert r["new_request"] and r["new_request_off_differs"]
    assert r["two_handles"]
    diff, step, branches = r["cfg_branches"]
    assert diff <= 1e-5 and step == 1 and branches == [0, 1]
    assert r["policy_keys"] == [1]
    assert r["distrifusion_int2"]


def _r_groups(rank: int, world: int) -> dict:
    """Handles on sub-groups: pairs {0,1}, {2,3} (group ranks != global ranks) and singletons (P = 1)."""
    import torch.distributed as dist

    import compactfusion as cf

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    singles = [dist.new_group([r]) for r in range(world)]
    model = tiny_model("dit")
    ref = denoise(model, "dit", 3)
    res = {}
    for name, group in (("pair", pairs[rank // 2]), ("single", singles[rank])):
        for mode, codec in (("ring", "none"), ("patch", "identity"), ("ring", "int2"), ("patch", "int2")):
            kw = {"check_every": 1} if codec == "int2" else {}
            h = cf.parallelize(model, cf.CompactConfig(mode=mode, codec=codec, **kw), group=group)
            out = denoise(model, "dit", 3)
            res[(name, mode, codec)] = ((out - ref).abs().max().item(), h.world_size, h.rank)
            h.remove()
    h = cf.parallelize(model, cf.CompactConfig(mode="patch", codec="identity", patch_exact_local=True), group=pairs[rank // 2])
    res["exact_local"] = (denoise(model, "dit", 3) - ref).abs().max().item()
    h.remove()
    return res


def test_subgroups_and_single_rank(cf_pool: Callable[[int], RankPool]) -> None:
    res = cf_pool(4).run(_r_groups, timeout=600)
    for rank, r in enumerate(res):
        assert r["exact_local"] <= 1e-4
        for (name, mode, codec), (diff, size, grank) in ((k, v) for k, v in r.items() if k != "exact_local"):
            assert size == (2 if name == "pair" else 1) and grank == (rank % 2 if name == "pair" else 0)
            if codec != "int2" or name == "single":  # P = 1 exchanges nothing: exact
                assert diff <= 1e-4, (rank, name, mode, codec, diff)
            else:
                assert 0 < diff < 1.0, (rank, name, mode, codec, diff)  # lossy but sane


def _r_sample28(rank: int, world: int, mode: str) -> dict:
    """The 28-step DDIM sampler of compactfusion.models on the tiny DiT (committed weights if present)."""
    import importlib

    import compactfusion as cf

    S = importlib.import_module("compactfusion.models.sample")
    T = importlib.import_module("compactfusion.models.tiny_dit")

    try:
        model = T.load_tiny_dit()
    except (FileNotFoundError, OSError):
        from _harness import randomize_

        model = randomize_(T.build_tiny_dit(), 0, 0.05).eval()
    model.requires_grad_(False)
    labels = torch.tensor([3, 7])
    ref = S.sample(model, labels, steps=28, seed=0)
    out = {}
    for codec in ("none", "int2"):
        h = cf.parallelize(model, cf.CompactConfig(mode=mode, codec=codec))
        out[codec] = (S.sample(model, labels, steps=28, seed=0) - ref).abs().max().item()
        h.remove()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ring", "patch"])
def test_28_step_sample_parity(cf_pool: Callable[[int], RankPool], mode: str) -> None:
    for r in cf_pool(2).run(_r_sample28, mode, timeout=900):
        assert r["none"] <= 1e-4, r
        assert r["int2"] > r["none"], r  # the codec is really in the loop
