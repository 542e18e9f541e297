"""Reference backend: an explicit ``(B, Lq, Lk)`` visibility mask + SDPA. Exact but O(Lq * Lk) memory: tests only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def key_segment_ids(lk: int, segment_lengths: list[int], device: torch.device) -> torch.Tensor:
    """``(Lk,)`` segment id of every key: ``-1`` for shared keys, ``s`` for keys of segment ``s``."""
    shared = lk - sum(segment_lengths)
    ids = [torch.full((shared,), -1, dtype=torch.long, device=device)]
    ids += [torch.full((n,), s, dtype=torch.long, device=device) for s, n in enumerate(segment_lengths)]
    return torch.cat(ids)


def dense_bucketed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_buckets: torch.Tensor,
    segment_lengths: list[int],
    *,
    scale: float,
    segment_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    seg = key_segment_ids(key.shape[1], segment_lengths, query.device)  # (Lk,)
    in_own_segment = (seg[None, None, :] == query_buckets[:, :, None]) & (query_buckets[:, :, None] >= 0)
    visible = (seg[None, None, :] == -1) | in_own_segment
    has_key = visible.any(dim=-1)  # (B, Lq)
    # Rows without any visible key would be NaN under SDPA; give them one dummy key and zero them afterwards.
    visible = visible | ~has_key[..., None]
    mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill(~visible, float("-inf"))
    if segment_bias is not None:
        mask = mask + in_own_segment.to(query.dtype) * segment_bias[..., None].to(query.dtype)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask[:, None], scale=scale
    ).transpose(1, 2)
    return torch.where(has_key[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
