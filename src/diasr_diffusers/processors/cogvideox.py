"""CogVideoX adapter: ``CogVideoXSubjectSparseAttnProcessor`` for the joint ``[text | video]`` attention of
Diffusers' ``CogVideoXTransformer3DModel``.

Reference images enter as clean latent frames after the video, so the transformer's ``hidden_states`` are
``[video | ref_0 | ... | ref_{N-1}]`` and one attention runs over ``[text | video | refs]``. Only the
CogVideoX-specific part lives here (one q/k/v projection over the joint sequence, per-head LayerNorm, rotary
embedding on the visual tokens only, output split back into visual and text streams); routing is
:func:`~diasr_diffusers.processors.core.routed_joint_attention`. With no active subjects the processor runs the
stock ``CogVideoXAttnProcessor2_0`` code itself, so outputs are identical to stock CogVideoX.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from .core import (
    RoutedAttnProcessorBase,
    SubjectRoutingState,
    local_heads,
    routed_joint_attention,
    set_subject_sparse_attn_processor,
    video_token_count,
)


class CogVideoXSubjectSparseAttnProcessor(RoutedAttnProcessorBase, CogVideoXAttnProcessor2_0):
    r"""Subject-sparse attention for CogVideoX, a drop-in for ``CogVideoXAttnProcessor2_0``.

    Without a state, or while the state has no subjects (or ``mode="dense"``), it is the stock processor over the
    whole joint sequence (same outputs). With subjects active, each video token is routed to one subject (or none)
    and sees all text (or, with text routing, the general text plus its subject's phrase), all video and its
    subject's references; text tokens see text and video only; reference tokens see their own subject's references
    and text (see :func:`~diasr_diffusers.processors.core.routed_joint_attention`).

    Args:
        state: the routing state shared by all layers; ``None`` = always stock.
        layer_idx: the transformer block this instance serves (set by
            :func:`set_cogvideox_subject_sparse_attn_processor`).

    Example:
        ```py
        >>> from diffusers import CogVideoXPipeline
        >>> from diasr_diffusers.processors import set_cogvideox_subject_sparse_attn_processor

        >>> pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b")
        >>> state = set_cogvideox_subject_sparse_attn_processor(pipe.transformer)  # same frames as stock
        >>> # latents (B, F, C, h, w), reference latents (B, K, C, h, w): one clean frame per image, after the video
        >>> with state.activate(ref_lengths=[1350, 1350], mode="similarity"):
        ...     v_pred = pipe.transformer(torch.cat([latents, ref_latents], dim=1), prompt_embeds, t,
        ...                               image_rotary_emb=rotary_for_F_plus_K_frames)[0]
        ```
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.routes(attention_mask)
        if state is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        lt = encoder_hidden_states.shape[1]
        lv = video_token_count(state, hidden_states.shape[1])
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (proj(joint) for proj in (attn.to_q, attn.to_k, attn.to_v))
        heads = local_heads(attn, query)
        query, key, value = (t.unflatten(2, (heads, -1)) for t in (query, key, value))
        if attn.norm_q is not None:  # LayerNorm over the head dim: the (B, L, H, D) layout does not change it
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        buckets, bias = self.route(attn, state, hidden_states, query[:, lt:], key[:, lt:])
        if image_rotary_emb is not None:  # CogVideoX rotates the visual tokens only
            query = torch.cat([query[:, :lt], apply_rotary_emb(query[:, lt:], image_rotary_emb, sequence_dim=1)], 1)
            key = torch.cat([key[:, :lt], apply_rotary_emb(key[:, lt:], image_rotary_emb, sequence_dim=1)], 1)
        parts = [(t[:, :lt], t[:, lt : lt + lv], t[:, lt + lv :]) for t in (query, key, value)]
        text_out, video_out, ref_out = routed_joint_attention(state, buckets, *zip(*parts), segment_bias=bias)
        out = torch.cat([text_out, video_out, ref_out], dim=1).flatten(2, 3).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, lt:], out[:, :lt]


def set_cogvideox_subject_sparse_attn_processor(
    transformer: Any, state: SubjectRoutingState | None = None
) -> SubjectRoutingState:
    """:func:`~diasr_diffusers.processors.set_subject_sparse_attn_processor` for a ``CogVideoXTransformer3DModel``
    only (another family's transformer is refused). Returns the shared state."""
    return set_subject_sparse_attn_processor(transformer, state, family="cogvideox")
