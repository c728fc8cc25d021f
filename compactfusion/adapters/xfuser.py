"""CompactFusion's compressed ring inside an xDiT (`xfuser`) pipeline.

`patch(pipe, config)` replaces xfuser's ring-attention call by CompactFusion's ring
(`compactfusion.attention.ring_attention`, docs/design/compactfusion.md#parallel-modes): each ring rank encodes its own K/V once per
layer and step against the mirrored base, the payloads travel P-1 hops unchanged, every
rank attends to its exact own K/V and to the reconstructions of the others. Everything else
in the xfuser pipeline (sequence split, gather, CFG, scheduler, VAE) stays xfuser's.
`cpu_env_patch()` (`compactfusion.adapters.xfuser_cpu`, re-exported here) makes xfuser
importable, and its ring mode usable, on a host without an accelerator.

What xfuser 0.7.0 does that this adapter depends on (its seams, its CPU failures, the tiny
in-memory pipeline of the tests) is written down in docs/compactfusion.md#xfuser-070-findings; the handle's interface and hooks are `compactfusion.handle`'s,
shared with `parallelize`.

Algorithm of `patch(pipe, config, seam="auto")`:
1. Refuse what the compressed ring cannot serve: `config.mode != "ring"`, PipeFusion degree
   > 1 (its KV cache manager), ring degree 1, an uninitialized xfuser runtime.
2. Pick the seam (`auto`: `usp` if `usp.ring_attn` exists, else `long_ctx`) and check the
   replaced function's parameters with `inspect.signature`; a mismatch raises
   `XfuserVersionError` naming the installed xfuser version.
3. Agree on the config's fields, seam, xfuser version and ring size over the ring group.
4. Build a `CompactState` on the ring group; install a pre-hook and a post-hook on the
   pipeline's transformer (`HandleBase`'s autograd guard, request boundaries and
   `check_every`; step and branch via `CompactState.begin_forward`; a per-forward layer
   counter and a constant layer count), then swap the seam for our function.
5. Each ring call gets layer = position in the forward, and runs `ring_attention` on the
   ring group; joint K/V (either strategy) join the local front block (attention is
   order-invariant over keys, so "rear" gives the same result up to rounding).
6. `handle.remove()` restores every attribute it replaced, removes the hooks and closes
   the state; idempotent.

In hybrid USP only the ring part is compressed (Ulysses' all-to-all stays xfuser's), as in
the CompactFusion repository. Not covered: PipeFusion, attention masks, dropout, causal
attention; the long_ctx seam is tested on CPU only with a stand-in for xfuser's ring
function (its module does not import without CUDA).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ccomm.stats import CommStats

from ..config import CompactConfig
from ..handle import HandleBase, agree, config_fields
from ..requests import timestep_value
from .xfuser_cpu import _has_accelerator, cpu_env_patch, xfuser_version

__all__ = [
    "cpu_env_patch",
    "patch",
    "XfuserHandle",
    "XfuserVersionError",
    "SEAMS",
    "USP_RING_PARAMS",
    "LONG_CTX_RING_PARAMS",
    "xfuser_version",
]

logger = logging.getLogger(__name__)

SEAMS = ("auto", "usp", "long_ctx")
#: Parameters of xfuser 0.7.0's `model_executor.layers.usp.ring_attn`.
USP_RING_PARAMS = (
    "attention_function", "query", "key", "value", "dropout_p", "is_causal",
    "joint_attn_kwargs", "attention_kwargs",
)
#: Parameters of xfuser 0.7.0's `xdit_ring_flash_attn_func` (`xFuserLongContextAttention.ring_attn_fn`).
LONG_CTX_RING_PARAMS = (
    "q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "alibi_slopes",
    "deterministic", "return_attn_probs", "group", "attn_type", "attn_processor", "attn_layer",
    "joint_tensor_key", "joint_tensor_value", "joint_strategy", "q_descale", "k_descale", "v_descale",
)
_SEAM_MARK = "_compactfusion_handle"


class XfuserVersionError(RuntimeError):
    """The installed xfuser's ring seam does not have the signature this adapter was written for."""


# -- seam checks -----------------------------------------------------------------------------
def _param_names(fn: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _check_signature(fn: Callable[..., Any], expected: tuple[str, ...], where: str) -> None:
    got = _param_names(fn)
    if got != expected:
        raise XfuserVersionError(
            f"xfuser {xfuser_version()}: {where} has parameters {got}, this adapter was written for "
            f"xfuser 0.7.0's {expected}; pin xfuser==0.7.0 (the xdit extra) or update the adapter"
        )


def _refuse_attention_kwargs(attention_kwargs: Optional[dict]) -> None:
    used = sorted(k for k, v in (attention_kwargs or {}).items() if v is not None)
    if used:
        raise NotImplementedError(f"compressed ring: attention_kwargs {used} (masks, varlen, fp8) are not supported")


# -- the handle ----------------------------------------------------------------------------
class XfuserHandle(HandleBase):
    """A patched xfuser pipeline, with `compactfusion.handle.HandleBase`'s interface.

    `reset()` between requests (automatic: the pipeline's scheduler is watched, see
    `compactfusion.requests`), `remove()` (idempotent, exact restore), `step`, `state_nbytes()`,
    `errors`, `stats` (this handle's CommStats, tag `kv_ring`), `requests` (request and reset
    counts), `watch(scheduler)`, `state`, `config`, `group` (xfuser's ring group), `rank`,
    `world_size`, plus `seam` and `layers_per_forward` (ring calls per transformer forward,
    known after one call).
    """

    def __init__(self, transformer: torch.nn.Module, config: CompactConfig, group: Any, seam: str,
                 ring_attention: Callable[..., torch.Tensor], state: Any) -> None:
        super().__init__(config, group, state)
        self.seam = seam
        self._transformer = transformer
        self._ring_attention = ring_attention
        self._restore: list[Callable[[], None]] = []
        self._layer = 0
        self._in_forward = False
        self.layers_per_forward: Optional[int] = None

    def _drop(self) -> None:
        super()._drop()
        self._layer = 0
        self._in_forward = False

    def _uninstall(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()

    def __repr__(self) -> str:
        return (f"XfuserHandle(seam={self.seam!r}, codec={self.config.codec!r}, P={self.state.world}, "
                f"removed={self._removed})")

    # -- installation ----------------------------------------------------------------------
    def _install_hooks(self) -> None:
        self._hooks.append(self._transformer.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._hooks.append(self._transformer.register_forward_hook(self._post_forward))

    def _set_attr(self, obj: Any, name: str, value: Any, *, instance_dict: bool = False) -> None:
        """Replace `obj.name`, remembering how to restore it exactly."""
        had = name in vars(obj) if instance_dict else hasattr(obj, name)
        old = vars(obj).get(name) if instance_dict else getattr(obj, name, None)

        def undo() -> None:
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

        setattr(obj, name, value)
        self._restore.append(undo)

    # -- hooks -------------------------------------------------------------------------------
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._alive()
        self._guard_autograd(module, args, kwargs)
        self._request_boundary(timestep_value(kwargs.get("timestep", args[2] if len(args) > 2 else None)))
        self.state.begin_forward()
        self._layer = 0
        self._in_forward = True

    def _post_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._in_forward = False
        n = self._layer
        if self.layers_per_forward is None:
            self.layers_per_forward = n
            if self.config.layers is not None and any(x >= n for x in self.config.layers):
                raise ValueError(f"layers={self.config.layers}: the model makes {n} ring calls per forward (allowed 0..{n - 1})")
        elif n != self.layers_per_forward:
            raise RuntimeError(f"ring calls per forward changed from {self.layers_per_forward} to {n}; "
                               "layer indices would no longer match between steps")
        self._after_forward()

    # -- the ring call -----------------------------------------------------------------------
    def _ring(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, joint_k: Optional[torch.Tensor],
              joint_v: Optional[torch.Tensor], scale: Optional[float]) -> torch.Tensor:
        """Run the compressed ring on (B, S, H, D) tensors; returns (B, S_q, H, D)."""
        self._alive()
        if not self._in_forward:
            raise RuntimeError("compressed ring called outside the patched transformer's forward "
                               "(layer and step are counted per transformer call)")
        layer = self._layer
        self._layer += 1
        return self._ring_attention(q, k, v, state=self.state, layer=layer, branch=self.state.branch,
                                    group=self.group, joint_k=joint_k, joint_v=joint_v, scale=scale)

    def _usp_ring_attn(self) -> Callable[..., torch.Tensor]:
        handle = self

        def ring_attn(attention_function, query, key, value, dropout_p=0.0, is_causal=False,
                      joint_attn_kwargs=None, attention_kwargs=None):
            """CompactFusion's compressed ring in place of xfuser's `usp.ring_attn` (B, H, S, D)."""
            if dropout_p or is_causal:
                raise NotImplementedError("compressed ring: dropout and causal attention are not supported")
            _refuse_attention_kwargs(attention_kwargs)
            jk = jv = None
            if joint_attn_kwargs is not None:
                strategy = joint_attn_kwargs.get("joint_strategy")
                if strategy not in ("front", "rear"):
                    raise ValueError(f"joint_strategy={strategy!r}: allowed values are front, rear")
                jk = joint_attn_kwargs["joint_key"].transpose(1, 2)
                jv = joint_attn_kwargs["joint_value"].transpose(1, 2)
            out = handle._ring(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), jk, jv, None)
            return out.transpose(1, 2)

        setattr(ring_attn, _SEAM_MARK, self)
        return ring_attn

    def _long_ctx_ring_fn(self) -> Callable[..., torch.Tensor]:
        handle = self

        def ring_attn_fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                         alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                         attn_type=None, attn_processor=None, attn_layer=None, joint_tensor_key=None,
                         joint_tensor_value=None, joint_strategy="none", q_descale=None, k_descale=None,
                         v_descale=None):
            """CompactFusion's compressed ring in place of `xFuserLongContextAttention.ring_attn_fn` (B, S, H, D)."""
            if dropout_p or causal or tuple(window_size) != (-1, -1) or alibi_slopes is not None:
                raise NotImplementedError("compressed ring: dropout, causal, windowed and ALiBi attention are not supported")
            if return_attn_probs or attn_processor is not None or any(d is not None for d in (q_descale, k_descale, v_descale)):
                raise NotImplementedError("compressed ring: attention probabilities, custom processors and fp8 descales are not supported")
            if group is not None and group != handle.group:
                raise ValueError("ring_attn_fn called on a group other than xfuser's ring group the handle was built for")
            jk = jv = None
            if joint_tensor_key is not None:
                if joint_strategy not in ("front", "rear"):
                    raise ValueError(f"joint_strategy={joint_strategy!r}: allowed values are front, rear")
                jk, jv = joint_tensor_key, joint_tensor_value
            return handle._ring(q, k, v, jk, jv, softmax_scale)

        setattr(ring_attn_fn, _SEAM_MARK, self)
        return ring_attn_fn


# -- 3. patch() ----------------------------------------------------------------------------------
def _pipeline_transformer(pipe: Any) -> torch.nn.Module:
    tr = getattr(pipe, "transformer", None)
    if isinstance(tr, torch.nn.Module):
        return tr
    if getattr(pipe, "unet", None) is not None:
        raise ValueError("UNet pipelines have no ring attention in xfuser; nothing to patch")
    if isinstance(pipe, torch.nn.Module):
        return pipe
    raise ValueError(f"{type(pipe).__name__}: expected an xFuser pipeline (or its transformer)")


def _long_ctx_instances(transformer: torch.nn.Module) -> list[Any]:
    """Every xFuserLongContextAttention reachable from the transformer's modules or their processors."""
    from xfuser.core.long_ctx_attention import xFuserLongContextAttention

    found: dict[int, Any] = {}
    for m in transformer.modules():
        candidates = [m, getattr(m, "processor", None)]
        proc = getattr(m, "processor", None)
        if proc is not None and not isinstance(proc, torch.nn.Module):
            candidates += list(vars(proc).values())
        for c in candidates:
            if isinstance(c, xFuserLongContextAttention):
                found[id(c)] = c
    return list(found.values())


def _default_core() -> tuple[Callable[..., torch.Tensor], type]:
    from ..attention import ring_attention
    from ..state import CompactState

    return ring_attention, CompactState


def patch(pipe: Any, config: CompactConfig, *, seam: str = "auto", stats: Optional[CommStats] = None) -> XfuserHandle:
    """Run CompactFusion's compressed ring inside an xFuser pipeline (see module docstring).

    `pipe`: an xFuser pipeline wrapper (e.g. `xFuserPixArtAlphaPipeline`), built, so that
    xfuser's runtime and groups exist, on every rank with identical arguments (a bare
    transformer module is accepted too). `stats`: a CommStats to count into (default: the
    handle's own, reset per request). Returns an `XfuserHandle`; `handle.remove()` restores
    xfuser's own ring.
    """
    if not isinstance(config, CompactConfig):
        raise ValueError(f"config: expected a CompactConfig, got {type(config).__name__}")
    if seam not in SEAMS:
        raise ValueError(f"seam={seam!r}: allowed values are {', '.join(SEAMS)}")
    if config.mode != "ring":
        raise ValueError(f"mode={config.mode!r}: the xfuser adapter replaces xfuser's ring attention; only mode='ring' is supported")
    from xfuser.core.distributed import parallel_state as ps
    from xfuser.model_executor.layers import usp

    if not ps.model_parallel_is_initialized():
        raise ValueError("xfuser's parallel groups are not initialized: build the xFuser pipeline first")
    if ps.get_pipeline_parallel_world_size() > 1:
        raise ValueError("PipeFusion degree > 1 is not supported (its KV cache manager reuses stale K/V; "
                         "CompactFusion's mirrored bases would diverge)")
    sp = ps.get_sp_group()
    group = getattr(sp, "ring_group", None)
    if group is None or sp.ring_world_size < 2:
        hint = " (on CPU call cpu_env_patch() before importing xfuser)" if not _has_accelerator() else ""
        raise ValueError(f"xfuser ring degree is {sp.ring_world_size}: nothing to compress{hint}")
    transformer = _pipeline_transformer(pipe)
    if seam == "auto":
        seam = "usp" if hasattr(usp, "ring_attn") else "long_ctx"
    targets: list[Any] = []
    if seam == "usp":
        if not hasattr(usp, "ring_attn"):
            raise XfuserVersionError(f"xfuser {xfuser_version()}: model_executor.layers.usp has no ring_attn; try seam='long_ctx'")
        if getattr(usp.ring_attn, _SEAM_MARK, None) is not None:
            raise ValueError("usp.ring_attn is already patched by another handle (it is process-wide); remove() that one first")
        _check_signature(usp.ring_attn, USP_RING_PARAMS, "usp.ring_attn")
        stray = _long_ctx_instances(transformer)
        if stray:
            logger.warning("seam='usp': %d xFuserLongContextAttention modules keep xfuser's own ring; use seam='long_ctx'", len(stray))
    else:
        targets = _long_ctx_instances(transformer)
        if not targets:
            raise ValueError("seam='long_ctx': the pipeline's transformer has no xFuserLongContextAttention")
        for t in targets:
            if getattr(t.ring_attn_fn, _SEAM_MARK, None) is not None:
                raise ValueError("seam='long_ctx': ring_attn_fn already patched; remove() the other handle first")
            _check_signature(t.ring_attn_fn, LONG_CTX_RING_PARAMS, f"{type(t).__name__}.ring_attn_fn")

    # Every ring rank must run the same configuration, or payload sizes would disagree.
    agree({**config_fields(config), "seam": seam, "xfuser version": xfuser_version(),
           "ring size": dist.get_world_size(group)}, group)

    ring_attention, state_cls = _default_core()
    handle = XfuserHandle(transformer, config, group, seam, ring_attention, state_cls(config, group, stats=stats))
    handle._install_hooks()
    if getattr(pipe, "scheduler", None) is not None:
        handle.watch(pipe)  # request boundaries from the pipeline's set_timesteps
    if seam == "usp":
        handle._set_attr(usp, "ring_attn", handle._usp_ring_attn())
    else:
        fn = handle._long_ctx_ring_fn()
        for t in targets:
            handle._set_attr(t, "ring_attn_fn", fn, instance_dict=True)
    logger.info("xfuser %s: compressed ring on seam %s, codec %s, ring size %d", xfuser_version(), seam,
                config.codec, dist.get_world_size(group))
    return handle
