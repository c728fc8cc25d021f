"""The tiny MNIST DiT of CompactFusion: config, construction and loading (docs/design/compactfusion.md#tiny-model).

A diffusers `DiTTransformer2DModel` in pixel space: 1 channel, 32×32 input (28×28 digits padded
with −1), patch 4 → 64 tokens, 4 blocks of 4 heads × 32 channels, 10 digit labels plus the null
label (index 10) for classifier-free guidance. It is built from a plain config dict, so it takes
the same `compactfusion.parallelize()` path as any other DiT.

diffusers gives every block its own `CombinedTimestepLabelEmbeddings`, each with its own label
dropout drawn independently in training mode (and the output head re-embeds through block 0's).
Independent drops per block would train a mixture of half-conditioned paths, so `build_tiny_dit`
switches that built-in dropout off and the training script drops labels once per sample instead
(see `train.py`). The embedding tables keep their null row either way.

Loading (`load_tiny_dit`):
1. read `config.json` and `model.safetensors` (fp16) from the committed checkpoint directory;
2. build the model from the config with built-in dropout disabled;
3. load the weights, cast to the requested dtype, set eval mode and disable autograd on parameters.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_DIR",
    "NUM_CLASSES",
    "NULL_LABEL",
    "tiny_dit_config",
    "build_tiny_dit",
    "load_tiny_dit",
    "save_tiny_dit",
]

logger = logging.getLogger(__name__)

#: Directory of the committed checkpoint (weights + metadata JSON).
CHECKPOINT_DIR = Path(__file__).resolve().parent / "tiny_dit"
NUM_CLASSES = 10
#: Label index of the unconditional ("null") embedding used for classifier-free guidance.
NULL_LABEL = NUM_CLASSES
WEIGHTS_NAME = "model.safetensors"
PREDICTION_TYPES = ("epsilon", "v_prediction")
CONFIG_NAME = "config.json"


def tiny_dit_config() -> dict[str, Any]:
    """Keyword arguments of `DiTTransformer2DModel` for the tiny model (a fresh dict each call)."""
    return {
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "in_channels": 1,
        "out_channels": 1,  # ε only: no learned variance
        "num_layers": 4,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": 32,
        "patch_size": 4,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": NUM_CLASSES,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-5,
    }


def _disable_builtin_label_dropout(model: torch.nn.Module) -> None:
    """Set every diffusers `LabelEmbedding`'s dropout to 0 (the table keeps its null row)."""
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            if m.embedding_table.num_embeddings != m.num_classes + 1:
                raise RuntimeError("LabelEmbedding lost its null row; diffusers changed its CFG layout")
            m.dropout_prob = 0.0


def build_tiny_dit(config: dict[str, Any] | None = None, prediction_type: str = "epsilon") -> "torch.nn.Module":
    """A freshly initialised tiny DiT (weights from torch's global RNG; seed it before calling).

    `prediction_type` ("epsilon" or "v_prediction") is what the network's output means; it is
    registered in `model.config` (diffusers models do not carry it) so `sample()` reads it from there.
    A `prediction_type` key inside `config` (as saved in config.json) takes precedence.
    """
    from diffusers import DiTTransformer2DModel

    kwargs = dict(config if config is not None else tiny_dit_config())
    prediction_type = kwargs.pop("prediction_type", prediction_type)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    model = DiTTransformer2DModel(**kwargs)
    model.register_to_config(prediction_type=prediction_type)
    _disable_builtin_label_dropout(model)
    return model


def save_tiny_dit(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write `config.json` and fp16 `model.safetensors` into `out_dir`; returns the weights path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()}
    path = out / WEIGHTS_NAME
    save_file(state, str(path))
    return path


def load_tiny_dit(dtype: torch.dtype = torch.float32, path: str | Path | None = None) -> "torch.nn.Module":
    """The trained tiny DiT from `path` (default: the committed checkpoint), in eval mode."""
    from safetensors.torch import load_file

    ckpt = Path(path) if path is not None else CHECKPOINT_DIR
    weights = ckpt / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"no tiny DiT weights at {weights}; train them with "
            f"`python -m compactfusion.models.train --out {ckpt}`"
        )
    config = json.loads((ckpt / CONFIG_NAME).read_text())
    model = build_tiny_dit(config)
    state = load_file(str(weights))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    logger.debug("loaded tiny DiT from %s as %s", ckpt, dtype)
    return model
