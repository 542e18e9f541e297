"""Wan adapter: ``SubjectSparseAttnProcessor`` for Diffusers' ``WanAttention`` (self- and cross-attention).

Only the Wan-specific part lives here (q/k/v projections, across-heads RMSNorm, interleaved rotary embedding);
routing is :mod:`.core`. With no active subjects the processor runs the stock ``WanAttnProcessor`` code path
itself, so outputs are identical to stock Wan.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .._diffusers_compat import context_parallel_config, private
from .core import (
    RoutedAttnProcessorBase,
    SubjectRoutingState,
    local_heads,
    routed_cross_attention,
    routed_self_attention,
    set_subject_sparse_attn_processor,
)
from .parallel import (
    context_parallel_attention,
    context_parallel_routed_cross_attention,
    context_parallel_routed_self_attention,
    needs_own_ring,
)

# Resolved once here, not per call: a call through the compat module's import machinery would break torch.compile graphs.
_get_qkv_projections = private("get_qkv_projections")


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved rotary (pairs (0,1), (2,3), ...), as in diffusers' WanAttnProcessor.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class SubjectSparseAttnProcessor(RoutedAttnProcessorBase, WanAttnProcessor):
    r"""Subject-sparse attention for Wan (``WanAttention``), a drop-in for ``WanAttnProcessor``.

    Without a state, or while the state has no subjects, it is the stock processor (same outputs). With subjects
    active (see :class:`~diasr_diffusers.processors.SubjectRoutingState`), self-attention over
    ``[video | ref_0 | ... | ref_{N-1}]`` routes each video token to one subject's references (or none), and
    text cross-attention optionally routes it to that subject's phrase.

    Args:
        state: the routing state shared by all layers; ``None`` = always stock.
        layer_idx: the transformer block this instance serves (needed for per-layer ``IDRouter`` routing; set by
            :func:`set_subject_sparse_attn_processor`).

    Example:
        ```py
        >>> from diasr_diffusers import SubjectSparseAttnProcessor, set_subject_sparse_attn_processor
        >>> pipe.transformer.set_attn_processor(SubjectSparseAttnProcessor())  # same frames as stock Wan
        >>> state = set_subject_sparse_attn_processor(pipe.transformer)  # per-layer, sharing one state
        >>> with state.activate(ref_lengths=[1560, 1560], mode="similarity"):
        ...     noise_pred = pipe.transformer(torch.cat([latents, ref_latents], dim=2), t, prompt_embeds)[0]
        ```
    """

    supports_context_parallel = True  # Ulysses, ring, ring x Ulysses: `processors/parallel.py`

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        state = self.routes(attention_mask)
        if state is None:
            cp = context_parallel_config(self._parallel_config)
            if attn.is_cross_attention or attention_mask is not None or not needs_own_ring(self._attention_backend, cp):
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
            return self._ring_self_attention(attn, hidden_states, rotary_emb, cp)
        if attn.is_cross_attention:
            return self._cross_attention(attn, hidden_states, encoder_hidden_states, state)
        return self._self_attention(attn, hidden_states, rotary_emb, state)

    def _project(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        heads = local_heads(attn, query)
        return (t.unflatten(2, (heads, -1)) for t in (query, key, value))

    def _ring_self_attention(self, attn, hidden_states, rotary_emb, cp) -> torch.Tensor:
        # Unrouted self-attention under ring attention, where Diffusers' backend cannot ring (`needs_own_ring`).
        query, key, value = self._project(attn, hidden_states, None)
        if rotary_emb is not None:
            query, key = _apply_rotary(query, *rotary_emb), _apply_rotary(key, *rotary_emb)
        backend = self.state.op_backend if self.state is not None else "auto"
        out = context_parallel_attention(query, key, value, cp, backend)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))

    def _self_attention(self, attn, hidden_states, rotary_emb, state: SubjectRoutingState) -> torch.Tensor:
        query, key, value = self._project(attn, hidden_states, None)
        cp = context_parallel_config(self._parallel_config)
        if cp is not None:
            rotate = (lambda x: _apply_rotary(x, *rotary_emb)) if rotary_emb is not None else None
            out = context_parallel_routed_self_attention(
                state, self.layer_idx, hidden_states, query, key, value, rotate, cp
            )
            return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))
        buckets, bias = self.route(attn, state, hidden_states, query, key)
        if rotary_emb is not None:
            query, key = _apply_rotary(query, *rotary_emb), _apply_rotary(key, *rotary_emb)
        out = routed_self_attention(query, key, value, state, buckets, bias)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _cross_attention(self, attn, hidden_states, encoder_hidden_states, state: SubjectRoutingState) -> torch.Tensor:
        if state.text_segments is None or state.current_buckets is None or attn.add_k_proj is not None:
            # No text routing requested (or an I2V image branch we do not route): stock cross-attention.
            return super().__call__(attn, hidden_states, encoder_hidden_states, None, None)
        query, key, value = self._project(attn, hidden_states, encoder_hidden_states)
        cp = context_parallel_config(self._parallel_config)
        if cp is not None:
            out = context_parallel_routed_cross_attention(state, query, key, value, cp)
        else:
            out = routed_cross_attention(query, key, value, state, state.current_buckets)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def set_wan_subject_sparse_attn_processor(
    transformer: Any, state: SubjectRoutingState | None = None
) -> SubjectRoutingState:
    """:func:`~diasr_diffusers.processors.set_subject_sparse_attn_processor` for a ``WanTransformer3DModel`` only
    (another family's transformer is refused). Returns the shared state."""
    return set_subject_sparse_attn_processor(transformer, state, family="wan")


__all__ = ["SubjectSparseAttnProcessor", "set_subject_sparse_attn_processor", "set_wan_subject_sparse_attn_processor"]
