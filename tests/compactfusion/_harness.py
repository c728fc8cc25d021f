"""Shared helpers of the CompactFusion tests: tiny random-weight models and rank functions.

Models are built from tiny configs with every parameter redrawn from a seeded Gaussian
(diffusers zero-initialises the adaLN-zero gates and output layers, which would make
attention invisible in the output and parity tests vacuous).

Rank functions (module level, so `RankPool` can pickle them) take `(rank, world, ...)`.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch


def _import_real_package() -> None:
    """Import the `compactfusion` package, not this test directory.

    pytest puts `tests/` on sys.path (tests/conftest.py); in a spawned rank process,
    `import compactfusion` would then resolve to the namespace package `tests/compactfusion`
    before the editable-install finder is asked. Import the real one first, once.
    """
    mod = sys.modules.get("compactfusion")
    if mod is not None and getattr(mod, "__file__", None):
        return
    sys.modules.pop("compactfusion", None)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != tests_dir]
    try:
        importlib.import_module("compactfusion")
    finally:
        sys.path[:] = saved


_import_real_package()
from ccomm.ranks import RankError, RankPool, run_ranks  # noqa: E402,F401

__all__ = ["tiny_model", "model_inputs", "randomize_", "forward", "denoise", "RankPool", "RankError", "run_ranks"]

KINDS = ("dit", "pixart", "flux")


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_model(kind: str = "dit", dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A tiny random-weight DiT / PixArt / Flux transformer (16 image tokens of 2 x 8 channels)."""
    if kind == "dit":
        from diffusers import DiTTransformer2DModel

        m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    elif kind == "pixart":
        from diffusers import PixArtTransformer2DModel

        m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                     num_layers=layers, sample_size=8, patch_size=2, cross_attention_dim=16,
                                     caption_channels=12, norm_type="ada_norm_single", use_additional_conditions=False)
    elif kind == "flux":
        from diffusers import FluxTransformer2DModel

        m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=layers - 1 or 1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=6, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    else:
        raise ValueError(kind)
    randomize_(m, seed)
    if dtype != torch.float32:
        m = m.to(dtype)
    return m.eval().requires_grad_(False)


def model_inputs(kind: str, batch: int = 2, seed: int = 1, t: float = 500.0, dtype: torch.dtype = torch.float32,
                 side: int = 8) -> dict[str, Any]:
    """Keyword inputs of one forward call (identical on every rank for a given seed)."""
    g = torch.Generator().manual_seed(seed)
    ts = torch.full((batch,), t)
    if kind == "dit":
        return {"hidden_states": torch.randn(batch, 4, side, side, generator=g).to(dtype), "timestep": ts.long(),
                "class_labels": torch.arange(batch) % 10}
    if kind == "pixart":
        return {"hidden_states": torch.randn(batch, 4, side, side, generator=g).to(dtype), "timestep": ts.long(),
                "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g).to(dtype),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if kind == "flux":
        h = w = side // 2
        img_ids = torch.zeros(h * w, 3)
        img_ids[:, 1] = torch.arange(h).repeat_interleave(w).float()
        img_ids[:, 2] = torch.arange(w).repeat(h).float()
        return {"hidden_states": torch.randn(batch, h * w, 8, generator=g).to(dtype),
                "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g).to(dtype),
                "pooled_projections": torch.randn(batch, 6, generator=g).to(dtype), "timestep": ts / 1000.0,
                "img_ids": img_ids, "txt_ids": torch.zeros(5, 3)}
    raise ValueError(kind)


def forward(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def denoise(model: torch.nn.Module, kind: str, steps: int = 4, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A few-step Euler-style loop: x <- x - 0.1 * model(x, t) with decreasing t."""
    inputs = model_inputs(kind, seed=seed, dtype=dtype)
    x = inputs["hidden_states"]
    for i in range(steps):
        t = 900.0 - i * (800.0 / max(steps - 1, 1))
        step_in = dict(inputs, hidden_states=x)
        step_in["timestep"] = (torch.full((x.shape[0],), t) / 1000.0) if kind == "flux" else torch.full((x.shape[0],), t).long()
        out = forward(model, step_in)
        x = x - 0.1 * out[:, : x.shape[1]].to(x.dtype)
    return x
