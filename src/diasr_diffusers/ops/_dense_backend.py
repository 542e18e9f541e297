"""Reference backend: the explicit ``(B, Lq, Lk)`` visibility mask defines what each query sees. Tests only.

Queries that see the same keys (one sample, one bucket) run through SDPA over exactly those keys. Masking the
invisible keys inside one joint SDPA instead would let a NaN/inf in one segment's keys or values reach every query
(``NaN + -inf`` is NaN, ``0 * NaN`` is NaN, in the forward and in the backward); gathering keeps it confined to the
queries that do see it, as in the sparse backends. Exact, but O(Lq * Lk) memory for the mask.

Under ``torch.compile`` (and with ``sync_free=True``, the op's trusted path) the gather (data-dependent group sizes,
read on the host) would break the graph, so that reference is one joint SDPA with the visibility as an additive mask:
the same answer for finite inputs, without the NaN confinement, and no host read.

With ``return_lse`` the log-sum-exp is computed explicitly from the logits (``logsumexp``), so it is differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import empty_lse, zeros_output


def key_segment_ids(lk: int, segment_lengths: list[int], device: torch.device) -> torch.Tensor:
    """``(Lk,)`` segment id of every key: ``-1`` for shared keys, ``s`` for keys of segment ``s``."""
    shared = lk - sum(segment_lengths)
    ids = [torch.full((shared,), -1, dtype=torch.long, device=device)]
    ids += [torch.full((n,), s, dtype=torch.long, device=device) for s, n in enumerate(segment_lengths)]
    return torch.cat(ids)


def visibility_mask(query_buckets: torch.Tensor, segment_lengths: list[int], lk: int) -> torch.Tensor:
    """``(B, Lq, Lk)`` bool: key ``j`` is visible to query ``i`` (shared, or in the segment of the query's bucket)."""
    seg = key_segment_ids(lk, segment_lengths, query_buckets.device)
    own = (seg[None, None, :] == query_buckets[:, :, None]) & (query_buckets[:, :, None] >= 0)
    return (seg[None, None, :] == -1) | own


def dense_bucketed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_buckets: torch.Tensor,
    segment_lengths: list[int],
    *,
    scale: float,
    segment_bias: torch.Tensor | None = None,
    return_lse: bool = False,
    sync_free: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    batch, lq, heads, dim = query.shape
    seg = key_segment_ids(key.shape[1], segment_lengths, query.device)
    visible = visibility_mask(query_buckets, segment_lengths, key.shape[1])
    if torch.compiler.is_compiling() or sync_free:
        out, lse = _masked_sdpa(query, key, value, query_buckets, seg, visible, scale, segment_bias, return_lse)
        return (out, lse) if return_lse else out
    rows, lses, index = [], [], []
    for b in range(batch):
        for s in range(-1, len(segment_lengths)):
            idx = (query_buckets[b] == s).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            cols = visible[b, idx[0]].nonzero().squeeze(1)  # the same for every query of this bucket
            if cols.numel() == 0:  # nothing visible: the row stays zero
                continue
            q = query[b].index_select(0, idx).transpose(0, 1)  # (H, n, D)
            k = key[b].index_select(0, cols).transpose(0, 1)  # (H, m, D)
            v = value[b].index_select(0, cols).transpose(0, 1)
            mask = None
            if segment_bias is not None:
                own = (seg.index_select(0, cols) == s) & (s >= 0)  # (m,)
                bias = segment_bias[b].index_select(0, idx).to(query.dtype)[:, None]  # (n, 1)
                mask = torch.where(own[None, :], bias, torch.zeros((), dtype=query.dtype, device=query.device))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            rows.append(out.transpose(0, 1))  # (n, H, D)
            index.append(idx + b * lq)
            if return_lse:
                dt = empty_lse(query).dtype  # fp32 logits for half inputs, as the fused kernels
                logits = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale + (0 if mask is None else mask.to(dt))
                lses.append(logits.logsumexp(-1).transpose(0, 1))  # (H, n, m) -> (n, H)
    if not rows:  # no query sees any key
        out = zeros_output(query, key, value, segment_bias)
        return (out, empty_lse(query)) if return_lse else out
    index = torch.cat(index)
    out = torch.zeros(batch * lq, heads, dim, dtype=query.dtype, device=query.device)
    out = out.index_copy(0, index, torch.cat(rows)).view(batch, lq, heads, dim)
    if not return_lse:
        return out
    lse = empty_lse(query).view(batch * lq, heads)
    return out, lse.index_copy(0, index, torch.cat(lses).to(lse.dtype)).view(batch, lq, heads)


def _masked_sdpa(query, key, value, query_buckets, seg, visible, scale: float, segment_bias, return_lse=False):
    """The traceable form: one SDPA over all keys, invisible ones masked with ``-inf`` (static shapes)."""
    own = (seg[None, None, :] == query_buckets[:, :, None]) & (query_buckets[:, :, None] >= 0)
    has_key = visible.any(dim=-1)  # (B, Lq)
    # A row without any visible key would be NaN under SDPA: give it every key, then zero it.
    visible = visible | ~has_key[..., None]
    mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill(~visible, float("-inf"))
    if segment_bias is not None:
        mask = mask + own.to(query.dtype) * segment_bias[..., None].to(query.dtype)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask[:, None], scale=scale
    ).transpose(1, 2)
    out = torch.where(has_key[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    if not return_lse:
        return out, None
    dt = empty_lse(query).dtype
    logits = torch.einsum("bqhd,bkhd->bhqk", query.to(dt), key.to(dt)) * scale + mask[:, None].to(dt)
    lse = logits.logsumexp(-1).transpose(1, 2)  # (B, H, Lq, Lk) -> (B, Lq, H)
    return out, torch.where(has_key[..., None], lse, float("-inf"))
