"""The `bytelm` benchmark task: a byte-level transformer on the stdlib's sources (docs/design/deco_sgd.md#tasks).

Corpus: every `.py` file under `sysconfig.get_paths()["stdlib"]`, paths sorted, skipping
any path with a `test`, `idlelib` or `site-packages` directory component; files are read
in order until `max_bytes` are collected (the last file is cut). Each file goes to the
validation split when a hash of its relative path falls in the bottom `val_fraction`, so
the split does not move when `max_bytes` changes. The corpus depends on the Python
version, so `env()` records the version and the SHA-256 of the bytes used.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ccomm.validate import check_int, check_number

from ._common import build_seeded

__all__ = ["ByteLMConfig", "ByteLMTask", "Corpus", "build_corpus", "corpus_files", "EXCLUDED_DIRS", "VOCAB"]

logger = logging.getLogger(__name__)

VOCAB = 256
EXCLUDED_DIRS = frozenset({"test", "idlelib", "site-packages"})
#: Resolution of the path-hash split (fractions are rounded to 1e-6).
_HASH_BUCKETS = 1_000_000


@dataclass(frozen=True)
class ByteLMConfig:
    """Settings of the bytelm task; validated on construction."""

    max_bytes: int = 8 * 2**20
    val_fraction: float = 0.05
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    context: int = 128
    batch_size: int = 32
    #: Evaluation uses at most this many non-overlapping validation windows (evenly spaced).
    eval_windows: int = 256
    #: Root to scan instead of the stdlib (tests); None = `sysconfig.get_paths()["stdlib"]`.
    root: str | None = None

    def __post_init__(self) -> None:
        check_int("bytelm.max_bytes", self.max_bytes, 1024)
        check_number("bytelm.val_fraction", self.val_fraction, 0.0, 0.5, lo_open=True)
        check_int("bytelm.n_layers", self.n_layers, 1, 64)
        check_int("bytelm.d_model", self.d_model, 8, 8192)
        check_int("bytelm.n_heads", self.n_heads, 1, 256)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: must divide d_model={self.d_model}, got {self.n_heads}")
        check_int("bytelm.context", self.context, 2, 65536)
        check_int("bytelm.batch_size", self.batch_size, 1, 65536)
        check_int("bytelm.eval_windows", self.eval_windows, 1)
        if self.root is not None and not isinstance(self.root, str):
            raise ValueError(f"root: must be a directory path string or None, got {self.root!r}")


def corpus_files(root: Path) -> list[Path]:
    """Relative paths of the corpus files under `root`, sorted, exclusions applied."""
    rels = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return sorted((r for r in rels if not EXCLUDED_DIRS.intersection(r.parts[:-1])), key=lambda r: r.as_posix())


def is_validation(rel: Path, val_fraction: float) -> bool:
    """Deterministic 95/5-style split on a SHA-256 of the POSIX relative path."""
    h = int.from_bytes(hashlib.sha256(rel.as_posix().encode()).digest()[:8], "big")
    return h % _HASH_BUCKETS < round(val_fraction * _HASH_BUCKETS)


@dataclass(frozen=True)
class Corpus:
    """The bytes used, split by file; `sha256` covers all used bytes in path order."""

    train: np.ndarray
    val: np.ndarray
    sha256: str
    n_files: int
    n_bytes: int


@functools.lru_cache(maxsize=4)
def build_corpus(root: str, max_bytes: int, val_fraction: float) -> Corpus:
    """Read the corpus under `root` (cached: the same arguments give the same arrays)."""
    base = Path(root)
    files = corpus_files(base)
    digest = hashlib.sha256()
    train: list[bytes] = []
    val: list[bytes] = []
    used = n_files = 0
    for rel in files:
        if used >= max_bytes:
            break
        data = (base / rel).read_bytes()[: max_bytes - used]
        digest.update(data)
        (val if is_validation(rel, val_fraction) else train).append(data)
        used += len(data)
        n_files += 1
    logger.info("bytelm corpus: %d files, %d bytes from %s", n_files, used, root)
    as_arr = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8).copy()  # noqa: E731
    return Corpus(as_arr(train), as_arr(val), digest.hexdigest(), n_files, used)


class _ByteTransformer(nn.Module):
    """Pre-norm causal transformer with learned positions and an output head tied to the embedding."""

    def __init__(self, cfg: ByteLMConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(cfg.context, d) * 0.02)
        # Separate constructions (not nn.TransformerEncoder, which deep-copies one layer)
        # so every layer gets its own random initialisation.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, cfg.n_heads, 4 * d, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.pos[:t]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.norm(h) @ self.embed.weight.T


class ByteLMTask:
    """Next-byte prediction; metric = validation bits per byte (lower is better)."""

    name = "bytelm"
    higher_is_better = False

    def __init__(self, config: ByteLMConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config if config is not None else ByteLMConfig()
        self.device = torch.device(device)
        self.root = self.config.root if self.config.root is not None else sysconfig.get_paths()["stdlib"]
        self.corpus = build_corpus(self.root, self.config.max_bytes, self.config.val_fraction)
        need = self.config.context + 1
        for split, arr in (("train", self.corpus.train), ("val", self.corpus.val)):
            if len(arr) < need:
                raise ValueError(
                    f"max_bytes: the {split} split has {len(arr)} bytes, fewer than context+1={need}; "
                    "raise max_bytes or val_fraction"
                )
        self._train = torch.from_numpy(self.corpus.train.astype(np.int64)).to(self.device)
        self._val = torch.from_numpy(self.corpus.val.astype(np.int64))

    def shard_range(self, rank: int, world: int) -> tuple[int, int]:
        """[start, stop) of the contiguous slice of the training bytes owned by `rank`."""
        check_int("bytelm.world", world, 1)
        check_int("bytelm.rank", rank, 0, world - 1)
        n = len(self._train)
        start, stop = rank * n // world, (rank + 1) * n // world
        if stop - start < self.config.context + 1:
            raise ValueError(f"world: rank {rank} of {world} gets {stop - start} bytes, fewer than context+1")
        return start, stop

    def batches(self, rank: int, world: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches of random windows inside this rank's slice; targets are inputs shifted by one."""
        start, stop = self.shard_range(rank, world)
        ctx, bs = self.config.context, self.config.batch_size
        rng = np.random.default_rng([seed, rank, 0x42])
        offsets = torch.arange(ctx + 1, device=self.device)
        while True:
            starts = torch.from_numpy(rng.integers(start, stop - ctx, size=bs)).to(self.device)
            win = self._train[starts[:, None] + offsets]
            yield win[:, :-1], win[:, 1:]

    def model(self, seed: int = 0) -> nn.Module:
        return build_seeded(lambda: _ByteTransformer(self.config), seed).to(self.device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """Mean bits per byte over evenly spaced, non-overlapping validation windows."""
        ctx = self.config.context
        n_win = (len(self._val) - 1) // ctx
        picks = np.unique(np.linspace(0, n_win - 1, num=min(n_win, self.config.eval_windows)).round().astype(np.int64))
        offsets = torch.arange(ctx + 1)
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            dev = next(model.parameters()).device
            for chunk in np.array_split(picks, max(1, math.ceil(len(picks) / 64))):
                win = self._val[torch.from_numpy(chunk * ctx)[:, None] + offsets].to(dev)
                logits = model(win[:, :-1])
                total += F.cross_entropy(logits.reshape(-1, VOCAB), win[:, 1:].reshape(-1), reduction="sum").item()
        finally:
            model.train(was_training)
        return total / (len(picks) * ctx) / math.log(2)

    def env(self) -> dict[str, Any]:
        return {
            "python": platform.python_version(),
            "corpus_sha256": self.corpus.sha256,
            "corpus_bytes": self.corpus.n_bytes,
            "corpus_files": self.corpus.n_files,
            "train_bytes": len(self._train),
            "val_bytes": len(self._val),
        }
