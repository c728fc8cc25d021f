"""Tiny deterministic model, data and reference loops shared by the deco_sgd runtime tests."""
from __future__ import annotations

import math
from collections import deque
from typing import Callable

import torch
import torch.distributed as dist

IN, HID, OUT = 8, 16, 4
BATCH = 16
LR = 0.05
MOMENTUM = 0.9


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, OUT))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def loss_fn(model: torch.nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = batch(rank, step)
    return torch.nn.functional.mse_loss(model(x), y)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    m = model.module if hasattr(model, "module") else model
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def replicas_equal(model: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters."""
    flat = torch.cat([p.reshape(-1) for p in params(model).values()])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(o, out[0]) for o in out)


def topk_dense(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Independent per-tensor top-k by magnitude (k = ceil(ratio * numel))."""
    flat = x.reshape(-1)
    k = max(1, math.ceil(ratio * flat.numel()))
    out = torch.zeros_like(flat)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out[idx] = flat[idx]
    return out.view_as(x)


def reference_run(
    steps: int, tau_of_step: Callable[[int], int], ratio_of_step: Callable[[int], float], rank: int, world: int,
    momentum: float = MOMENTUM, lr: float = LR,
) -> dict[str, torch.Tensor]:
    """DD-EF-SGD by the book (docs/design/deco_sgd.md#update-rule), simulating every rank's residual from all-gathered
    gradients."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    res: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    fifo: deque[dict[str, torch.Tensor]] = deque()
    for s in range(steps):
        grads_by_rank = []
        for r in range(world):  # every rank's gradient at the shared model, computed locally
            model.zero_grad()
            loss_fn(model, r, s).backward()
            grads_by_rank.append({n: p.grad.clone() for n, p in model.named_parameters()})
        mean = {}
        ratio = ratio_of_step(s)
        for n, _ in model.named_parameters():
            msgs = []
            for r in range(world):
                p = grads_by_rank[r][n] + res[r].get(n, 0)
                m = p if ratio == 1.0 else topk_dense(p, ratio)
                res[r][n] = p - m
                msgs.append(m)
            if ratio == 1.0:  # DDP's allreduce_hook divides before summing
                mean[n] = sum((m / world for m in msgs[1:]), msgs[0] / world)
            else:  # decode_sum adds in rank order, then the mean divides once
                mean[n] = sum(msgs[1:], msgs[0].clone()) / world
        fifo.append(mean)
        while len(fifo) > tau_of_step(s):
            agg = fifo.popleft()
            for n, p in model.named_parameters():
                p.grad = agg[n].clone()
            opt.step()
    return params(model)
