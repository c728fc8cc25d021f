"""`deco_hook(state, bucket)`: DeCo-SGD as a DDP communication hook (docs/design/deco_sgd.md#ddp-hook).

Register with `ddp.register_comm_hook(state, deco_hook)` and step through
`DecoOptimizer(opt, state)`, or do both with `attach_ddp(ddp, opt, config)`.

Per bucket the hook launches one exchange of the bucket's per-parameter payloads and
returns a future of the **mean** aggregate from τ steps ago for the same parameters
(looked up by parameter name, so the bucket layout may change). Fill steps return zeros
and leave `state.ready` False. When τ shrinks (drain) the due aggregates are summed: exact
for plain SGD, a one-off approximation with momentum (docs/design/deco_sgd.md#changing-ratio-and-staleness).
The first bucket of a step
opens it (and applies a scheduled decision); the last closes it.
"""
# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import DecoConfig
from .exchange import StepEntry, Unit
from .optim import DecoOptimizer
from .state import DecoState

__all__ = ["deco_hook", "attach_ddp"]


def deco_hook(state: DecoState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook; see the module docstring."""
    if not state.hook_mode:
        state.config.validate_for_hook()
        state.hook_mode = True
    if not state.step_open:
        state.begin_step()
    step = state.step
    names = []
    for p in bucket.parameters():
        name = state.name_of(p)
        if name is None:
            raise ValueError("deco_hook: the bucket holds a parameter the DecoState does not know; build the "
                             "state from the same model DDP wraps")
        names.append(name)
    grads = bucket.gradients()
    state.launch(names, grads, key=f"bucket{bucket.index()}")
    due = state.due_entries()
    tau = state.current_staleness
    out_like = bucket.buffer()
    if bucket.is_last():
        state.end_hook_step()
    if not due:
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(torch.zeros_like(out_like))
        return fut
    units = _units_for(due, names)
    futs = [u.future(step=step, tau=tau) for u in units]
    sizes = [g.numel() for g in grads]

    def combine(_: Any) -> torch.Tensor:
        for f in futs:
            f.value()  # re-raises DecoCommError from a failed exchange
        out = torch.zeros_like(out_like)
        parts = out.split(sizes)
        for u in units:
            if not u.ok:
                continue  # the optimizer skips this step (resolve_hook_step); keep it finite
            assert u.result is not None
            for n, part in zip(names, parts):
                if n in u.result:
                    part.add_(u.result[n].reshape(-1).to(out.dtype))
        return out

    return torch.futures.collect_all(futs).then(combine)


def _units_for(due: list[StepEntry], names: list[str]) -> list[Unit]:
    """Units of the due entries that hold any of `names` (by name: bucket layouts may differ)."""
    wanted = set(names)
    return [u for e in due for u in e.units if wanted & set(u.names)]


def attach_ddp(ddp: DistributedDataParallel, optimizer: torch.optim.Optimizer, config: DecoConfig) -> "DecoOptimizer":
    """Register `deco_hook` on `ddp` and return the optimizer to step with (collective)."""
    config.validate_for_hook()
    state = DecoState(config, ddp.module)
    ddp.register_comm_hook(state, deco_hook)
    return DecoOptimizer(optimizer, state)
