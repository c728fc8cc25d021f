"""A plain DDP training script switched to DeCo-SGD with two added lines (marked "DeCo-SGD").

Run on CPU with gloo (tiny model, synthetic data, finishes in seconds):

    torchrun --nproc_per_node=4 examples/deco_sgd/ddp_train.py
    torchrun --nproc_per_node=4 examples/deco_sgd/ddp_train.py --ratio 0.05 --staleness 2
    torchrun --nproc_per_node=4 examples/deco_sgd/ddp_train.py --mode adaptive   # see below

Without the two marked lines this is an ordinary DDP script. The third marked line,
`opt.close()` before `destroy_process_group()`, is the clean shutdown (docs/design/deco_sgd.md#shutdown): it
applies the aggregates still in flight and completes the controller's last control
exchange. Skip it only with staleness 0 in static mode: tearing the process group down
under an in-flight exchange makes gloo abort the process.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from deco_sgd import DecoConfig
from deco_sgd.hook import attach_ddp  # DeCo-SGD (line 1 of 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ratio", type=float, default=0.1, help="fraction of each gradient sent (top-k)")
    ap.add_argument("--staleness", type=int, default=1, help="steps an aggregate may arrive late")
    ap.add_argument("--warmup", type=int, default=0,
                    help="dense synchronous steps first (the hook's first step is always dense: DDP rebuilds buckets)")
    ap.add_argument("--mode", choices=["static", "adaptive"], default="static",
                    help="adaptive: the controller re-chooses ratio and staleness from measurements")
    args = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial model on every rank
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    cfg = DecoConfig(mode=args.mode, codec="topk", ratio=args.ratio, staleness=args.staleness,
                     warmup_steps=args.warmup, timeout_s=60.0)
    opt = attach_ddp(model, opt, cfg)  # DeCo-SGD (line 2 of 2)

    # A fixed linear teacher; each rank sees its own slice of the data stream.
    w_true = torch.randn(32, 1, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(100 + rank)
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        y = x @ w_true + 0.01 * torch.randn(64, 1, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.report_loss(loss)  # optional: lets the adaptive controller's progress monitor back off a bad switch
        opt.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}")
    opt.close()  # DeCo-SGD shutdown: flush what is in flight (see the module docstring)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    if rank == 0:
        same = all(torch.equal(c, copies[0]) for c in copies)
        decided = [(d["step"], d["ratio"], d["staleness"]) for d in opt.state.decisions]
        print(f"world={world} mode={args.mode} decisions (step, ratio, staleness): {decided}")
        point = (opt.state.ratio, opt.state.staleness)
        print(f"world={world} final (ratio, staleness)={point}: replicas identical: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
