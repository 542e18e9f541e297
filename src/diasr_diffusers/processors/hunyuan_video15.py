"""HunyuanVideo-1.5 adapter: ``HunyuanVideo15SubjectSparseAttnProcessor`` for the dual-stream joint
``[video | text]`` attention of Diffusers' ``HunyuanVideo15Transformer3DModel``.

With reference frames appended after the video, each block attends over ``[video | refs | text]``, the text being
padded (the transformer passes its padding mask to every block). Only the HunyuanVideo-specific part lives here
(separate q/k/v projections and RMSNorms for the visual and text streams, rotary embedding on the visual tokens,
the two output projections); routing is :func:`~diasr_diffusers.processors.core.routed_joint_attention` with the
padding mask as ``text_mask``. Without active subjects it is the stock ``HunyuanVideo15AttnProcessor2_0``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from .core import (
    RoutedAttnProcessorBase,
    SubjectRoutingState,
    local_heads,
    routed_joint_attention,
    set_subject_sparse_attn_processor,
    video_token_count,
)


class HunyuanVideo15SubjectSparseAttnProcessor(RoutedAttnProcessorBase, HunyuanVideo15AttnProcessor2_0):
    r"""Subject-sparse attention for HunyuanVideo-1.5's dual-stream blocks, a drop-in for
    ``HunyuanVideo15AttnProcessor2_0`` (who sees what: :func:`~diasr_diffusers.processors.core.routed_joint_attention`).

    Example:
        ```py
        >>> from diasr_diffusers.processors import set_hunyuan_video15_subject_sparse_attn_processor
        >>> state = set_hunyuan_video15_subject_sparse_attn_processor(pipe.transformer)  # same outputs as stock
        >>> # hidden (B, C, F, h, w) with K reference frames appended on dim 2; patch 1: h * w tokens per frame
        >>> with state.activate(ref_lengths=[h * w] * K, mode="similarity"):
        ...     pred = pipe.transformer(torch.cat([latents, ref_latents], dim=2), t, **text_inputs)[0]
        ```
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The mask is the text padding mask, always given: it is handled below, not a reason to run stock.
        state = self.routes()
        if state is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        lv = video_token_count(state, hidden_states.shape[1])
        query, key, value = (p(hidden_states) for p in (attn.to_q, attn.to_k, attn.to_v))
        heads = local_heads(attn, query)
        query, key, value = (t.unflatten(2, (heads, -1)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        buckets, bias = self.route(attn, state, hidden_states, query, key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text = [
            p(encoder_hidden_states).unflatten(2, (heads, -1))
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        ]
        if attn.norm_added_q is not None:
            text[0] = attn.norm_added_q(text[0])
        if attn.norm_added_k is not None:
            text[1] = attn.norm_added_k(text[1])
        video = (query[:, :lv], key[:, :lv], value[:, :lv])
        refs = (query[:, lv:], key[:, lv:], value[:, lv:])
        text_mask = None if attention_mask is None else attention_mask.bool()
        text_out, video_out, ref_out = routed_joint_attention(state, buckets, text, video, refs, bias, text_mask)
        visual = torch.cat([video_out, ref_out], dim=1).flatten(2, 3).type_as(query)
        visual = attn.to_out[1](attn.to_out[0](visual))
        return visual, attn.to_add_out(text_out.flatten(2, 3).type_as(query))


def set_hunyuan_video15_subject_sparse_attn_processor(
    transformer: Any, state: SubjectRoutingState | None = None
) -> SubjectRoutingState:
    """:func:`~diasr_diffusers.processors.set_subject_sparse_attn_processor` for a
    ``HunyuanVideo15Transformer3DModel`` only: every dual-stream block (its text refiner keeps its own processors).
    Returns the shared state."""
    return set_subject_sparse_attn_processor(transformer, state, family="hunyuan_video15")
