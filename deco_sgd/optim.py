"""`DecoOptimizer(optimizer, state)`: DeCo-SGD around any torch optimizer
(docs/design/deco_sgd.md#optimizer-wrapper, docs/design/deco_sgd.md#ddp-hook).

Wrapper mode (no DDP, no hook registered): `step()` reads every `p.grad`, launches the
step's exchanges in chunks of `bucket_mb`, and applies every due aggregate as its own
inner `step()` (oldest first; none during pipeline fill). The inner optimizer only ever
sees averaged gradients, so momentum and weight decay keep replicas bit-identical.

Hook mode (`deco_hook` registered on DDP): the hook already wrote the aggregate into
`p.grad`; `step()` settles the applied entries and skips the inner `step()` on fill or
skipped steps, so the optimizer never sees a fake zero gradient.

`close()` (or leaving a `with` block) flushes the FIFO and applies what was in flight
(docs/design/deco_sgd.md#shutdown).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from .exchange import StepEntry
from .state import DecoState

__all__ = ["DecoOptimizer"]

logger = logging.getLogger(__name__)

_MB = 1 << 20
#: Marks `DecoOptimizer.state_dict()`'s output (the inner optimizer's state plus DeCo's).
CHECKPOINT_FORMAT = "deco_optimizer/1"


class DecoOptimizer:
    """Delegates to `optimizer`; see the module docstring for when it steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, state: DecoState) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(state, DecoState):
            raise ValueError(f"state: expected a DecoState, got {type(state).__name__}")
        self.optimizer = optimizer
        self.state = state
        self.closed = False
        #: Entries applied by the last `step()` (wrapper mode), oldest first.
        self.last_applied: list[StepEntry] = []
        self._chunks = self._plan_chunks()
        if state.config.mode == "adaptive" and state.driver is None:
            from .adaptive import AdaptiveDriver  # imported late: adaptive imports the controller stack

            state.driver = AdaptiveDriver(state)

    def _plan_chunks(self) -> list[list[str]]:
        # Fixed at construction (parameter order), so every rank launches the same units.
        limit = self.state.config.bucket_mb * _MB
        chunks: list[list[str]] = []
        size, dtype = 0.0, None
        for name in self.state.names:
            p = self.state.params[name]
            nbytes = p.numel() * p.element_size()
            if not chunks or size + nbytes > limit or p.dtype != dtype:
                chunks.append([])
                size, dtype = 0.0, p.dtype
            chunks[-1].append(name)
            size += nbytes
        return chunks

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One DeCo-SGD step; returns the closure's loss (if any)."""
        if self.closed:
            raise RuntimeError("DecoOptimizer: step() after close()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.report_loss(loss)
        st = self.state
        if st.hook_mode:
            popped = st.unsettled
            t0 = time.monotonic()
            ready = st.resolve_hook_step()
            blocked = time.monotonic() - t0
            if ready:
                self._inner_step(st.current_staleness)
            if st.driver is not None:
                st.driver.on_step_end(popped if ready else [], blocked)
            return loss
        st.begin_step()
        tau = st.current_staleness
        for i, chunk in enumerate(self._chunks):
            grads = [self._grad(n) for n in chunk]
            st.launch(chunk, grads, key=f"chunk{i}")
        due = st.end_step()
        t0 = time.monotonic()
        applied = st.resolve(due)
        blocked = time.monotonic() - t0
        for entry in applied:
            self._apply(entry, tau)
        st.ready = bool(applied)
        self.last_applied = applied
        st.fifo.check()
        if st.driver is not None:
            st.driver.on_step_end(applied, blocked)
        return loss

    def report_loss(self, loss: Any) -> None:
        """Tell the adaptive controller this rank's training loss of the step (a float or a
        scalar tensor). Optional, but without it the progress monitor has nothing to judge
        and cannot back off a bad switch. `step(closure)` reports the closure's loss itself."""
        rec = getattr(self.state.driver, "record_loss", None)
        if rec is not None and loss is not None:
            rec(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))

    def _grad(self, name: str) -> torch.Tensor:
        p = self.state.params[name]
        # An unused parameter contributes zeros so that every rank launches the same units.
        return torch.zeros_like(p) if p.grad is None else p.grad.detach()

    def _apply(self, entry: StepEntry, tau: int) -> None:
        self._write_grads(lambda name: DecoState.aggregate(entry, name))
        self._inner_step(tau)

    def _write_grads(self, agg_of: Callable[[str], torch.Tensor]) -> None:
        for name, p in self.state.params.items():
            agg = agg_of(name)
            if p.grad is None:
                p.grad = agg.to(p.dtype).clone()
            else:
                p.grad.copy_(agg)

    def _inner_step(self, tau: int) -> None:
        """The wrapped optimizer's step; with `lr_tau_scaling`, at γ/(τ+1)
        (docs/design/deco_sgd.md#changing-ratio-and-staleness)."""
        if not self.state.config.lr_tau_scaling or tau == 0:
            self.optimizer.step()
            return
        saved = [g["lr"] for g in self.optimizer.param_groups]
        try:
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] / (tau + 1)
            self.optimizer.step()
        finally:
            for g, lr in zip(self.optimizer.param_groups, saved):
                g["lr"] = lr

    def drain(self) -> int:
        """Wait for and apply every in-flight exchange now (collective); returns how many were applied."""
        tau = self.state.staleness
        entries = self.state.flush()
        for entry in entries:
            self._apply(entry, tau)
        self.state.fifo.check()
        return len(entries)

    def flush_residual(self) -> None:
        """All-reduce the mean of every rank's residual and apply it once (collective;
        docs/design/deco_sgd.md#shutdown)."""
        st = self.state
        names = st.names
        res = [st.ef.residual(n) for n in names]
        flat = torch.cat([(torch.zeros_like(st.params[n]) if r is None else r.to(st.params[n].dtype)).reshape(-1)
                          for n, r in zip(names, res)])
        # One synchronous collective on the data group: this runs once, at shutdown.
        flat.div_(st.world_size)
        torch.distributed.all_reduce(flat, group=st.group)
        parts = dict(zip(names, flat.split([st.params[n].numel() for n in names])))
        self._write_grads(lambda n: parts[n].view_as(st.params[n]))
        self._inner_step(0)
        st.ef.reset()

    def close(self) -> None:
        """Flush (docs/design/deco_sgd.md#shutdown): apply (or discard, per `config.flush`) what is in flight,
        then release the state's process groups (collective). Idempotent."""
        if self.closed:
            return
        self.drain()
        if self.state.config.flush_residual:
            self.flush_residual()
        if self.state.driver is not None:
            self.state.driver.finish()
        self.state.close(barrier=True)
        self.closed = True

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state and this rank's DeCo state (residuals, in-flight FIFO, RNG...).

        Saved with the usual `torch.save({"model": ..., "opt": opt.state_dict()})` this is a
        complete checkpoint; the DeCo part is per rank, so each rank saves its own file.
        """
        return {"format": CHECKPOINT_FORMAT, "optimizer": self.optimizer.state_dict(),
                "deco": self.state.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (collective, like `DecoState.load_state_dict`).

        A plain torch optimizer state dict is refused: loading it would resume without the
        residuals and in-flight aggregates and silently diverge from the saved run.
        """
        if not isinstance(sd, dict) or sd.get("format") != CHECKPOINT_FORMAT:
            plain = isinstance(sd, dict) and "param_groups" in sd
            raise ValueError(
                "state_dict: " + ("a plain torch optimizer state dict has no DeCo state (residuals, in-flight "
                                  "aggregates); save and load DecoOptimizer.state_dict()" if plain else
                                  f"expected DecoOptimizer.state_dict()'s output (format {CHECKPOINT_FORMAT!r})"))
        self.state.load_state_dict(sd["deco"])  # validated first; fails before the optimizer changes
        self.optimizer.load_state_dict(sd["optimizer"])

    def __enter__(self) -> "DecoOptimizer":
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif len(self.state.fifo):
            # After an error a flush could block on a dead peer: report what is lost instead.
            logger.warning("DecoOptimizer left on error with steps %s in flight", self.state.fifo.seqs)
