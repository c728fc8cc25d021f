"""Real-time mode: n gloo processes over `netsim.emulate`, and the check of the virtual clock
(docs/design/deco_sgd.md#real-time-validation).

One real-time run (`run_real(spec)`):

1. spawns `spec.n` gloo ranks (`ccomm.ranks.run_ranks`); each builds the task, its model and an
   SGD optimizer, creates a data group and enters `netsim.emulate(link, group)`, so every
   DeCo-SGD exchange on that group completes no earlier than the link model says;
2. runs the real `DecoOptimizer` (wrapper mode) at a fixed (ratio, staleness, codec), or
   with a decision list replayed through `DecoState.schedule` (so DeCo-SGD's controller
   feedback is removed and only the clock is compared), or adaptively (`mode: adaptive`,
   control exchanges on the emulated group too, so the controller measures the link);
3. pads each step's forward/backward to `compute_time_s` with a calibrated sleep and
   records per step: start, launch and end wall times, real compute time, the (δ, τ) in
   force, the bytes and collective of every unit launched and the steps whose exchanges it
   waited for (applied, or skipped as non-finite);
4. flushes (untimed), evaluates the task metric and returns every rank's record.

`predict_virtual(result)` replays the recorded schedule (same sizes, same waited entries,
per-rank compute = max(compute_time_s, measured) + host work) through the virtual clock,
charging the transport of the backend that ran (`BACKEND_TRANSPORT`), and `validate(result)`
gives the relative error of virtual against real elapsed time at every checkpoint step;
`REL_TOL` is the 15 % bound of docs/design/deco_sgd.md#real-time-validation.

CLI (`realtime_cli`): ``python -m deco_sgd.bench.realtime --config CFG.yaml --out DIR`` runs
every method of a config in real time, or ``--bench SCENARIO.yaml [--results results.json]``
the clock-validation methods of a `deco-sgd bench` scenario, and writes ``DIR/realtime.json``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ccomm.ranks import run_ranks
from ccomm.validate import check_int, check_number

from ..config import VALUE_FORMATS as _VALUE_FORMATS
from .vclock import replay

__all__ = ["REL_TOL", "LATE_TIME_MAX", "BACKEND_TRANSPORT", "RealRunSpec", "RealResult", "run_real", "run_rank",
           "train_rank",
           "step_records", "predict_virtual", "checkpoints", "late_bound_s", "validate"]


#: Virtual and real elapsed time must agree within this fraction at every checkpoint
#: (docs/design/deco_sgd.md#real-time-validation).
REL_TOL = 0.15
#: An operation is late when its real loopback transport finished after its modeled time
#: (e.g. on a CPU starved by other jobs). When a rank's late operations may have cost more
#: than this fraction of the run (bound: late ops × the largest lateness), the run did not
#: emulate the link and its comparison says nothing about the clock: `validate` marks it invalid.
LATE_TIME_MAX = 0.05
#: The transport profile (`vclock.TRANSPORTS`) the replay charges per backend: emulate delays
#: each collective to netsim's ideal model; on real namespaces gloo's TCP transport carried
#: the exchanges, rendezvous included (`netsim.model.gloo`).
BACKEND_TRANSPORT: Mapping[str, str] = {"emulate": "ideal", "netns": "gloo"}
_DECO_FORBIDDEN = ("mode",)


@dataclass(frozen=True)
class RealRunSpec:
    """One method run in real time (validated on construction)."""

    name: str
    #: DecoConfig fields (codec, ratio, staleness, ...); `mode` is set from `adaptive`.
    deco: Mapping[str, Any] = field(default_factory=dict)
    adaptive: bool = False
    #: (step, ratio, staleness[, values]) decisions replayed in static mode, each from its step
    #: on; values (fp32, fp16, bf16, q8, q4) None or absent: the format in force stays.
    decisions: tuple[tuple[int, float, int, str | None], ...] = ()
    task: str = "mnist"
    task_config: Mapping[str, Any] = field(default_factory=dict)
    n: int = 4
    steps: int = 30
    compute_time_s: float = 0.15
    bandwidth_mbps: float | None = 20.0
    latency_ms: float = 25.0
    #: A netsim trace file (CSV or Mahimahi) instead of a constant bandwidth.
    trace: str | None = None
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    checkpoint_every: int = 10
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: must be a non-empty string, got {self.name!r}")
        bad = [k for k in _DECO_FORBIDDEN if k in self.deco]
        if bad:
            raise ValueError(f"deco: set the mode with `adaptive: true|false`, not deco.{bad[0]}")
        object.__setattr__(self, "deco", dict(self.deco))
        object.__setattr__(self, "task_config", dict(self.task_config))
        decs = []
        for d in self.decisions:
            if len(d) not in (3, 4):
                raise ValueError(f"decisions: each entry must be [step, ratio, staleness] or [step, ratio, "
                                 f"staleness, values], got {d!r}")
            values = None if len(d) == 3 or d[3] is None else str(d[3])
            if values is not None and values not in _VALUE_FORMATS:
                raise ValueError(f"decisions: values must be one of {list(_VALUE_FORMATS)}, got {values!r}")
            decs.append((int(d[0]), float(d[1]), int(d[2]), values))
        if [d[0] for d in decs] != sorted({d[0] for d in decs}):
            raise ValueError(f"decisions: steps must be distinct and increasing, got {[d[0] for d in decs]}")
        if decs and self.adaptive:
            raise ValueError("decisions: a replayed decision list needs adaptive: false")
        object.__setattr__(self, "decisions", tuple(decs))
        for k in ("n", "steps", "checkpoint_every"):
            check_int(k, getattr(self, k), 1)
        check_int("seed", self.seed, 0)
        for k in ("compute_time_s", "lr", "timeout_s"):
            check_number(k, getattr(self, k), 0.0, lo_open=True)
        check_number("momentum", self.momentum, 0.0)
        check_number("latency_ms", self.latency_ms, 0.0)
        if (self.trace is None) == (self.bandwidth_mbps is None):
            raise ValueError("bandwidth_mbps, trace: give exactly one (a constant rate or a trace file)")
        if self.bandwidth_mbps is not None:
            check_number("bandwidth_mbps", self.bandwidth_mbps, 0.0, lo_open=True)
        self.deco_config()  # fails now, in the parent, rather than in n children
        self.link()

    def deco_config(self) -> Any:
        from deco_sgd.config import DecoConfig

        kw = {"warmup_steps": 0, "timeout_s": 60.0, **self.deco, "mode": "adaptive" if self.adaptive else "static"}
        return DecoConfig.from_dict(kw)

    def replaying(self, source: "RealRunSpec", log: Sequence[Mapping[str, Any]]) -> "RealRunSpec":
        """This static run replaying the switches in `log` of the adaptive run `source`, from
        the point `source` started at (its first point is not a switch, so it is not in the log)."""
        start = source.deco_config()
        deco = {**self.deco, "ratio": start.ratio, "staleness": start.staleness}
        return dataclasses.replace(self, deco=deco, decisions=tuple(
            (int(d["step"]), float(d["ratio"]), int(d["staleness"]), d.get("values")) for d in log))

    def link(self) -> Any:
        from netsim import Link, Trace

        if self.trace is not None:
            return Link(None, self.latency_ms, trace=Trace.load(self.trace))
        return Link(self.bandwidth_mbps, self.latency_ms)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decisions"] = [list(x) for x in self.decisions]
        return d


@dataclass
class RealResult:
    """What `run_real` returns: the spec and every rank's record (times in seconds)."""

    spec: RealRunSpec
    ranks: list[dict[str, Any]]
    #: Where the link was: `emulate` (in-process model) or `netns` (real namespaces).
    backend: str = "emulate"

    @property
    def real_ends(self) -> list[float]:
        """Real elapsed time at the end of each step: the slowest rank's, from the common start."""
        return [max(r["steps"][s]["end"] for r in self.ranks) for s in range(self.spec.steps)]

    @property
    def final_metric(self) -> float:
        return float(self.ranks[0]["final_metric"])


# ---------------------------------------------------------------------------- one rank
class _StepTimer:
    """Sits in `DecoState.driver` (wrapping the adaptive driver, if any) to learn how long
    each `DecoOptimizer.step()` blocked on exchanges; the rest of the step is host work
    (encode, launch, optimizer) that the virtual replay counts as compute."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.blocked_s = 0.0

    def on_step_end(self, applied: Any, blocked_s: float) -> None:
        self.blocked_s = blocked_s
        if self.inner is not None:
            self.inner.on_step_end(applied, blocked_s)

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.inner is None else self.inner.state_dict()

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(sd)


def _recording_state(*args: Any, **kwargs: Any) -> Any:
    """A `DecoState` that also records, per step, the units it launched and the entries it
    waited for (applied or skipped: a skipped aggregate is still waited for)."""
    from deco_sgd.state import DecoState

    class _RecordingState(DecoState):
        def __init__(self) -> None:
            super().__init__(*args, **kwargs)
            self.rec_units: list[Any] = []
            self.rec_waited: list[int] = []

        def launch(self, names: Sequence[str], grads: Sequence[Any], key: str) -> Any:
            unit = super().launch(names, grads, key)
            self.rec_units.append(unit)
            return unit

        def end_step(self) -> list[Any]:
            popped = super().end_step()
            self.rec_waited = [e.seq for e in popped]
            return popped

    return _RecordingState()


def run_rank(rank: int, world: int, spec: RealRunSpec) -> dict[str, Any]:
    """One rank of a real-time run over `netsim.emulate` (gloo already initialised; see the
    module docstring)."""
    import torch.distributed as dist

    from netsim import emulate

    cfg = spec.deco_config()
    data_group = dist.new_group(backend="gloo")
    with emulate(spec.link(), group=data_group, seed=spec.seed, timeout_s=cfg.timeout_s) as emu:
        # Adaptive runs send their control exchanges over the emulated link too, so the
        # latency probes and the bandwidth estimator see the link, not loopback.
        ctrl = emu.group if spec.adaptive else None
        rec = train_rank(rank, world, spec, group=emu.group, control_group=ctrl, trace_now=emu.now)
        rec["emulate"] = dataclasses.asdict(emu.stats)
    dist.destroy_process_group(data_group)
    return rec


def _start_together(lead_s: float = 0.3) -> float:
    """A CLOCK_MONOTONIC instant, broadcast by rank 0 over the default group, at which every
    rank starts its clock (one machine: every process and namespace shares that clock), so
    barrier skew does not count as elapsed time."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    at = torch.tensor([time.monotonic() + lead_s], dtype=torch.float64)
    dist.broadcast(at, 0)
    t0 = float(at.item())
    while time.monotonic() < t0:
        time.sleep(min(1e-3, max(0.0, t0 - time.monotonic())))
    return t0


def train_rank(rank: int, world: int, spec: RealRunSpec, *, group: Any, control_group: Any,
               trace_now: Any) -> dict[str, Any]:
    """The timed training loop of one rank (steps 2-4 of the module docstring) on the data
    `group` and `control_group` the backend provides (None: `DecoState`'s defaults);
    `trace_now()` is the link's trace time, recorded at the start."""
    import torch

    from deco_sgd.optim import DecoOptimizer
    from netsim.model.clock import WallClock

    from .tasks import make_task

    if world != spec.n:
        raise ValueError(f"n: the spec asks for {spec.n} ranks, running on {world}")
    task = make_task(spec.task, **spec.task_config)
    model = task.model(spec.seed)
    inner = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    cfg = spec.deco_config()
    clock = WallClock()
    clock.bias_s  # calibrate before the timed region
    replay = {s: (r, t, v) for s, r, t, v in spec.decisions}
    steps: list[dict[str, Any]] = []
    losses: list[float] = []
    state = _recording_state(cfg, model, group=group, control_group=control_group)
    opt = DecoOptimizer(inner, state)
    timer = _StepTimer(state.driver)
    state.driver = timer
    batches = task.batches(rank, world, spec.seed)
    t0 = _start_together()
    emu_t0 = trace_now()
    load = [os.getloadavg()[0]]
    for s in range(spec.steps):
        if s in replay:
            state.schedule(replay[s][0], replay[s][1], s, reason="replay", values=replay[s][2])
        state.rec_units, state.rec_waited = [], []
        start = time.monotonic()
        loss = task.loss(model, next(batches))
        opt.zero_grad()
        loss.backward()
        compute = time.monotonic() - start
        clock.sleep_until(start + spec.compute_time_s)  # pad to the modeled compute time
        launch = time.monotonic()
        opt.step()
        end = time.monotonic()
        units = [{"nbytes": u.nbytes, "collective": u.collective, "algo": u.algo} for u in state.rec_units]
        ratio, tau = state.rec_units[0].ratio, state.current_staleness  # the (δ, τ) this step ran with
        steps.append({"step": s, "start": start - t0, "launch": launch - t0, "end": end - t0,
                      "compute_s": compute, "host_s": max(0.0, end - launch - timer.blocked_s),
                      "ratio": ratio, "staleness": tau, "units": units,
                      "waited": list(state.rec_waited), "applied": [e.seq for e in opt.last_applied]})
        losses.append(float(loss.detach()))
    t_end = time.monotonic()
    load.append(os.getloadavg()[0])
    opt.close()  # flush and release the control group: collective, untimed
    return {"rank": rank, "t0_emu": emu_t0, "t0": t0, "t_end": t_end, "loadavg": load, "steps": steps, "losses": losses,
            "decisions": [{k: d[k] for k in ("step", "ratio", "staleness", "values", "reason")}
                          for d in state.decisions],
            "final_metric": task.evaluate(model) if rank == 0 else None}


def run_real(spec: RealRunSpec) -> RealResult:
    """Run `spec` on `spec.n` fresh local gloo ranks (blocking; see the module docstring)."""
    ranks = run_ranks(run_rank, spec.n, spec, timeout=spec.timeout_s)
    return RealResult(spec, ranks)


# ---------------------------------------------------------------------------- the clock check
def step_records(result: RealResult, host: bool = True) -> list[dict[str, Any]]:
    """The recorded schedule in `vclock.replay`'s record format (sizes, algorithms and waits
    are identical on every rank; compute times are per rank, in ``"t"``).

    Compute of a step = max(compute_time_s, measured forward/backward), plus (`host=True`)
    the measured host work of `DecoOptimizer.step()` outside its waits: the real step is
    slower than `compute_time_s` by that much, so the replay uses the log
    (docs/design/deco_sgd.md#real-time-validation). With
    `host=True` the compute phase is also at least what it really lasted, from the end of the
    rank's previous step to this launch: on a loaded host the padding sleep wakes late and the
    bookkeeping between steps takes time, and that time is the host's, not the link's. What
    remains for the clock to predict is exactly the waits on exchanges. Every unit is its own
    chain (one per bucket/chunk, all launched at the end of compute); a unit recorded without
    its algorithm (before it was recorded) is charged what ``algo="auto"`` picks on the link."""
    spec = result.spec
    records = []
    prev_end = [0.0] * len(result.ranks)
    for s in range(spec.steps):
        rows = [r["steps"][s] for r in result.ranks]
        row = rows[0]
        for other in rows[1:]:
            if other["units"] != row["units"] or other["waited"] != row["waited"]:
                raise ValueError(f"step {s}: ranks recorded different schedules")
        comp = [max(spec.compute_time_s, x["compute_s"], x.get("launch", 0.0) - prev if host else 0.0)
                + (x["host_s"] if host else 0.0) for x, prev in zip(rows, prev_end)]
        prev_end = [x.get("end", 0.0) for x in rows]
        chains = [[[u["nbytes"], u["collective"], *([u["algo"]] if "algo" in u else [])]] for u in row["units"]]
        records.append({"x": chains, "a": list(row["waited"]), "t": comp})
    return records


def predict_virtual(result: RealResult, host: bool = True) -> list[float]:
    """Virtual elapsed time at the end of each step of `result`'s schedule (see `step_records`).

    `vclock.replay` from the trace time of the real start; one `StepClock` per rank; the
    exchanges charged by the transport profile of the backend that carried them
    (`BACKEND_TRANSPORT`)."""
    spec = result.spec
    t0 = sum(r["t0_emu"] for r in result.ranks) / len(result.ranks)  # trace time of the real start
    ends = replay(step_records(result, host), spec.link(), spec.n, spec.compute_time_s, start_s=t0,
                  transport=BACKEND_TRANSPORT[result.backend])
    return [e - t0 for e in ends]


def checkpoints(spec: RealRunSpec) -> list[int]:
    """Steps (1-based counts of finished steps) where the clocks are compared."""
    pts = list(range(spec.checkpoint_every, spec.steps + 1, spec.checkpoint_every))
    return pts if pts and pts[-1] == spec.steps else pts + [spec.steps]


def late_bound_s(rank: Mapping[str, Any]) -> float:
    """How much of one rank's run the host may have lost by not keeping up with the link model.

    emulate: late operations × the largest lateness (a late loopback transfer finished after
    its modeled time). netns: the time the delay wire was stalled (union of its intervals of
    packets over 1 ms late) plus the run-queue wait of the rank's transport threads, both in
    the timed window (`realtime_netns`)."""
    if "emulate" in rank:
        return float(rank["emulate"]["late_ops"] * rank["emulate"]["max_late_s"])
    return float(rank["netns"]["late_s"])


def validate(result: RealResult, rel_tol: float = REL_TOL) -> dict[str, Any]:
    """Virtual vs real elapsed time at every checkpoint, with the relative error and a flag.

    `virtual_s` replays measured compute (the check); `virtual_fixed_s` charges exactly
    `compute_time_s` per step, as the virtual benchmark does, for reference.
    """
    real, virt, fixed = result.real_ends, predict_virtual(result), predict_virtual(result, host=False)
    rows = []
    for k in checkpoints(result.spec):
        r, v, f = real[k - 1], virt[k - 1], fixed[k - 1]
        rows.append({"step": k, "real_s": r, "virtual_s": v, "rel_err": abs(v - r) / r,
                     "virtual_fixed_s": f, "rel_err_fixed": abs(f - r) / r})
    worst = max(x["rel_err"] for x in rows)
    late_s = [late_bound_s(r) for r in result.ranks]
    late_time = max(late_s) / real[-1]
    late = [r["emulate"]["late_ops"] if "emulate" in r else None for r in result.ranks]
    return {"method": result.spec.name, "backend": result.backend,
            "transport": BACKEND_TRANSPORT[result.backend], "checkpoints": rows, "max_rel_err": worst,
            "rel_tol": rel_tol, "breach": worst > rel_tol, "emulate_late_ops": late, "late_s": late_s,
            "late_time_frac": late_time,
            "emulation_ok": late_time <= LATE_TIME_MAX, "final_metric": result.final_metric,
            "max_rel_err_fixed": max(x["rel_err_fixed"] for x in rows),
            "max_compute_s": max(x["compute_s"] for r in result.ranks for x in r["steps"]),
            "mean_host_s": sum(x["host_s"] for r in result.ranks for x in r["steps"])
            / sum(len(r["steps"]) for r in result.ranks)}


if __name__ == "__main__":
    from .realtime_cli import main

    sys.exit(main())
