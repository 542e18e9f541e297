"""LTX-Video adapter: ``LTXSubjectSparseAttnProcessor`` for Diffusers' ``LTXAttention`` (self- and cross-attention).

Only the LTX-specific part lives here (q/k/v projections, across-heads RMSNorm, LTX's rotary embedding applied to
the flattened heads); routing is :mod:`.core`. With no active subjects the processor runs the stock
``LTXVideoAttnProcessor`` code path itself, so outputs are identical to stock LTX-Video.

Sequence layout: LTX packs latents ``(B, C, F, H, W)`` into tokens frame-major; with references appended as extra
latent frames after the video, self-attention sees ``[video (Lv) | ref_0 | ... | ref_{N-1}]`` as :mod:`.core` assumes.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from .core import (
    RoutedAttnProcessorBase,
    SubjectRoutingState,
    local_heads,
    routed_cross_attention,
    routed_self_attention,
    set_subject_sparse_attn_processor,
)


class LTXSubjectSparseAttnProcessor(RoutedAttnProcessorBase, LTXVideoAttnProcessor):
    r"""Subject-sparse attention for LTX-Video (``LTXAttention``), a drop-in for ``LTXVideoAttnProcessor``.

    Without a state, or while the state has no subjects, it is the stock processor (same outputs). With subjects
    active, self-attention routes each video token to one subject's reference tokens (or none) and text
    cross-attention, when ``state.text_segments`` is set, to that subject's phrase. LTX masks padded prompt tokens;
    the routed cross-attention sees only the positions listed in ``TextSegments.order``, so whoever sets the state
    lists the valid (unpadded) positions only (:class:`~diasr_diffusers.pipelines.DiasRLTXPipeline` does).

    Args:
        state: the routing state shared by all layers; ``None`` = always stock.
        layer_idx: the transformer block this instance serves (set by :func:`set_ltx_subject_sparse_attn_processor`).

    Example:
        ```py
        >>> from diasr_diffusers.processors import set_ltx_subject_sparse_attn_processor
        >>> state = set_ltx_subject_sparse_attn_processor(pipe.transformer)
        >>> with state.activate(ref_lengths=[h * w, h * w], mode="similarity"):
        ...     noise_pred = pipe.transformer(packed_video_and_refs, prompt_embeds, timestep, prompt_mask,
        ...                                   num_frames=f + 2, height=h, width=w)[0]
        ```
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        # Cross-attention always carries LTX's prompt padding mask (routed text lists the valid positions only, see
        # above); a masked self-attention (LTX never makes one) stays stock.
        state = self.routes(None if is_cross else attention_mask)
        if state is None or (is_cross and (state.text_segments is None or state.current_buckets is None)):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if is_cross:
            query, key, value = self._project(attn, hidden_states, encoder_hidden_states)
            heads = local_heads(attn, query)
            out = routed_cross_attention(*(t.unflatten(2, (heads, -1)) for t in (query, key, value)), state,
                                         state.current_buckets)  # fmt: skip
        else:
            out = self._self_attention(attn, hidden_states, image_rotary_emb, state)
        out = out.flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))

    @staticmethod
    def _project(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        return attn.norm_q(query), attn.norm_k(key), value

    def _self_attention(self, attn, hidden_states, image_rotary_emb, state: SubjectRoutingState) -> torch.Tensor:
        query, key, value = self._project(attn, hidden_states, None)
        heads = local_heads(attn, query)
        buckets, bias = self.route(attn, state, hidden_states, query.unflatten(2, (heads, -1)),
                                   key.unflatten(2, (heads, -1)))  # fmt: skip
        if image_rotary_emb is not None:  # LTX rotates the flattened heads (after the norm), as its processor does
            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (t.unflatten(2, (heads, -1)) for t in (query, key, value))
        return routed_self_attention(query, key, value, state, buckets, bias)


def set_ltx_subject_sparse_attn_processor(
    transformer: Any, state: SubjectRoutingState | None = None
) -> SubjectRoutingState:
    """:func:`~diasr_diffusers.processors.set_subject_sparse_attn_processor` for an ``LTXVideoTransformer3DModel``
    only (another family's transformer is refused). Returns the shared state."""
    return set_subject_sparse_attn_processor(transformer, state, family="ltx")
