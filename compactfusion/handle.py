"""`HandleBase`: what every CompactFusion front-end's handle shares.

Two front-ends install CompactFusion on a model: `compactfusion.parallelize` (diffusers'
attention processors, `parallel.Handle`) and the xDiT adapter
(`compactfusion.adapters.xfuser.patch`, `XfuserHandle`). They differ only in how they get
into the model's attention; everything a handle does around a forward call is here, once,
so the two cannot drift apart:

- the public interface: `step`, `errors`, `stats`, `requests`, `rank`, `world_size`,
  `state`, `watch()`, `reset()`, `state_nbytes()`, `remove()` (idempotent) and the
  "handle was removed" refusal;
- the autograd guard (`_guard_autograd`): a forward that would record autograd raises;
- request boundaries (`_request_boundary`): `compactfusion.requests.RequestTracker`, asked at
  the first call of every step;
- the consistency checks after a forward (`_after_forward`), see `check_due`;
- cross-rank agreement before anything is installed (`agree`).

`check_every = N > 0` checks after every N-th completed denoising step of a request, i.e.
when `completed_steps` (the step count after the forward that just ended, all
`calls_per_step` branches included) is a multiple of N: completed steps N, 2N, 3N, ...
This is "every k-th step" of docs/design/compactfusion.md#configuration-and-faults; N = 1 checks after every step. The check
is that every rank holds bit-identical bases (`CompactState.check_consistency`) and, when
no `policy` skips steps, that each own key was encoded once per completed step (the
handle's step count and the codec's use counts, hence warm-up, agree).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist

from ccomm.configs import digest_dict

from .config import CompactConfig
from .errors import CompactStateError
from .requests import RequestStats, RequestTracker
from .state import CompactState

__all__ = ["HandleBase", "agree", "check_due", "config_fields"]


def check_due(config: CompactConfig, state: CompactState) -> bool:
    """Whether the forward call that just ended is followed by a consistency check (see module docstring)."""
    every = config.check_every
    return every > 0 and state.branch == config.calls_per_step - 1 and state.completed_steps % every == 0


def agree(fields: Mapping[str, Any], group: Any) -> None:
    """All-gather `fields` over `group`; every rank raises ValueError unless all are equal.

    Runs before anything is installed, so ranks whose configuration, model or world differ
    fail at once with the same error instead of hanging at the first mismatched exchange.
    The error names every field that differs, with both values.
    """
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, dict(fields), group=group)
    bad = [r for r, other in enumerate(every) if other != fields]
    if bad:
        other = every[bad[0]]
        diff = "; ".join(f"{k}: {other.get(k)!r} there, {fields.get(k)!r} here"
                         for k in sorted(set(fields) | set(other)) if other.get(k) != fields.get(k))
        raise ValueError(f"ranks {bad} differ from this rank in {diff}")


def config_fields(config: CompactConfig) -> dict[str, Any]:
    """`config`'s digested fields as ``{"config.<field>": value}``, for `agree`."""
    return {f"config.{k}": v for k, v in digest_dict(config).items()}


class HandleBase:
    """One CompactFusion installation on a model: `reset()` between requests, `remove()` to restore.

    Attributes: `config`, `group`, `state` (the CompactState), `step` (completed denoising
    steps since the last reset = forward_calls // calls_per_step), `errors` (rows recorded
    with record_errors=True since the last reset), `stats` (ccomm CommStats of this handle:
    per request unless a `stats=` object was passed in), `requests` (lifetime counts of
    requests and resets by cause, `compactfusion.requests.RequestStats`).

    Subclasses install their hooks into `_hooks` (removed by `remove()`), call
    `_guard_autograd`, `_request_boundary` and `state.begin_forward()` before a forward and
    `_after_forward()` after it, and undo their own changes in `_uninstall()`.
    """

    def __init__(self, config: CompactConfig, group: Any, state: CompactState) -> None:
        self.config = config
        self.group = group
        self.state = state
        self._hooks: list[Any] = []
        self._requests = RequestTracker(config.new_request)
        self._removed = False

    # -- public ---------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Completed denoising steps since the last reset (forward calls // calls_per_step)."""
        self._alive()
        return self.state.completed_steps

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.state.errors

    @property
    def stats(self) -> Any:
        return self.state.stats

    @property
    def world_size(self) -> int:
        return self.state.world

    @property
    def rank(self) -> int:
        return self.state.rank

    @property
    def requests(self) -> RequestStats:
        return self._requests.stats

    def watch(self, obj: Any) -> None:
        """Take request boundaries from a diffusers scheduler's `set_timesteps` (or a pipeline's
        `.scheduler`), for bare sampling loops; see `compactfusion.requests`."""
        self._alive()
        self._requests.watch(obj)

    def reset(self) -> None:
        """Drain in-flight work; drop bases, counters and per-request stats (between requests)."""
        self._alive()
        self._drop()
        self._requests.restart()

    def state_nbytes(self) -> int:
        """Bytes currently held by bases and stale K/V on this rank."""
        self._alive()
        return self.state.nbytes()

    def remove(self) -> None:
        """Undo the installation, remove the hooks, drop the state. Idempotent."""
        if self._removed:
            return
        self._removed = True
        self._requests.unwatch()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        try:
            self.state.close()
        finally:
            self._uninstall()

    # -- for subclasses ----------------------------------------------------------------------
    def _uninstall(self) -> None:
        """Restore what the subclass replaced in the model (called once, by `remove`)."""

    def _drop(self) -> None:
        """Forget the current request (subclasses extend it with their per-request fields)."""
        self.state.reset()

    def _alive(self) -> None:
        if self._removed:
            raise RuntimeError("compactfusion: this handle was removed; install CompactFusion on the model again")

    def _guard_autograd(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Refuse a forward that would record autograd: the exchanges are not differentiable.

        Recorded when grad mode is on and a parameter or a tensor argument requires grad;
        a frozen model called with grad mode on records nothing and runs.
        """
        if not torch.is_grad_enabled():
            return
        inputs = [*args, *kwargs.values()]
        if any(p.requires_grad for p in module.parameters()) or any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            raise RuntimeError("compactfusion is inference only: call the model under torch.no_grad() or "
                               "torch.inference_mode(), or set requires_grad_(False)")

    def _request_boundary(self, timestep: float | None) -> None:
        """Start a new request here if the tracker says so (asked at every call; only a step's first counts)."""
        if self._requests.before_forward(timestep, self.state.calls % self.config.calls_per_step == 0):
            self._drop()

    def _after_forward(self) -> None:
        """Run the consistency checks when `check_due` (see module docstring)."""
        st, cfg = self.state, self.config
        if not check_due(cfg, st):
            return
        st.check_consistency()
        if st.rc is not None and cfg.policy is None:
            done = st.completed_steps
            for key in st.rc.keys():
                if key.source == st.rank and st.rc.step(key) != done:
                    raise CompactStateError(f"{key}: {st.rc.step(key)} uses but handle step {done}")
