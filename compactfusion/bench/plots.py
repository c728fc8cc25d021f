"""PNG figures of a run: the image grid, latency vs bandwidth and the error ablation.

matplotlib is imported lazily with the Agg backend (no display needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["image_grid", "latency_plot", "ablation_plot", "ablation_csv"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: dict[str, Any], path: Path, title: str = "") -> Path:
    """One row per entry of ``images`` (name -> array (B, 1, H, W) in [-1, 1]), one column per image."""
    plt = _plt()
    names = [n for n, a in images.items() if a is not None]
    cols = max(np.asarray(images[n]).shape[0] for n in names)
    fig, axes = plt.subplots(len(names), cols, figsize=(1.1 * cols + 1.6, 1.1 * len(names) + 0.4), squeeze=False)
    for i, name in enumerate(names):
        arr = np.asarray(images[name])
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < arr.shape[0]:
                ax.imshow((arr[j, 0] + 1) / 2, cmap="gray", vmin=0, vmax=1)
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_plot(curves: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Median latency per method against the per-rank bandwidth; the unshaped link is drawn at the right edge."""
    plt = _plt()
    shaped = [c for c in curves if c["mbps_per_rank"] is not None]
    free = [c for c in curves if c["mbps_per_rank"] is None]
    methods = sorted({m for c in curves for m in c["latency_s"]}, key=lambda m: (m != "single", m))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xmax = max((c["mbps_per_rank"] for c in shaped), default=1.0) * 2.5
    for m in methods:
        pts = [(c["mbps_per_rank"], c["latency_s"][m]) for c in shaped if c["latency_s"].get(m) is not None]
        if free and free[0]["latency_s"].get(m) is not None:
            pts.append((xmax, free[0]["latency_s"][m]))
        if not pts:
            continue
        xs, ys = zip(*sorted(pts))
        style = "--" if m == "single" else "-"
        ax.plot(xs, ys, style, marker="o", ms=3, label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-rank bandwidth (Mbit/s); rightmost point: unshaped")
    ax.set_ylabel("seconds per request (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablation_plot(ablation: dict[str, Any], path: Path) -> Path:
    """Compression error and receiver deviation per step, one line per variant."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for variant, entry in ablation["variants"].items():
        for ax, field in zip(axes, ("comp_err", "deviation")):
            # Raw warm-up steps have zero error: left out, since the axis is logarithmic.
            pts = [(r["step"], r[field]) for r in entry["steps"] if r[field] > 0]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=".", label=variant)
    for ax, name in zip(axes, ("compression error ‖r − D(C(r))‖", "receiver deviation ‖x − x̂‖")):
        ax.set_xlabel("denoising step")
        ax.set_ylabel(name + " (mean over layers)", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if ax.lines:
            ax.set_yscale("log")
    fig.suptitle(f"error ablation, codec {ablation['codec']}, P={ablation['ranks']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablation_csv(ablation: dict[str, Any], path: Path) -> Path:
    lines = ["variant,step,comp_err,deviation,rows"]
    for variant, entry in ablation["variants"].items():
        for r in entry["steps"]:
            lines.append(f"{variant},{r['step']},{r['comp_err']:.6g},{r['deviation']:.6g},{r['rows']}")
    path.write_text("\n".join(lines) + "\n")
    return path
