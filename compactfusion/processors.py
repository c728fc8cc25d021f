"""diffusers attention processors that exchange K/V between ranks.

`CompactAttnProcessor` mirrors diffusers' `AttnProcessor2_0` (diffusers 0.42.1) for the
self-attention (`attn1`) of DiT and PixArt blocks, replacing only the attention call:
1. project q, k, v from the local tokens, split heads into (B, S_loc, H, D), apply
   `norm_q`/`norm_k` (per head_dim, so the layout does not matter);
2. `compactfusion.attention.parallel_attention(mode, ...)` with this layer's index;
3. merge heads, cast to q's dtype, `to_out[0]`, `to_out[1]`, residual connection and
   `rescale_output_factor` exactly as the stock processor.
Features the parallel path cannot honour (self-attention masks, spatial/group norm,
cross-attention inputs, 4-D inputs) raise `NotImplementedError`.

`CompactFluxAttnProcessor` mirrors `FluxAttnProcessor`: image tokens are local, text
tokens (double-stream `encoder_hidden_states`, or the first `state.text_len` rows of a
single-stream block's input) are replicated and join block 0 as joint K/V.
"""
from __future__ import annotations

from typing import Any

import torch

from .attention import parallel_attention
from .state import CompactState

__all__ = ["CompactAttnProcessor", "CompactFluxAttnProcessor"]


class CompactAttnProcessor:
    """Self-attention processor for DiT/PixArt `attn1` running a CompactFusion mode."""

    def __init__(self, state: CompactState, layer: int, mode: str) -> None:
        self.state = state
        self.layer = layer
        self.mode = mode

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("compactfusion: self-attention masks are not supported")
        if encoder_hidden_states is not None:
            raise NotImplementedError("compactfusion: only self-attention processors can be parallelized")
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("compactfusion: spatial_norm / group_norm attention is not supported")
        if hidden_states.ndim != 3:
            raise NotImplementedError(f"compactfusion: expected (batch, tokens, channels) input, got {hidden_states.ndim}-D")
        residual = hidden_states
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim)
        key = key.view(batch, -1, attn.heads, head_dim)
        value = value.view(batch, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # SDPA's default scale (the stock processor ignores attn.scale too).
        out = parallel_attention(self.mode, query, key, value, state=self.state, layer=self.layer,
                                 branch=self.state.branch, scale=head_dim**-0.5)
        out = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class CompactFluxAttnProcessor:
    """Flux double- and single-stream attention running a CompactFusion mode on image tokens."""

    def __init__(self, state: CompactState, layer: int, mode: str, text_len: Any) -> None:
        self.state = state
        self.layer = layer
        self.mode = mode
        self._text_len = text_len  # callable returning the text length of the current forward

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise NotImplementedError("compactfusion: attention masks are not supported")
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("compactfusion: fused QKV projections are not supported")
        query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if double:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
            n_txt = encoder_hidden_states.shape[1]
        else:
            n_txt = int(self._text_len())
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        jk, k_img = key[:, :n_txt], key[:, n_txt:]
        jv, v_img = value[:, :n_txt], value[:, n_txt:]
        # All queries (replicated text + local image) attend to the replicated text K/V
        # (front of block 0) and to every rank's image K/V through the mode's exchange.
        out = parallel_attention(self.mode, query, k_img, v_img, joint_k=jk, joint_v=jv, state=self.state,
                                 layer=self.layer, branch=self.state.branch, scale=attn.head_dim**-0.5)
        out = out.flatten(2, 3).to(query.dtype)
        if double:
            enc, img = out[:, :n_txt], out[:, n_txt:]
            img = attn.to_out[0](img.contiguous())
            img = attn.to_out[1](img)
            enc = attn.to_add_out(enc.contiguous())
            return img, enc
        return out

