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

from .core import SubjectRoutingState, route_video_tokens, routed_cross_attention, routed_self_attention


class LTXSubjectSparseAttnProcessor:
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

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: SubjectRoutingState | None = None, layer_idx: int | None = None):
        if state is not None and not isinstance(state, SubjectRoutingState):
            raise TypeError(f"`state` must be a SubjectRoutingState or None, got {type(state).__name__}")
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0):
            raise ValueError(f"`layer_idx` must be a block index >= 0 or None, got {layer_idx!r}")
        self.state = state
        self.layer_idx = layer_idx

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        state = self.state
        is_cross = encoder_hidden_states is not None
        unrouted_self = not is_cross and attention_mask is not None  # LTX never masks self-attention; be safe
        if state is None or not state.active or state.mode == "dense" or unrouted_self:
            return LTXVideoAttnProcessor.__call__(
                self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        if self._parallel_config is not None:
            raise NotImplementedError("subject-sparse attention does not support context parallelism yet")
        if is_cross:
            if state.text_segments is None or state.current_buckets is None:
                return LTXVideoAttnProcessor.__call__(
                    self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
                )
            query, key, value = self._project(attn, hidden_states, encoder_hidden_states)
            out = routed_cross_attention(*(t.unflatten(2, (attn.heads, -1)) for t in (query, key, value)), state,
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
        lv = hidden_states.shape[1] - sum(state.ref_lengths)
        if lv <= 0:
            raise ValueError(
                f"the sequence has {hidden_states.shape[1]} tokens but the state declares {sum(state.ref_lengths)} "
                "reference tokens"
            )
        heads = attn.heads
        buckets, bias = route_video_tokens(
            state, self.layer_idx, hidden_states[:, :lv], hidden_states[:, lv:],
            query[:, :lv].unflatten(2, (heads, -1)), key[:, lv:].unflatten(2, (heads, -1)),
        )  # fmt: skip
        state.current_buckets = buckets
        if image_rotary_emb is not None:  # LTX rotates the flattened heads (after the norm), as its processor does
            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (t.unflatten(2, (heads, -1)) for t in (query, key, value))
        return routed_self_attention(query, key, value, state, buckets, bias)


def set_ltx_subject_sparse_attn_processor(
    transformer: Any, state: SubjectRoutingState | None = None
) -> SubjectRoutingState:
    """Install one :class:`LTXSubjectSparseAttnProcessor` per attention module of an ``LTXVideoTransformer3DModel``,
    all sharing ``state`` (a new one if ``None``), each knowing its block index. Returns the state."""
    if state is not None and not isinstance(state, SubjectRoutingState):
        raise TypeError(f"`state` must be a SubjectRoutingState or None, got {type(state).__name__}")
    if not hasattr(transformer, "transformer_blocks") or not hasattr(transformer, "set_attn_processor"):
        raise TypeError(
            f"`transformer` must be a Diffusers LTXVideoTransformer3DModel (e.g. `pipe.transformer`), got "
            f"{type(transformer).__name__}"
        )
    state = state if state is not None else SubjectRoutingState()
    processors = {}
    for name, old in transformer.attn_processors.items():
        # Names look like "transformer_blocks.{i}.attn1.processor".
        parts = name.split(".")
        layer_idx = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        processor = LTXSubjectSparseAttnProcessor(state, layer_idx)
        backend = getattr(old, "_attention_backend", None)
        if backend is not None:
            processor._attention_backend = backend
        processors[name] = processor
    transformer.set_attn_processor(processors)
    return state
