"""Class-conditional DDIM sampling for the tiny DiT, written as a plain loop over the transformer.

No diffusers pipeline is involved, so a transformer wrapped by `compactfusion.parallelize()` is
used unchanged: every rank of a parallel run calls `sample` with identical arguments and gets the
same images (the parallel transformer returns the full, gathered output on every rank).

Algorithm (deterministic DDIM, η = 0, the training schedule of `ddpm_scheduler`; the network
predicts ε or v = √ᾱ ε − √(1−ᾱ) x_0, as `transformer.config.prediction_type` says, default ε):
1. draw the initial noise x_T ~ N(0, I) of shape (B, 1, 32, 32) from a CPU `torch.Generator`
   seeded with `seed` (so the result does not depend on the device's RNG), in float32;
2. timesteps: `steps` values evenly spaced over [T−1, 0] ("trailing": the first is T−1 = 999, so
   the first step sees almost pure noise, as the model was trained);
3. at each timestep t run ONE transformer call on the batch [x_t, x_t] with labels
   [labels, null] (batched classifier-free guidance, 2B rows), in the transformer's dtype;
   out = out_u + guidance · (out_c − out_u) in float32;
4. ε-model: ε = out, x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t clipped to [−1, 1] (pixel space);
   v-model: x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v clipped, ε = (x_t − √ᾱ_t x̂_0) / √(1−ᾱ_t);
   x_prev = √ᾱ_prev x̂_0 + √(1−ᾱ_prev) ε, with ᾱ_prev = 1 after the last step (so x_0 = x̂_0);
5. return x_0 (float32, in [−1, 1]).
"""
from __future__ import annotations


import numpy as np
import torch

from .tiny_dit import NULL_LABEL, NUM_CLASSES

__all__ = ["sample", "ddpm_scheduler", "ddim_timesteps", "save_grid", "NUM_TRAIN_TIMESTEPS"]


NUM_TRAIN_TIMESTEPS = 1000


def ddpm_scheduler():  # -> diffusers.DDPMScheduler
    """The training noise schedule: 1000 steps, linear betas 1e-4 … 0.02, ε-prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, prediction_type="epsilon", clip_sample=True)


def ddim_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """`steps` decreasing timesteps, the first T−1 ("trailing" spacing), all distinct."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps: must be an int in [1, {num_train_timesteps}], got {steps!r}")
    ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1
    return [int(t) for t in ts[:steps]]


@torch.no_grad()
def sample(transformer: torch.nn.Module, labels: torch.Tensor, *, steps: int = 28, guidance: float = 2.0,
           seed: int = 0) -> torch.Tensor:
    """Generate one image per label; returns float32 (B, 1, 32, 32) in [−1, 1] on the model's device."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() == 0 or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels: must be a non-empty 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"labels: must lie in [0, {NUM_CLASSES - 1}], got [{int(labels.min())}, {int(labels.max())}]")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0:
        raise ValueError(f"guidance: must be a number >= 0, got {guidance!r}")
    timesteps = ddim_timesteps(steps)
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    cfg = transformer.config
    pred = getattr(cfg, "prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(f"transformer.config.prediction_type: must be epsilon or v_prediction, got {pred!r}")
    shape = (labels.numel(), cfg.in_channels, cfg.sample_size, cfg.sample_size)

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
    alphas = ddpm_scheduler().alphas_cumprod.to(torch.float64)
    cond = torch.cat([labels.to(device=device, dtype=torch.long),
                      torch.full((labels.numel(),), NULL_LABEL, dtype=torch.long, device=device)])
    for i, t in enumerate(timesteps):
        a_t = float(alphas[t])
        a_prev = float(alphas[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        tt = torch.full((cond.numel(),), t, dtype=torch.long, device=device)
        out = transformer(torch.cat([x, x]).to(dtype), timestep=tt, class_labels=cond, return_dict=False)[0]
        out_c, out_u = out.float().chunk(2)
        guided = out_u + float(guidance) * (out_c - out_u)
        if pred == "v_prediction":  # v = √ᾱ ε − √(1−ᾱ) x_0
            x0 = (a_t ** 0.5 * x - (1.0 - a_t) ** 0.5 * guided).clamp(-1.0, 1.0)
            eps = (x - a_t ** 0.5 * x0) / (1.0 - a_t) ** 0.5
        else:
            eps = guided
            x0 = ((x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5).clamp(-1.0, 1.0)
        x = a_prev ** 0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps
    return x


def save_grid(images: torch.Tensor, path: str, *, nrow: int = 10) -> None:
    """Write (B, 1, H, W) images in [−1, 1] as a PNG grid with `nrow` images per row (matplotlib, lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)[:, 0]
    rows = (imgs.shape[0] + nrow - 1) // nrow
    h, w = imgs.shape[-2:]
    canvas = torch.zeros(rows * h, nrow * w)
    for i, im in enumerate(imgs):
        r, c = divmod(i, nrow)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    plt.imsave(path, canvas.numpy(), cmap="gray", vmin=0.0, vmax=1.0)


def main(argv: list[str] | None = None) -> int:
    """`python -m compactfusion.models.sample --out grid.png`: a 10×10 grid (row k = digit k) from a checkpoint."""
    import argparse

    from .tiny_dit import load_tiny_dit

    p = argparse.ArgumentParser(prog="python -m compactfusion.models.sample", description=main.__doc__)
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the committed one)")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model = load_tiny_dit(path=args.checkpoint)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    save_grid(sample(model, labels, steps=args.steps, guidance=args.guidance, seed=args.seed), args.out,
              nrow=args.per_class)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
