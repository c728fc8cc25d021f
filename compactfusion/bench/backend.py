"""What the benchmark runs: a model, a way to parallelize it, and a sampler.

:class:`TinyDiTBackend` is the real one (the committed MNIST DiT, docs/design/compactfusion.md#tiny-model, parallelized by
:func:`compactfusion.parallelize`, sampled by ``compactfusion.models.sample.sample``);
:class:`RandomTinyDiTBackend` is the same with seeded random weights (no checkpoint needed).
:class:`ToyBackend` is a stand-in with the same interface whose "model" is a few lines of
arithmetic but whose exchange is real: every step each rank sends a residual-compressed
tensor through :mod:`ccomm.comm` (tag ``kv_gather``), so bytes, emulated link delays, image
differences and the error rows are all produced by the transport. The bench's own tests run
on it in seconds; it says nothing about CompactFusion's quality.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from .methods import Method

__all__ = ["Backend", "TinyDiTBackend", "RandomTinyDiTBackend", "WideDiTBackend", "ToyBackend", "make_backend", "BACKENDS"]


class Backend(Protocol):
    """The three operations a benchmark run needs on every rank."""

    def load(self) -> torch.nn.Module: ...

    def parallelize(self, model: torch.nn.Module, method: Method, *, wire_dtype: str, raw_steps: int,
                    variant: str = "ef", record_errors: bool = False, seed: int = 0) -> Any: ...

    def sample(self, model: torch.nn.Module, labels: torch.Tensor, *, steps: int, guidance: float, seed: int) -> torch.Tensor: ...


class TinyDiTBackend:
    """The committed tiny MNIST DiT through :func:`compactfusion.parallelize`."""

    def load(self) -> torch.nn.Module:
        from compactfusion.models.tiny_dit import load_tiny_dit

        return load_tiny_dit(dtype=torch.float32).eval()

    def parallelize(self, model: torch.nn.Module, method: Method, *, wire_dtype: str, raw_steps: int,
                    variant: str = "ef", record_errors: bool = False, seed: int = 0) -> Any:
        from compactfusion import CompactConfig, parallelize

        assert method.mode is not None
        cfg = CompactConfig(mode=method.mode, codec=method.codec, raw_steps=raw_steps, variant=variant,
                            wire_dtype=wire_dtype, record_errors=record_errors, seed=seed)
        return parallelize(model, cfg)

    def sample(self, model: torch.nn.Module, labels: torch.Tensor, *, steps: int, guidance: float, seed: int) -> torch.Tensor:
        from compactfusion.models.sample import sample

        with torch.inference_mode():
            return sample(model, labels, steps=steps, guidance=guidance, seed=seed)


class RandomTinyDiTBackend(TinyDiTBackend):
    """The tiny DiT architecture with seeded random weights: same code path and bytes, meaningless images."""

    def load(self) -> torch.nn.Module:
        from compactfusion.models.tiny_dit import build_tiny_dit

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_tiny_dit()
        return model.float().eval()


class WideDiTBackend(TinyDiTBackend):
    """DiT-B width (12 heads × 64 = 768 channels, 2 blocks) on the tiny model's 32×32 input, random weights.

    For latency and bytes at a realistic channel width only: per exchanged K/V byte a layer
    computes ~6x more than the 128-channel tiny model, as real DiTs do (FLUX: 3072 channels),
    while per-call overheads stay. Its images mean nothing, so quality numbers are the fidelity
    of the exchange on an untrained network, not image quality.
    """

    def load(self) -> torch.nn.Module:
        from compactfusion.models.tiny_dit import build_tiny_dit, tiny_dit_config

        cfg = {**tiny_dit_config(), "num_attention_heads": 12, "attention_head_dim": 64, "num_layers": 2}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_tiny_dit(cfg, prediction_type="v_prediction")
        return model.float().eval()


# ---------------------------------------------------------------------------------- toy
class _ToyHandle:
    """Residual-compressed all-gather of a (rows, 128) tensor per step, mirroring the real handle's API."""

    def __init__(self, method: Method, wire_dtype: str, raw_steps: int, variant: str, record_errors: bool) -> None:
        import torch.distributed as dist

        from ccomm import ResidualCodec

        self.method = method
        self.group = None
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[wire_dtype]
        self._make = lambda: ResidualCodec(method.codec, raw_steps, variant=variant) if method.compressed else None
        self.rc = self._make()
        self.record_errors = record_errors
        self.errors: list[dict[str, Any]] = []
        self.step = 0

    def reset(self) -> None:
        self.rc = self._make()
        self.errors = []
        self.step = 0

    def remove(self) -> None:
        self.rc = None

    def state_nbytes(self) -> int:
        if self.rc is None:
            return 0
        return sum(int(b.numel() * b.element_size()) for k in self.rc.keys() if (b := self.rc.base(k)) is not None)

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        from ccomm.comm import allgather_payloads
        from ccomm.payload import Payload, PayloadMeta

        own = x.to(self.dtype)
        if self.rc is None:
            p = Payload(own.reshape(-1).clone(), PayloadMeta(own.shape, own.dtype, {}))
            got = allgather_payloads(p, same_size=True, key="kv_gather")
            parts = [q.buffer.view(own.shape) for q in got]
        else:
            p = self.rc.encode(("toy", self.rank), own)
            got = allgather_payloads(p, key="kv_gather")
            parts = [self.rc.decode(("toy", r), q) if r != self.rank else self.rc.base(("toy", r)) for r, q in enumerate(got)]
            parts = [own if t is None else t for t in parts]
            if self.record_errors:
                err = float((own.float() - parts[self.rank].float()).norm())
                self.errors.append({"step": self.step, "layer": 0, "key": "toy", "comp_err": err, "deviation": err})
        self.step += 1
        return torch.stack([t.float() for t in parts]).mean(0)


class _ToyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1234)
        self.register_buffer("mix", torch.randn(128, 128, generator=gen) / 128**0.5)
        self.handle: _ToyHandle | None = None


class ToyBackend:
    """A stand-in model with a real compressed exchange (see the module docstring)."""

    def load(self) -> torch.nn.Module:
        return _ToyModel()

    def parallelize(self, model: torch.nn.Module, method: Method, *, wire_dtype: str, raw_steps: int,
                    variant: str = "ef", record_errors: bool = False, seed: int = 0) -> Any:
        assert isinstance(model, _ToyModel) and model.handle is None
        model.handle = _ToyHandle(method, wire_dtype, raw_steps, variant, record_errors)
        return model.handle

    def sample(self, model: torch.nn.Module, labels: torch.Tensor, *, steps: int, guidance: float, seed: int) -> torch.Tensor:
        assert isinstance(model, _ToyModel)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(labels.numel() * 8, 128, generator=gen)
        x += labels.repeat_interleave(8).float()[:, None] * 0.1
        for _ in range(steps):
            y = torch.tanh(x @ model.mix)
            if model.handle is not None:
                y = model.handle.exchange(y)  # every rank sees the same average of the reconstructions
            x = 0.8 * x + 0.2 * y
        return torch.tanh(x).reshape(labels.numel(), 1, 32, 32)


#: Backend names accepted by the config's ``backend`` field.
BACKENDS: dict[str, type] = {"tiny_dit": TinyDiTBackend, "tiny_dit_random": RandomTinyDiTBackend,
                             "wide_dit_random": WideDiTBackend, "toy": ToyBackend}


def make_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend: {name!r} not allowed; allowed values are {sorted(BACKENDS)}")
    return BACKENDS[name]()
