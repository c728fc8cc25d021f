"""compactfusion.models.train: `--quick` smoke run into a temp dir, config validation, data helpers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compactfusion.models.data import digits_sha256, holdout_split, to_classifier_input, to_model_space
from compactfusion.models.train import QUICK_STEPS, TrainConfig, main


def test_train_quick_smoke(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    from compactfusion.models.classifier import load_classifier
    from compactfusion.models.tiny_dit import CHECKPOINT_DIR, load_tiny_dit

    out = tmp_path / "quick"
    assert main(["--out", str(out), "--quick", "--no-progress"]) == 0
    meta = json.loads((out / "train.json").read_text())
    assert meta["train_config"]["steps"] == QUICK_STEPS and meta["seed"] == 0
    curve = meta["loss_curve"]
    assert curve[-1][0] == QUICK_STEPS and all(math.isfinite(v) for _, v in curve)
    # 50 steps of AdamW already cut the epsilon-MSE well below its starting value (~1 at init)
    first = np.mean([v for _, v in curve[:5]])
    last = np.mean([v for _, v in curve[-5:]])
    assert last < 0.7 * first, (first, last)
    assert 0.0 <= meta["gate"]["accuracy"] <= 1.0 and meta["gate"]["samples"] == 20
    assert meta["classifier"]["heldout_accuracy"] > 0.5  # one epoch: far above chance (0.1)
    assert (out / "model.safetensors").stat().st_size <= 5 * 1024 * 1024
    model = load_tiny_dit(path=out)
    assert sum(p.numel() for p in model.parameters()) == meta["params"]
    load_classifier(out)
    committed = CHECKPOINT_DIR / "train.json"
    if committed.is_file():  # same digits as the committed model
        assert json.loads(committed.read_text())["data"]["sha256"] == meta["data"]["sha256"]


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", 0), ("lr", 0.0), ("label_dropout", 1.5),
                                         ("threads", 0), ("gate_threshold", -0.1), ("seed", -1), ("steps", 2.5),
                                         ("gate_every", -1), ("prediction_type", "sample")])
def test_train_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_data_scaling_padding_and_crop_round_trip() -> None:
    pixels = np.arange(2 * 784, dtype=np.int64).reshape(2, 784) % 256
    x = to_model_space(pixels.astype(np.uint8))
    assert x.shape == (2, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.all(x[..., :2, :] == -1) and torch.all(x[..., :, -2:] == -1)  # padded with background
    back = to_classifier_input(x)
    assert back.shape == (2, 1, 28, 28)
    torch.testing.assert_close(back.flatten(1) * 255, torch.from_numpy(pixels).float(), rtol=0, atol=1e-4)


def test_digits_hash_depends_on_pixels_and_labels() -> None:
    px = np.zeros((3, 784), dtype=np.uint8)
    y = np.array([0, 1, 2])
    h = digits_sha256(px, y)
    assert len(h) == 64 and h == digits_sha256(px.copy(), y.copy())
    px2 = px.copy()
    px2[0, 0] = 1
    assert digits_sha256(px2, y) != h and digits_sha256(px, y[::-1].copy()) != h


def test_holdout_split_is_stratified_and_disjoint() -> None:
    y = np.repeat(np.arange(10), 20)
    tr, te = holdout_split(y, 5, seed=0)
    assert len(te) == 50 and np.all(np.bincount(y[te]) == 5)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
    assert np.array_equal(te, holdout_split(y, 5, seed=0)[1])
