"""`DecoState`: everything one rank of DeCo-SGD remembers between steps
(docs/design/deco_sgd.md#update-rule, docs/design/deco_sgd.md#staleness-model,
docs/design/deco_sgd.md#changing-ratio-and-staleness).

It owns the per-parameter error-feedback residuals, the (δ, τ) in force, one codec per δ,
the in-flight FIFO and the step counter, and runs the parts of the update rule that both front ends
share: `begin_step` / `launch` / `end_step` around the exchanges of one step, and
`resolve` when the due entries are consumed. `deco_hook` (DDP) and `DecoOptimizer`
(no DDP) only decide *when* to call them and where the aggregate goes.

Controller seam: `schedule(ratio, staleness, s_apply)` queues a decision; it takes effect
at the first exchange of step `s_apply` on every rank that scheduled it (replicated mode
schedules the same decision everywhere). Changing δ keeps the residuals; changing τ
deepens or drains the FIFO (see `staleness.py`).

Construction is collective (it creates the control group and checks that all
ranks hold the same parameters); so are `flush()` and `load_state_dict()`.
"""
from __future__ import annotations

import datetime
import logging
import random
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ccomm import Codec, ErrorFeedback
from ccomm.comm.auto import clear_measured
from ccomm.exitguard import install_exit_guard

from .checkpoint import STATE_VERSION, check_state_dict
from .config import DecoConfig
from .errors import DecoDesyncError, NonFiniteGradientError
from .exchange import StepEntry, Unit, completed_unit, launch_unit
from .staleness import InFlightFifo

__all__ = ["DecoState", "STATE_VERSION"]

logger = logging.getLogger(__name__)

#: Wire dtype per `value_dtype`; None keeps the gradients' own dtype.
_WIRE_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class DecoState:
    """Per-rank DeCo-SGD state; pass it to `deco_hook` or `DecoOptimizer`."""

    __slots__ = (
        "config", "rank", "world_size", "group", "control_group", "_own_groups",
        "names", "params", "_name_of", "ef", "ratio", "staleness", "_codecs", "fifo", "step",
        "_ready", "pending", "decisions", "consecutive_skips", "hook_mode", "_cur", "_cur_due",
        "_cur_eff", "_popped", "_popped_resolved", "extra", "driver",
        # value-format dimension (issue 14), kept apart from the (δ, τ) fields above
        "values", "_pending_values", "_cur_values", "_qcodecs",
    )

    def __init__(
        self,
        config: DecoConfig,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | torch.nn.Module,
        *,
        group: dist.ProcessGroup | None = None,
        control_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not isinstance(config, DecoConfig):
            raise ValueError(f"config: expected a DecoConfig, got {type(config).__name__}")
        if not dist.is_initialized():
            raise ValueError("DecoState: torch.distributed is not initialised; call init_process_group first")
        if isinstance(named_parameters, torch.nn.Module):
            named_parameters = named_parameters.named_parameters()
        pairs = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not pairs:
            raise ValueError("named_parameters: no parameter requires grad")
        self.config = config
        # At exit, wait for gloo's worker threads to drop the Works they still hold (the
        # last exchanges', and the application's own last collectives) before Python
        # finalizes: a worker that frees a tensor then aborts the process (ccomm.exitguard).
        install_exit_guard()
        timeout = datetime.timedelta(seconds=config.timeout_s)
        # Data goes over the caller's group (default: the default group, with its backend:
        # NCCL on GPUs, no host copies). Control gets its own gloo group: it exchanges Python
        # objects and host scalars, and must never queue behind data (docs/design/deco_sgd.md#staleness-model).
        self._own_groups: list[dist.ProcessGroup] = []
        if group is None:
            group = dist.group.WORLD
        if control_group is None:
            control_group = dist.new_group(backend="gloo", timeout=timeout)
            self._own_groups.append(control_group)
        self.group, self.control_group = group, control_group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.names = [n for n, _ in pairs]
        self.params = {n: p for n, p in pairs}
        self._name_of = {id(p): n for n, p in pairs}
        self.ef = ErrorFeedback()
        self.ratio, self.staleness = config.ratio, config.staleness
        self._codecs: dict[float, Codec | None] = {}
        #: Value format in force (fp32/fp16/bf16 wire dtype, q8/q4 quantized) and its codecs.
        self.values = config.initial_values
        self._pending_values: str | None = None
        self._cur_values = "fp32"
        self._qcodecs: dict[tuple[float, str], Codec] = {}
        self.fifo: InFlightFifo[StepEntry] = InFlightFifo()
        self.step = 0
        self._ready = False
        self.pending: tuple[float, int, int, str] | None = None
        self.decisions: list[dict[str, Any]] = []
        self.consecutive_skips = 0
        self.hook_mode = False
        self._cur: StepEntry | None = None
        self._cur_due = 0
        self._cur_eff: tuple[float, int] = (1.0, 0)
        self._popped: list[StepEntry] = []
        self._popped_resolved = True
        #: Controller/estimator state a later layer stores in checkpoints (picklable values).
        self.extra: dict[str, Any] = {}
        #: The adaptive loop (`deco_sgd.adaptive.AdaptiveDriver`), set by DecoOptimizer in
        #: adaptive mode; None means (δ, τ) change only through `schedule()`.
        self.driver: Any = None
        self._check_layout()

    # -- configuration in force -----------------------------------------------------------
    def effective(self) -> tuple[float, int]:
        """(δ, τ) used by the current step: warm-up steps are dense and synchronous.

        In hook mode step 0 is always dense and synchronous: DDP rebuilds its buckets after
        the first iteration, so that step's bucket layout is not the one of later steps
        (PyTorch's PowerSGD hook starts compressing at iteration 2 for the same reason).
        """
        if self.step < self.config.warmup_steps or (self.hook_mode and self.step == 0):
            return 1.0, 0
        return self.ratio, self.staleness

    def effective_values(self) -> str:
        """Value format of the current step (the wire dtype of `value_dtype` while dense)."""
        ratio = self.effective()[0]
        if ratio >= 1.0 and (ratio != self.ratio or self.values in ("q8", "q4")):
            return self.config.value_dtype  # warm-up / first hook step, or no dense quantizer
        return self.values

    def codec_for_values(self, ratio: float, values: str) -> Codec | None:
        """Codec at (δ, value format): quantized formats add a quantize stage after the sparsifier."""
        if values not in ("q8", "q4") or ratio >= 1.0:
            return self.codec_for(ratio)
        key = (ratio, values)
        if key not in self._qcodecs:
            self._qcodecs[key] = self.config.make_codec(ratio, values)
        return self._qcodecs[key]

    def codec_for(self, ratio: float) -> Codec | None:
        """Codec at fraction kept `ratio`; None means the dense path (single codec at δ = 1)."""
        if ratio not in self._codecs:
            codec = self.config.make_codec(ratio)
            dense = ratio == 1.0 and hasattr(codec, "ratio")
            if codec is not None and not dense and not codec.fixed_size:
                raise ValueError(f"codec: {codec.spec!r} has variable payload sizes; DeCo-SGD needs fixed sizes")
            self._codecs[ratio] = None if dense else codec
        return self._codecs[ratio]

    def schedule(self, ratio: float, staleness: int, s_apply: int, reason: str = "", values: str | None = None) -> None:
        """Queue a (δ, τ[, value format]) decision taking effect at the first exchange of step `s_apply`."""
        if values is not None and values not in ("fp32", "fp16", "bf16", "q8", "q4"):
            raise ValueError(f"values: must be one of fp32, fp16, bf16, q8, q4, got {values!r}")
        if not (0.0 < ratio <= 1.0):
            raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
        if isinstance(staleness, bool) or not isinstance(staleness, int) or not 0 <= staleness <= self.config.tau_max:
            raise ValueError(f"staleness: must be an integer in [0, {self.config.tau_max}], got {staleness!r}")
        if s_apply < self.step or (s_apply == self.step and self._cur is not None):
            raise ValueError(f"s_apply: must be a step that has not started (>= {self.step + (self._cur is not None)}), got {s_apply}")
        self.codec_for_values(ratio, values or self.values)  # fail now, not mid-step
        self.pending = (float(ratio), staleness, s_apply, reason)
        self._pending_values = values

    def _apply_pending(self) -> None:
        if self.pending is None or self.pending[2] > self.step:
            return
        ratio, tau, _, reason = self.pending
        self.pending = None
        logger.info("step %d: (ratio, staleness) %s -> %s (%s)", self.step, (self.ratio, self.staleness),
                    (ratio, tau), reason or "scheduled")
        values = self._pending_values or self.values
        self._pending_values = None
        self.decisions.append({"step": self.step, "time": time.time(), "ratio": ratio, "staleness": tau,
                               "previous": [self.ratio, self.staleness], "reason": reason, "values": values})
        self.ratio, self.staleness, self.values = ratio, tau, values

    # -- one step ---------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Open step `self.step`: apply a due decision, fix (δ, τ) for this step."""
        if self._cur is not None:
            raise RuntimeError(f"step {self.step}: begin_step called twice")
        if not self._popped_resolved:
            # Hook mode without a resolve between steps: settle now so nothing is lost.
            self.resolve_hook_step()
        self._apply_pending()
        self._cur_eff = self.effective()
        self._cur_values = self.effective_values()
        self._cur = StepEntry(self.step, self._cur_eff[0])
        self._cur_due = self.fifo.due_count(self._cur_eff[1], pending=1)
        self._ready = False

    def launch(self, names: Sequence[str], grads: Sequence[torch.Tensor], key: str) -> Unit:
        """Compensate, encode and launch one unit of the open step."""
        if self._cur is None:
            raise RuntimeError("launch: no step is open (call begin_step first)")
        vals = self._cur_values
        unit = launch_unit(names, grads, self.ef, self.codec_for_values(self._cur_eff[0], vals), group=self.group,
                           rank=self.rank, world=self.world_size, ratio=self._cur_eff[0], key=f"{self.step}:{key}",
                           value_dtype=_WIRE_DTYPES[self.config.wire_dtype_name(vals)],
                           algo=self.config.collective_algo)
        self._cur.units.append(unit)
        observe = getattr(self.driver, "observe_launch", None)
        if observe is not None:
            observe(names, grads)
        return unit

    def due_entries(self) -> list[StepEntry]:
        """Entries whose aggregate the open step applies, oldest first (may include the open one)."""
        if self._cur is None:
            raise RuntimeError("due_entries: no step is open")
        queued = list(self.fifo)
        return (queued + [self._cur])[: self._cur_due]

    def end_step(self) -> list[StepEntry]:
        """Close the open step: queue its entry, pop the due ones, advance the counter."""
        if self._cur is None:
            raise RuntimeError("end_step: no step is open")
        missing = set(self.names) - self._cur.names()
        if missing:
            raise RuntimeError(
                f"step {self.step}: no gradient exchanged for {sorted(missing)[:5]} (every parameter must take "
                "part every step; data-dependent graphs are not supported)"
            )
        self.fifo.push(self._cur)
        popped = self.fifo.pop_due(self._cur_eff[1])
        assert len(popped) == self._cur_due, (len(popped), self._cur_due)
        self._cur = None
        self.step += 1
        return popped

    @property
    def current_staleness(self) -> int:
        """τ of the open step, or of the last closed one (0 before the first step)."""
        return self._cur_eff[1]

    def resolve(self, entries: Sequence[StepEntry], *, all_or_nothing: bool = False) -> list[StepEntry]:
        """Wait for popped entries, check validity (docs/design/deco_sgd.md#non-finite-gradients), settle them;
        return those to apply.

        Skipped entries hand their own messages back to the residuals, so a skip delays
        gradient mass but never loses it. `all_or_nothing` (hook mode, whose entries were
        already summed into one gradient) skips every entry if any one is bad.
        """
        tau = self.current_staleness
        for e in entries:
            for u in e.units:
                u.wait(step=e.seq, tau=tau)
        bad = [e for e in entries if not all(u.ok for u in e.units)]
        if bad and self.config.nonfinite == "raise":
            e = bad[0]
            ranks = sorted({r for u in e.units if u.valid is not None for r, v in enumerate(u.valid) if not v})
            detail = "" if ranks else "the decoded aggregate is not finite"
            raise NonFiniteGradientError(e.seq, ranks, detail)
        skip = set(map(id, entries if (bad and all_or_nothing) else bad))
        out = []
        for e in entries:
            if id(e) in skip:
                self._restore_own(e)
                self.fifo.settle(e, applied=False)
                logger.warning("step %d: skipped the aggregate of step %d (non-finite gradient)", self.step, e.seq)
            else:
                self.fifo.settle(e, applied=True)
                out.append(e)
        if skip:
            self.consecutive_skips += 1
            if self.consecutive_skips > self.config.max_consecutive_skips:
                raise NonFiniteGradientError(
                    max(e.seq for e in entries), [], f"more than max_consecutive_skips={self.config.max_consecutive_skips} skips in a row")
        elif entries:
            self.consecutive_skips = 0
        return out

    # -- hook-mode helpers ----------------------------------------------------------------
    @property
    def step_open(self) -> bool:
        return self._cur is not None

    def name_of(self, param: torch.Tensor) -> str | None:
        """Name of a managed parameter (None if this state does not manage it)."""
        return self._name_of.get(id(param))

    def end_hook_step(self) -> None:
        """Close the step at DDP's last bucket; the due entries are settled lazily, after
        backward, by `resolve_hook_step` (their futures cannot be waited on inside it)."""
        self._popped = self.end_step()
        self._popped_resolved = False

    @property
    def unsettled(self) -> list[StepEntry]:
        """Hook mode: entries the last backward consumed that are not settled yet."""
        return [] if self._popped_resolved else list(self._popped)

    def resolve_hook_step(self) -> bool:
        """Hook mode: settle the entries the last backward applied; True if opt.step() should run."""
        if not self._popped_resolved:
            popped, self._popped = self._popped, []
            self._popped_resolved = True
            applied = self.resolve(popped, all_or_nothing=True)
            self._ready = bool(applied)
        return self._ready

    @property
    def ready(self) -> bool:
        """Whether the last step applied an aggregate (False on fill and skipped steps).

        In hook mode reading it settles the entries the last backward consumed, so it can
        be checked right after `backward()`.
        """
        if not self._popped_resolved:
            return self.resolve_hook_step()
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = bool(value)

    def _restore_own(self, entry: StepEntry) -> None:
        for u in entry.units:
            if u.own is None:
                continue  # this rank was invalid: it never compensated, nothing to give back
            for name, m in u.own.items():
                res = self.ef.residual(name)
                total = m.clone() if res is None else res + m.to(res.dtype)
                self.ef.update(name, total, torch.zeros_like(total))

    @staticmethod
    def aggregate(entry: StepEntry, name: str) -> torch.Tensor:
        """Decoded mean of `name` in a resolved entry."""
        for u in entry.units:
            if u.result is not None and name in u.result:
                return u.result[name]
        raise KeyError(f"entry {entry.seq}: no aggregate for {name!r}")

    # -- shutdown -------------------------------------------------------------------------
    def flush(self) -> list[StepEntry]:
        """Wait for every in-flight exchange (docs/design/deco_sgd.md#shutdown).
        Returns the entries to apply, oldest first.

        `flush="apply"`: valid entries are returned for the caller to apply (DecoOptimizer
        does); `"discard"`: every rank restores its own messages into its residuals.
        """
        if self._cur is not None:
            raise RuntimeError(f"flush: step {self.step} is open; flush between steps")
        if not self._popped_resolved:
            self.resolve_hook_step()
        entries = self.fifo.pop_all()
        if self.config.flush == "discard":
            for e in entries:
                for u in e.units:
                    u.wait(step=e.seq, tau=self.staleness)
                self._restore_own(e)
                self.fifo.settle(e, applied=False)
            return []
        return self.resolve(entries)

    def close(self, *, barrier: bool = False) -> None:
        """Release the process groups this state created.

        `barrier=True` (collective; what `DecoOptimizer.close()` uses) first lets every
        rank reach this point, so no rank tears its connections down while a peer is
        still finishing an exchange on them.
        """
        if len(self.fifo):
            logger.warning("DecoState closed with %d exchanges in flight: steps %s", len(self.fifo), self.fifo.seqs)
        if barrier and self._own_groups:
            for g in self._own_groups:
                dist.barrier(group=g)
        clear_measured(self.group)  # the link measured for this group dies with it
        for g in self._own_groups:
            try:
                dist.destroy_process_group(g)
            except (RuntimeError, ValueError):  # already gone with the default group
                pass
        self._own_groups = []

    # -- checks -----------------------------------------------------------------------------
    def _check_layout(self) -> None:
        """One synchronous all-gather: same parameters, shapes, dtypes and config everywhere
        (docs/design/deco_sgd.md#mismatched-ranks)."""
        mine = (self.config.fingerprint(), [(n, tuple(p.shape), str(p.dtype)) for n, p in self.params.items()])
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.control_group)
        for r, theirs in enumerate(everyone):
            if theirs == mine:
                continue
            if theirs[0] != mine[0]:
                raise ValueError(f"config: rank {r} has a different DecoConfig (fingerprint {theirs[0][:12]} vs {mine[0][:12]})")
            for a, b in zip(mine[1], theirs[1]):
                if a != b:
                    raise ValueError(f"parameters: rank {r} differs from rank {self.rank} at {b} vs {a}")
            raise ValueError(f"parameters: rank {r} has {len(theirs[1])} parameters, rank {self.rank} has {len(mine[1])}")

    def _check_replicated(self) -> None:
        """MIN/MAX all-reduce of the fields every rank must agree on (docs/design/deco_sgd.md#checkpoints)."""
        pend = self.pending or (0.0, -1, -1, "")
        v = torch.tensor([self.step, self.ratio, self.staleness, len(self.fifo), self.fifo.launched,
                          pend[0], pend[1], pend[2]], dtype=torch.float64)
        hi, lo = v.clone(), -v
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.control_group)
        dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=self.control_group)
        if not torch.equal(hi, -lo):
            fields = ["step", "ratio", "staleness", "fifo_len", "launched", "pending_ratio", "pending_tau", "pending_step"]
            diff = [f for f, a, b in zip(fields, hi.tolist(), (-lo).tolist()) if a != b]
            raise DecoDesyncError(f"ranks disagree on replicated state after load: {diff}")

    # -- checkpoint (docs/design/deco_sgd.md#checkpoints) -------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per-rank checkpoint; waits for in-flight exchanges without applying them."""
        if self._cur is not None:
            raise RuntimeError(f"state_dict: step {self.step} is open; save between steps")
        if not self._popped_resolved:
            self.resolve_hook_step()
        if self.config.checkpoint_queue == "drain" and len(self.fifo):
            raise ValueError(
                "checkpoint_queue: 'drain' saves an empty FIFO; call DecoOptimizer.drain() before state_dict()")
        entries = []
        for e in self.fifo:
            units = []
            for u in e.units:
                u.wait(step=e.seq, tau=self.staleness)
                assert u.result is not None and u.valid is not None
                units.append({"names": list(u.names), "result": {k: v.clone() for k, v in u.result.items()},
                              "own": None if u.own is None else {k: v.clone() for k, v in u.own.items()},
                              "valid": list(u.valid), "agg_finite": u.agg_finite, "codec_spec": u.codec_spec})
            entries.append({"seq": e.seq, "ratio": e.ratio, "units": units})
        counters = {r: c.counter for r, c in self._codecs.items() if c is not None and hasattr(c, "counter")}
        return {
            "version": STATE_VERSION, "config": self.config.to_dict(), "config_hash": self.config.fingerprint(),
            "world_size": self.world_size, "rank": self.rank, "step": self.step,
            "ratio": self.ratio, "staleness": self.staleness, "pending": self.pending,
            "decisions": list(self.decisions), "consecutive_skips": self.consecutive_skips,
            "ef": self.ef.state_dict(),
            "fifo": {"launched": self.fifo.launched, "applied": self.fifo.applied, "skipped": self.fifo.skipped,
                     "entries": entries},
            "codec_counters": counters,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "extra": dict(self.extra),
            "driver": None if self.driver is None else self.driver.state_dict(),
            "values": {"current": self.values, "pending": self._pending_values},
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore a checkpoint of this rank (collective: checks agreement across ranks).

        Everything is validated first (`deco_sgd.checkpoint.check_state_dict`: rank, world
        size, config fingerprint, step, shapes, dtypes, finiteness), so a bad checkpoint raises
        `CheckpointError` here and leaves this state untouched.
        """
        check_state_dict(sd, self)
        if (sd.get("driver") is None) != (self.driver is None):
            raise ValueError("state: saved with and loaded without the adaptive driver (or the reverse)")
        self.step, self.ratio, self.staleness = sd["step"], sd["ratio"], sd["staleness"]
        self.pending = None if sd["pending"] is None else tuple(sd["pending"])  # type: ignore[assignment]
        self.decisions = list(sd["decisions"])
        self.consecutive_skips = sd["consecutive_skips"]
        self.ef.load_state_dict(sd["ef"])
        entries = []
        for e in sd["fifo"]["entries"]:
            entry = StepEntry(e["seq"], e["ratio"])
            for u in e["units"]:
                entry.units.append(completed_unit(u["names"], u["result"], u["own"], u["valid"], u["agg_finite"],
                                                  e["ratio"], u["codec_spec"]))
            entries.append(entry)
        f = sd["fifo"]
        self.fifo.restore(entries, f["launched"], f["applied"], f["skipped"])
        for r, counter in sd["codec_counters"].items():
            codec = self.codec_for(r)
            assert codec is not None
            codec.counter = counter  # type: ignore[attr-defined]
        rng = sd["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.extra = dict(sd["extra"])
        vals = sd.get("values") or {"current": self.config.initial_values, "pending": None}
        self.values, self._pending_values = vals["current"], vals["pending"]
        if (sd.get("driver") is None) != (self.driver is None):
            raise ValueError("state: saved with and loaded without the adaptive driver (or the reverse)")
        if self.driver is not None:
            self.driver.load_state_dict(sd["driver"])
        self._cur, self._popped, self._popped_resolved, self._ready = None, [], True, False
        self._check_replicated()
