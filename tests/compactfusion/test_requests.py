"""Request boundaries under real diffusers schedulers (issue 11, item 1).

Unit part: `RequestTracker` fed the model-call timesteps of real schedulers, two requests in a
row. Multi-process part: the committed tiny DiT on 2 gloo ranks (ring, int2), sampled with
Heun, Euler-ancestral, DPM++ 2M, DPM++ 2S (single-step), DDIM and KDPM2-ancestral (whose
timesteps rise inside a request), both in a plain loop over the bare transformer (timestep
rule) and through a `DiTPipeline` passed to `parallelize` (watched scheduler). Each request's
bytes and output must equal those of a run with an explicit `reset()` between requests, and no
reset may happen inside a request.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import pytest
import torch

from _harness import RankPool  # first: makes `compactfusion` the real package in rank processes

from compactfusion.requests import RequestTracker

STEPS = 4
LABELS = [1, 7]

#: name -> (diffusers class, constructor kwargs, inference steps). KDPM2-ancestral runs 10 steps:
#: there its interleaved timesteps rise mid-request (by float noise, e.g. 554.99994 -> 555.0).
SAMPLERS: dict[str, tuple[str, dict[str, Any], int]] = {
    "heun": ("HeunDiscreteScheduler", {}, STEPS),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, STEPS),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, STEPS),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, STEPS),
    "ddim": ("DDIMScheduler", {}, STEPS),
    "kdpm2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}, 10),
}


def _scheduler(name: str) -> Any:
    import diffusers

    cls, kw, _ = SAMPLERS[name]
    return getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule="linear", **kw)


def _calls(name: str, steps: int | None = None) -> list[float]:
    s = _scheduler(name)
    s.set_timesteps(steps or SAMPLERS[name][2])
    return [float(t) for t in s.timesteps]


# -- unit: the tracker on real schedules ------------------------------------------------------
def _feed(tracker: RequestTracker, ts: list[float]) -> list[str | None]:
    return [tracker.before_forward(t, True) for t in ts]


@pytest.mark.parametrize("name", [*SAMPLERS, "pndm"])
def test_timestep_rule_finds_exactly_the_request_starts(name: str) -> None:
    if name == "pndm":
        from diffusers import PNDMScheduler

        s = PNDMScheduler()
        s.set_timesteps(8)
        ts = [float(t) for t in s.timesteps]
    else:
        ts = _calls(name)
    tr = RequestTracker()
    causes = _feed(tr, ts) + _feed(tr, ts) + _feed(tr, _calls("euler_ancestral", 3))  # starts at 999
    assert causes == [None] * len(ts) + ["timestep"] + [None] * (len(ts) - 1) + ["timestep", None, None]
    assert (tr.stats.requests, tr.stats.timestep, tr.stats.suspect, tr.stats.resets) == (3, 2, 0, 2)


def test_the_old_rule_would_have_reset_inside_these_requests() -> None:
    """Guards the test's premise: Heun repeats and KDPM2-ancestral raises timesteps mid-request."""
    for name in ("heun", "kdpm2_ancestral"):
        ts = _calls(name)
        assert any(not b < a for a, b in zip(ts, ts[1:])), name


def test_a_request_starting_below_the_previous_start_continues_it(caplog: pytest.LogCaptureFixture) -> None:
    """The documented limit of the rule (img2img, fewer 'leading' steps): no reset, an INFO line."""
    tr = RequestTracker()
    with caplog.at_level(logging.INFO, logger="compactfusion.requests"):
        causes = _feed(tr, _calls("ddim", 10)) + _feed(tr, _calls("ddim", 3))  # starts 900, then 666
    assert causes == [None] * 13 and tr.stats.resets == 0
    assert any("below the request's start" in r.getMessage() for r in caplog.records)


def test_one_call_requests_and_ascending_schedules(caplog: pytest.LogCaptureFixture) -> None:
    tr = RequestTracker()
    assert _feed(tr, [999.0, 999.0, 999.0]) == [None, "timestep", "timestep"]  # 1-step requests
    assert tr.stats.suspect == 0
    from diffusers import DDIMInverseScheduler

    s = DDIMInverseScheduler()
    s.set_timesteps(4)
    tr = RequestTracker()
    with caplog.at_level(logging.WARNING, logger="compactfusion.requests"):
        _feed(tr, [float(t) for t in s.timesteps])
    # every rise is a reset under the rule: counted as suspect, warned about once
    assert tr.stats.suspect == tr.stats.timestep == 3
    assert len([r for r in caplog.records if "reset the state" in r.getMessage()]) == 1
    tr = RequestTracker()
    tr.watch(s)  # with the scheduler watched the same schedule is one request
    s.set_timesteps(4)
    assert _feed(tr, [float(t) for t in s.timesteps]) == [None] * 4 and tr.stats.resets == 0


def test_watched_scheduler_and_pipeline_swap() -> None:
    from types import SimpleNamespace

    s1 = _scheduler("heun")
    pipe = SimpleNamespace(scheduler=s1)
    tr = RequestTracker()
    tr.watch(pipe)
    sig = inspect.signature(s1.set_timesteps)
    assert "num_inference_steps" in sig.parameters  # diffusers' retrieve_timesteps inspects it
    for _ in range(2):
        s1.set_timesteps(STEPS)
        _feed(tr, [float(t) for t in s1.timesteps])
    assert (tr.stats.requests, tr.stats.scheduler, tr.stats.timestep) == (2, 1, 0)
    pipe.scheduler = s2 = _scheduler("ddim")  # swapped between calls: a boundary, and s2 is watched
    s2.set_timesteps(3)
    assert _feed(tr, [float(t) for t in s2.timesteps]) == ["scheduler", None, None]
    s2.set_timesteps(3)
    assert _feed(tr, [float(t) for t in s2.timesteps])[0] == "scheduler"
    assert "set_timesteps" not in vars(s1)  # the old one was restored
    tr.unwatch()
    assert "set_timesteps" not in vars(s2)
    with pytest.raises(ValueError, match="scheduler"):
        tr.watch(object())


# -- multi-process: the tiny DiT on 2 ranks ----------------------------------------------------
def _loop(model: torch.nn.Module, sched: Any, seed: int, steps: int) -> torch.Tensor:
    """A plain sampling loop over the bare transformer (no CFG), as the diffusers docs write it."""
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(len(LABELS), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    x = x * sched.init_noise_sigma
    labels = torch.tensor(LABELS)
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            out = model(inp, timestep=t.reshape(1).expand(len(LABELS)), class_labels=labels).sample
            x = sched.step(out, t, x, **({"generator": g} if takes_gen else {})).prev_sample
    return x


def _pipeline(model: torch.nn.Module, sched: Any) -> Any:
    from diffusers import AutoencoderKL, DiTPipeline

    torch.manual_seed(0)
    c = model.config.in_channels
    vae = AutoencoderKL(in_channels=c, out_channels=c, latent_channels=c, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, layers_per_block=1, sample_size=model.config.sample_size)
    return DiTPipeline(transformer=model, vae=vae.eval(), scheduler=sched)


def _via_pipe(pipe: Any, seed: int, steps: int) -> torch.Tensor:
    out = pipe(LABELS, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
               num_inference_steps=steps, output_type="np")
    return torch.from_numpy(out.images)


def _r_sampler(rank: int, world: int, name: str, how: str) -> dict[str, Any]:
    import diffusers

    import compactfusion as cf
    from compactfusion.models.tiny_dit import load_tiny_dit

    diffusers.utils.logging.set_verbosity_error()
    model = load_tiny_dit().requires_grad_(False)
    calls = len(_calls(name))
    res: dict[str, Any] = {"calls": calls}
    for mode in ("auto", "explicit"):
        sched = _scheduler(name)
        cfg = cf.CompactConfig(codec="int2", wire_dtype="fp16", check_every=1,
                               new_request="timestep" if mode == "auto" else "off")
        pipe = _pipeline(model, sched) if how == "pipeline" else None
        h = cf.parallelize(pipe if pipe is not None else model, cfg)
        rows = []
        for seed in (0, 1):
            if mode == "explicit":
                h.reset()
            steps = SAMPLERS[name][2]
            out = _via_pipe(pipe, seed, steps) if pipe is not None else _loop(model, sched, seed, steps)
            rows.append((out, h.stats.get("kv_ring").bytes, h.step))
        req = h.requests
        res[mode] = {"rows": rows, "requests": (req.requests, req.scheduler, req.timestep, req.explicit, req.suspect)}
        h.remove()
    return res


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", ["loop", "pipeline"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_requests_match_explicit_resets(cf_pool: Callable[[int], RankPool], name: str, how: str) -> None:
    for r in cf_pool(2).run(_r_sampler, name, how, timeout=600.0):
        auto, explicit = r["auto"], r["explicit"]
        for (out_a, bytes_a, step_a), (out_e, bytes_e, step_e) in zip(auto["rows"], explicit["rows"]):
            assert torch.equal(out_a, out_e)
            assert bytes_a == bytes_e > 0
            # no reset inside a request: the handle counted every model call of it
            assert step_a == step_e == r["calls"]
        # exactly one automatic reset, at the start of the second request, from the right source
        expect = (2, 1, 0, 0, 0) if how == "pipeline" else (2, 0, 1, 0, 0)
        assert auto["requests"] == expect
        # requests: the pipeline's watch still sees set_timesteps; explicit resets counted as such
        assert explicit["requests"][3] == 2 and explicit["requests"][4] == 0
