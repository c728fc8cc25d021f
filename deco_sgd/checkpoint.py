"""Validation of a DeCo-SGD checkpoint before any of it is loaded (docs/design/deco_sgd.md#checkpoints).

`DecoState.load_state_dict` calls `check_state_dict(sd, state)` first, so a checkpoint of
another rank, world size, config or model, a NaN residual, a wrong shape or dtype, or a
negative or non-integer step fails at load time with a `CheckpointError` naming the field,
instead of steps later (or never). Nothing of the running state is touched when it fails.

What a checkpoint holds (`DecoState.state_dict()`, one per rank): format version, the
config and its fingerprint, rank and world size, step, (δ, τ) in force and any pending decision,
the decision log, the error-feedback residuals, the in-flight FIFO (every queued entry's
decoded aggregate, own messages and validity flags), the seeded codecs' counters, the
torch / numpy / python RNG states, the controller's `extra` and the adaptive driver's state.
`DecoOptimizer.state_dict()` holds it beside the inner optimizer's state.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch

from ccomm.finite import all_finite
from ccomm.validate import check_int, check_ratio

from .config import DecoConfig

__all__ = ["CheckpointError", "Loadable", "check_state_dict", "REQUIRED_KEYS", "STATE_VERSION"]

#: Version of the checkpoint format (`DecoState.state_dict()` writes it, loading checks it).
STATE_VERSION = 1


class Loadable(Protocol):
    """What the checks read of the state a checkpoint is loaded into (`deco_sgd.state.DecoState`)."""

    config: DecoConfig
    rank: int
    world_size: int
    params: Mapping[str, torch.Tensor]


REQUIRED_KEYS = ("version", "config_hash", "world_size", "rank", "step", "ratio", "staleness", "pending",
                 "decisions", "consecutive_skips", "ef", "fifo", "codec_counters", "rng", "extra")


class CheckpointError(ValueError):
    """A DeCo-SGD checkpoint does not fit the state it is loaded into."""


def _tensor(field: str, t: Any, like: torch.Tensor, *, finite: bool = True) -> None:
    """`t` must be a tensor with `like`'s shape and dtype (and finite unless told otherwise)."""
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"state.{field}: expected a tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise CheckpointError(f"state.{field}: shape {tuple(t.shape)} differs from the parameter's "
                              f"{tuple(like.shape)} (a checkpoint of another model?)")
    if t.dtype != like.dtype:
        raise CheckpointError(f"state.{field}: dtype {t.dtype} differs from the parameter's {like.dtype}")
    if finite and not all_finite(t):
        raise CheckpointError(f"state.{field}: holds inf or NaN")


def _mapping(field: str, v: Any) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise CheckpointError(f"state.{field}: expected a mapping, got {type(v).__name__}")
    return v


def _params_of(field: str, names: Any, params: Mapping[str, torch.Tensor]) -> list[str]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"state.{field}: expected a list of parameter names, got {names!r}")
    unknown = [n for n in names if n not in params]
    if unknown:
        raise CheckpointError(f"state.{field}: unknown parameter(s) {unknown[:5]} (a checkpoint of another model?)")
    return list(names)


def _check_fifo(fifo: Any, step: int, state: Loadable) -> None:
    f = _mapping("fifo", fifo)
    for k in ("launched", "applied", "skipped"):
        check_int(f"state.fifo.{k}", f.get(k), 0, error=CheckpointError)
    entries = f.get("entries")
    if not isinstance(entries, list):
        raise CheckpointError(f"state.fifo.entries: expected a list, got {type(entries).__name__}")
    if len(entries) > state.config.tau_max:
        raise CheckpointError(f"state.fifo.entries: {len(entries)} queued steps, more than tau_max="
                              f"{state.config.tau_max}")
    for i, e in enumerate(entries):
        e = _mapping(f"fifo.entries[{i}]", e)
        seq = check_int(f"state.fifo.entries[{i}].seq", e.get("seq"), 0, error=CheckpointError)
        if seq >= step:
            raise CheckpointError(f"state.fifo.entries[{i}].seq: queued step {seq} is not before state.step={step}")
        check_ratio(f"state.fifo.entries[{i}].ratio", e.get("ratio"), error=CheckpointError)
        units = e.get("units")
        if not isinstance(units, list):
            raise CheckpointError(f"state.fifo.entries[{i}].units: expected a list")
        for j, u in enumerate(units):
            where = f"fifo.entries[{i}].units[{j}]"
            u = _mapping(where, u)
            names = _params_of(f"{where}.names", u.get("names"), state.params)
            valid = u.get("valid")
            if not isinstance(valid, (list, tuple)) or len(valid) != state.world_size or \
                    not all(isinstance(v, bool) for v in valid):
                raise CheckpointError(f"state.{where}.valid: expected {state.world_size} booleans, got {valid!r}")
            if not isinstance(u.get("agg_finite"), bool):
                raise CheckpointError(f"state.{where}.agg_finite: expected a boolean")
            ok = all(valid) and u["agg_finite"]
            result = _mapping(f"{where}.result", u.get("result"))
            if sorted(result) != sorted(names):
                raise CheckpointError(f"state.{where}.result: holds {sorted(result)[:5]}, expected {names[:5]}")
            for n in names:
                # A unit that was not ok is skipped on resolve: its aggregate may be non-finite.
                _tensor(f"{where}.result[{n!r}] (step {seq})", result[n], state.params[n], finite=ok)
            own = u.get("own")
            if own is not None:
                for n, t in _mapping(f"{where}.own", own).items():
                    _params_of(f"{where}.own", [n], state.params)
                    _tensor(f"{where}.own[{n!r}]", t, state.params[n])


def check_state_dict(sd: Any, state: Loadable) -> None:
    """Raise `CheckpointError` unless `sd` is a checkpoint this rank of `state` may load."""
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"state: expected the mapping DecoState.state_dict() returns, got {type(sd).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        hint = " (this looks like a torch optimizer's state dict)" if "param_groups" in sd else ""
        raise CheckpointError(f"state: missing {missing}; expected the output of DecoState.state_dict(){hint}")
    if sd["version"] != STATE_VERSION:
        raise CheckpointError(f"state.version: must be {STATE_VERSION}, got {sd['version']!r}")
    if sd["config_hash"] != state.config.fingerprint():
        raise CheckpointError("state.config_hash: saved under a different DecoConfig (config fingerprint mismatch: "
                              f"{str(sd['config_hash'])[:12]} saved, {state.config.fingerprint()[:12]} running)")
    if sd["world_size"] != state.world_size:
        raise CheckpointError(f"state.world_size: saved with world_size={sd['world_size']!r}, "
                              f"running with {state.world_size}")
    if sd["rank"] != state.rank:
        raise CheckpointError(f"state.rank: this is rank {sd['rank']!r}'s checkpoint, loaded on rank {state.rank} "
                              "(every rank loads its own file: residuals are per rank)")
    step = check_int("state.step", sd["step"], 0, error=CheckpointError)
    check_ratio("state.ratio", sd["ratio"], error=CheckpointError)
    check_int("state.staleness", sd["staleness"], 0, state.config.tau_max, error=CheckpointError)
    check_int("state.consecutive_skips", sd["consecutive_skips"], 0, error=CheckpointError)
    pending = sd["pending"]
    if pending is not None:
        if not isinstance(pending, (list, tuple)) or len(pending) != 4:
            raise CheckpointError(f"state.pending: expected None or (ratio, staleness, step, reason), got {pending!r}")
        check_ratio("state.pending[0]", pending[0], error=CheckpointError)
        check_int("state.pending[1]", pending[1], 0, state.config.tau_max, error=CheckpointError)
        check_int("state.pending[2]", pending[2], step, error=CheckpointError)
    if not isinstance(sd["decisions"], list):
        raise CheckpointError("state.decisions: expected a list")
    residuals = _mapping("ef.residuals", _mapping("ef", sd["ef"]).get("residuals"))
    for n, t in residuals.items():
        _params_of("ef.residuals", [n], state.params)
        _tensor(f"ef.residuals[{n!r}]", t, state.params[n])
    _check_fifo(sd["fifo"], step, state)
    for r, c in _mapping("codec_counters", sd["codec_counters"]).items():
        check_ratio(f"state.codec_counters key {r!r}", r, error=CheckpointError)
        check_int(f"state.codec_counters[{r!r}]", c, 0, error=CheckpointError)
    rng = _mapping("rng", sd["rng"])
    if not {"torch", "numpy", "python"} <= set(rng):
        raise CheckpointError(f"state.rng: needs torch, numpy and python states, got {sorted(rng)}")
    if not isinstance(rng["torch"], torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise CheckpointError("state.rng.torch: expected torch.get_rng_state()'s uint8 tensor")
    _mapping("extra", sd["extra"])
