"""The sanity-gate classifier: a small CNN that labels 28×28 digits in [0, 1].

It only has to tell whether a generated digit looks like the class it was conditioned on
(docs/design/compactfusion.md#tiny-model: ≥ 60 % of 100 class-conditioned samples; random guessing ≈ 10 %).

Training (`train_classifier`, a few seconds on 2 cores):
1. hold out `per_class` digits of each class (fixed split seed) for an honest accuracy;
2. train the CNN with Adam (lr 1e-3, batch 64) for `epochs` epochs on the rest, shuffled by a
   seeded generator;
3. report the held-out accuracy beside the model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import DIGIT_SIZE, holdout_split

__all__ = ["DigitCnn", "train_classifier", "accuracy", "save_classifier", "load_classifier", "CLASSIFIER_NAME"]

logger = logging.getLogger(__name__)

CLASSIFIER_NAME = "classifier.safetensors"


class DigitCnn(nn.Module):
    """conv5(16) → pool → conv5(32) → pool → linear(10), on (N, 1, 28, 28) inputs in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)  # 28 -> 24, pooled to 12
        self.conv2 = nn.Conv2d(16, 32, 5)  # 12 -> 8, pooled to 4
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, images01: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images01` (N, 1, 28, 28) in [0, 1] that `model` labels as `labels`."""
    was = model.training
    model.eval()
    try:
        pred = model(images01.float()).argmax(dim=1)
    finally:
        model.train(was)
    return float((pred == labels.to(pred.device)).float().mean().item())


def train_classifier(pixels: np.ndarray, labels: np.ndarray, *, epochs: int = 3, per_class: int = 50,
                     seed: int = 0) -> tuple[DigitCnn, float]:
    """Train the CNN on uint8 (N, 784) digits; returns (model in eval mode, held-out accuracy)."""
    if epochs < 1:
        raise ValueError(f"epochs: must be >= 1, got {epochs}")
    train_idx, test_idx = holdout_split(labels, per_class, seed)
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).view(-1, 1, DIGIT_SIZE, DIGIT_SIZE)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitCnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tr = torch.from_numpy(train_idx)
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=gen)]
        for start in range(0, len(order), 64):
            sel = order[start:start + 64]
            loss = F.cross_entropy(model(x[sel]), y[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    te = torch.from_numpy(test_idx)
    acc = accuracy(model, x[te], y[te])
    model.eval()
    logger.info("classifier: held-out accuracy %.4f on %d digits", acc, len(te))
    return model, acc


def save_classifier(model: DigitCnn, out_dir: str | Path) -> Path:
    """Write the CNN as fp32 safetensors (it is tiny: ~11 k parameters)."""
    from safetensors.torch import save_file

    path = Path(out_dir) / CLASSIFIER_NAME
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))
    return path


def load_classifier(path: str | Path) -> DigitCnn:
    """The CNN saved by `save_classifier` (a directory or the file itself), in eval mode."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / CLASSIFIER_NAME
    model = DigitCnn()
    model.load_state_dict(load_file(str(p)), strict=True)
    model.eval().requires_grad_(False)
    return model
