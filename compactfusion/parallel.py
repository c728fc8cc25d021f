"""`parallelize(transformer, config, group=None) -> Handle`: CompactFusion on a diffusers model.

Algorithm (docs/design/compactfusion.md#hooking-diffusers):
1. Look up `type(transformer).__name__` in `MODEL_SPECS` (DiT, PixArt, Flux); other classes
   and fused QKV projections raise ValueError; a model already parallelized raises too.
2. Agree on the config's fields, class, layer count, heads, head_dim, P and ccomm version
   over the group (`compactfusion.handle.agree`), so every rank fails with a ValueError
   naming the fields that differ instead of hanging later.
3. Save the attention processors; set a full mapping (diffusers' `set_attn_processor` walk): our
   processors on the self-attention names (layer index = registration order), the
   originals elsewhere.
4. Hooks: a transformer pre-hook (step/branch counting, request boundaries from
   `compactfusion.requests.RequestTracker`: the watched scheduler of a pipeline passed in
   place of the transformer, else the timestep rule; shape-change and S % P checks, autograd refusal, the `max_state_mb` check);
   *split* slices the token embedder's output to this rank's chunk; *rope* (Flux) keeps
   the text rows of the rotary tables and this rank's image rows; *gather* all-gathers the
   final projection's output along the token dimension in rank order, uncompressed
   (`token_gather`); a transformer post-hook runs `check_every`. The autograd refusal,
   request boundaries, `check_every` and the public interface are
   `compactfusion.handle.HandleBase`'s, shared with the xfuser adapter.
5. `Handle.remove()` restores the processors, removes the hooks, drains and drops state.

Limits: inference only (a forward that records autograd raises RuntimeError); every rank
calls the model with identical arguments; inputs whose token count is not divisible by P
raise ValueError; Flux ControlNet residuals and IP-adapters are not supported (they act on
the full token sequence); the parallel model returns the full, gathered output on every rank.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ccomm.comm import allgather_payloads
from ccomm.payload import Payload, PayloadMeta
from ccomm.stats import CommStats

from .config import CompactConfig
from .errors import CompactStateError
from .handle import HandleBase, agree, config_fields
from .processors import CompactAttnProcessor, CompactFluxAttnProcessor
from .requests import timestep_value
from .state import CompactState

__all__ = ["ModelSpec", "MODEL_SPECS", "Handle", "parallelize"]

logger = logging.getLogger(__name__)

_MARK = "_compactfusion_handle"


@dataclass(frozen=True)
class ModelSpec:
    """Where CompactFusion hooks into one diffusers transformer class."""

    attn_pattern: str  # regex over `attn_processors` names: the self-attention layers
    split: str  # module whose output (B, S, C) is sliced to the local chunk
    gather: str  # module whose output (B, S_loc, X) is all-gathered along dim 1
    text: str  # "none" | "cross" (local cross-attention) | "joint" (replicated, front block)
    tokens: str  # how to count image tokens from the input: "patch" (B,C,H,W) or "seq" (B,S,C)
    rope: str | None = None  # Flux: rotary embedder whose image rows are sliced


MODEL_SPECS: dict[str, ModelSpec] = {
    "DiTTransformer2DModel": ModelSpec(r"transformer_blocks\.\d+\.attn1\.processor", "pos_embed", "proj_out_2", "none", "patch"),
    "PixArtTransformer2DModel": ModelSpec(r"transformer_blocks\.\d+\.attn1\.processor", "pos_embed", "proj_out", "cross", "patch"),
    "FluxTransformer2DModel": ModelSpec(
        r"(single_)?transformer_blocks\.\d+\.attn\.processor", "x_embedder", "proj_out", "joint", "seq", rope="pos_embed"
    ),
}


def attn_processors(model: torch.nn.Module) -> dict[str, Any]:
    """`{"<module path>.processor": processor}` in registration order (diffusers' AttentionMixin
    walk, reimplemented because DiTTransformer2DModel lacks the mixin)."""
    return {f"{name}.processor": mod.get_processor() for name, mod in model.named_modules()
            if name and hasattr(mod, "get_processor")}


def set_attn_processors(model: torch.nn.Module, mapping: dict[str, Any]) -> None:
    """Set every attention module's processor from a full mapping (as `set_attn_processor(dict)`)."""
    names = attn_processors(model)
    if set(names) != set(mapping):
        raise ValueError(f"mapping: expected exactly the processors {sorted(names)}")
    for name, mod in model.named_modules():
        if name and hasattr(mod, "set_processor"):
            mod.set_processor(mapping[f"{name}.processor"])


def _ccomm_version() -> str:
    try:
        return importlib.metadata.version("ccomm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Handle(HandleBase):
    """A model parallelized by `parallelize`: `reset()` between requests, `remove()` to restore it exactly.

    The interface is `compactfusion.handle.HandleBase`'s (`config`, `group`, `state`, `step`,
    `errors`, `stats`, `requests`, `rank`, `world_size`, `watch`, `reset`, `state_nbytes`,
    `remove`); `errors` rows hold step, layer, key, source, kind, branch, variant, raw,
    comp_err, deviation, norm. Also `spec`, `heads`, `head_dim` and
    `projected_state_nbytes(batch, tokens)`.
    """

    def __init__(self, transformer: torch.nn.Module, config: CompactConfig, group: Any, spec: ModelSpec,
                 names: list[str], heads: int, head_dim: int, stats: CommStats | None) -> None:
        super().__init__(config, group, CompactState(config, group, stats=stats, num_layers=len(names)))
        self.spec = spec
        self.heads, self.head_dim = heads, head_dim
        self._model = transformer
        self._names = names
        self._saved: dict[str, Any] = {}
        self._input_sig: tuple | None = None
        self._text_len = 0
        self._sig = inspect.signature(transformer.forward)

    def _drop(self) -> None:
        super()._drop()
        self._input_sig = None

    def _uninstall(self) -> None:
        set_attn_processors(self._model, self._saved)
        if getattr(self._model, _MARK, None) is self:
            delattr(self._model, _MARK)

    def __repr__(self) -> str:
        return (f"Handle({type(self._model).__name__}, mode={self.config.mode!r}, codec={self.config.codec!r}, "
                f"P={self.state.world}, removed={self._removed})")

    # -- internals --------------------------------------------------------------------------
    def _install(self) -> None:
        m = self._model
        self._saved = attn_processors(m)
        mapping: dict[str, Any] = dict(self._saved)
        for layer, name in enumerate(self._names):
            if self.spec.text == "joint":
                mapping[name] = CompactFluxAttnProcessor(self.state, layer, self.config.mode, lambda: self._text_len)
            else:
                mapping[name] = CompactAttnProcessor(self.state, layer, self.config.mode)
        set_attn_processors(m, mapping)
        try:
            self._hooks.append(m.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._hooks.append(m.register_forward_hook(self._post_hook))
            if self.state.world > 1:
                self._hooks.append(m.get_submodule(self.spec.split).register_forward_hook(self._split_hook))
                self._hooks.append(m.get_submodule(self.spec.gather).register_forward_hook(self._gather_hook))
                if self.spec.rope:
                    self._hooks.append(m.get_submodule(self.spec.rope).register_forward_hook(self._rope_hook))
        except BaseException:
            self.remove()
            raise
        setattr(m, _MARK, self)

    def _tokens(self, hidden: torch.Tensor) -> tuple[int, str]:
        if self.spec.tokens == "patch":
            p = int(self._model.config.patch_size)
            return (hidden.shape[-2] // p) * (hidden.shape[-1] // p), f"patch size {p}, input {tuple(hidden.shape[-2:])}"
        return int(hidden.shape[1]), "packed tokens"

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._alive()
        self._guard_autograd(module, args, kwargs)
        bound = self._sig.bind_partial(*args, **kwargs).arguments
        hidden = bound.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise ValueError("hidden_states: compactfusion needs the input tensor")
        st, cfg = self.state, self.config
        n_tokens, how = self._tokens(hidden)
        if n_tokens % st.world:
            raise ValueError(f"S={n_tokens} image tokens ({how}) is not divisible by P={st.world} ranks")
        if self.spec.text == "joint":
            enc = bound.get("encoder_hidden_states")
            self._text_len = 0 if enc is None else int(enc.shape[1])
        self._request_boundary(timestep_value(bound.get("timestep")))
        sig = (tuple(hidden.shape), hidden.dtype, hidden.device.type, self._text_len)
        if self._input_sig is not None and sig != self._input_sig and st.calls > 0:
            if cfg.on_shape_change == "raise":
                raise CompactStateError(f"input changed from {self._input_sig[:3]} to {sig[:3]} at step {st.step}; "
                                        "call handle.reset() between requests")
            logger.info("compactfusion: input shape changed, resetting state (on_shape_change='reset')")
            self._drop()
            self._requests.shape_reset()
        self._input_sig = sig
        if st.calls == 0 and cfg.max_state_mb is not None:
            self._check_memory(hidden.shape[0], n_tokens)
        st.begin_forward()

    def projected_state_nbytes(self, batch: int, tokens: int) -> int:
        """M = 2 * L_c * B_eff * S * C * b_wire (docs/design/compactfusion.md#memory) for one request of this shape."""
        cfg = self.config
        if not cfg.compressed and cfg.mode != "distrifusion":
            return 0
        n_layers = len(self._names) if cfg.layers is None else len([x for x in cfg.layers if x < len(self._names)])
        wire = cfg.wire(self._model.dtype)
        b = torch.empty((), dtype=wire).element_size()
        return 2 * n_layers * batch * cfg.calls_per_step * tokens * self.heads * self.head_dim * b

    def _check_memory(self, batch: int, tokens: int) -> None:
        need = self.projected_state_nbytes(batch, tokens)
        allowed = float(self.config.max_state_mb) * 2**20  # type: ignore[arg-type]
        if need > allowed:
            raise ValueError(
                f"max_state_mb={self.config.max_state_mb}: the bases need {need / 2**20:.2f} MB per rank "
                f"(> {allowed / 2**20:.2f} MB allowed); remedies: wire_dtype='fp16', fewer compressed layers "
                "(layers=...), a smaller batch, or a larger max_state_mb"
            )

    def _post_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._after_forward()

    def _split_hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        n = output.shape[1] // self.state.world
        r = self.state.rank
        return output[:, r * n:(r + 1) * n]

    def _rope_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        nt, world, r = self._text_len, self.state.world, self.state.rank

        def cut(t: torch.Tensor) -> torch.Tensor:
            n = (t.shape[0] - nt) // world
            return torch.cat([t[:nt], t[nt + r * n: nt + (r + 1) * n]])

        return tuple(cut(t) for t in output) if isinstance(output, (tuple, list)) else cut(output)

    def _gather_hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        flat = output.contiguous().reshape(-1)
        # check=False: the layers' K/V exchanges of this forward checked the layout already.
        got = allgather_payloads(Payload(flat, PayloadMeta(flat.shape, flat.dtype)), self.group, same_size=True,
                                 key="token_gather", stats=self.state.stats, check=False)
        return torch.cat([p.buffer.view(output.shape) for p in got], dim=1)  # type: ignore[union-attr]


def parallelize(transformer: Any, config: CompactConfig, group: Any = None, *,
                stats: CommStats | None = None) -> Handle:
    """Parallelize `transformer` over `group` (default: WORLD) with CompactFusion; see module docstring.

    `transformer` may also be a diffusers pipeline (an object with a `.transformer` module and a
    `.scheduler`): its transformer is parallelized and its scheduler watched for request
    boundaries (`compactfusion.requests`), which is right for every scheduler.
    """
    pipe = None
    if not isinstance(transformer, torch.nn.Module) and isinstance(getattr(transformer, "transformer", None), torch.nn.Module):
        pipe, transformer = transformer, transformer.transformer
    if not isinstance(config, CompactConfig):
        raise ValueError(f"config: expected a CompactConfig, got {type(config).__name__}")
    cls = type(transformer).__name__
    spec = MODEL_SPECS.get(cls)
    if spec is None:
        raise ValueError(f"transformer: {cls} is not supported; supported classes: {', '.join(MODEL_SPECS)}")
    if getattr(transformer, _MARK, None) is not None:
        raise ValueError("transformer: already parallelized; call handle.remove() first")
    if not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call init_process_group first)")
    pat = re.compile(spec.attn_pattern)
    names = [n for n in attn_processors(transformer) if pat.fullmatch(n)]
    if not names:
        raise ValueError(f"transformer: no self-attention layers matching {spec.attn_pattern!r}")
    mods = [transformer.get_submodule(n.rsplit(".", 1)[0]) for n in names]
    if any(getattr(a, "fused_projections", False) for a in mods):
        raise ValueError("transformer: fused QKV projections are not supported; call unfuse_qkv_projections()")
    heads = int(mods[0].heads)
    head_dim = int(getattr(mods[0], "head_dim", 0) or mods[0].inner_dim // heads)
    if config.layers is not None and max(config.layers, default=-1) >= len(names):
        raise ValueError(f"layers={config.layers}: indices must be in [0, {len(names)})")
    world = dist.get_world_size(group)
    agree({**config_fields(config), "model class": cls, "layers": len(names), "heads": heads,
           "head_dim": head_dim, "world size": world, "ccomm version": _ccomm_version()}, group)
    handle = Handle(transformer, config, group, spec, names, heads, head_dim, stats)
    handle._install()
    if pipe is not None and getattr(pipe, "scheduler", None) is not None:
        handle.watch(pipe)
    logger.info("compactfusion: %s on %d ranks, %d layers, mode=%s codec=%s", cls, world, len(names), config.mode,
                config.codec)
    return handle
