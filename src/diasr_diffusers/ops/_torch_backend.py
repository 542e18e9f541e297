"""Portable exact backend: group queries by bucket, one SDPA call per (sample, bucket) group.

Queries of bucket ``s`` are gathered with ``index_select`` (no padding), attend to ``[shared | segment s]`` with
plain SDPA (so the fused CPU/GPU kernels apply and no ``Lq x Lk`` score matrix or mask is ever built), and are
scattered back with ``index_copy``. Autograd flows through gather, SDPA and scatter, so gradients are exact.
The group sizes are read on the host (``.tolist()``): one device sync per call on a GPU.

Sync-free route (:func:`_static_route`): with ``sync_free=True`` (the op's trusted path, ``check_inputs=False``) on a
non-CPU device, and always under ``torch.compile``, every shape is static: one SDPA of all queries over the shared keys
and one of all queries over each segment, each returning its log-sum-exp; each query takes its own segment's part
(a select) and the two parts are merged exactly by :func:`~diasr_diffusers.ops.lse.merge_attention_partials`. No value
is read back to the host, at the price of ``Lq * sum(R_s)`` segment FLOPs instead of ``sum(n_s R_s)``. It runs only
without autograd (the fused kernels do not differentiate their LSE): with gradients, the trusted path on a GPU keeps
the grouped route and its one sync, and a compiled graph uses the dense reference's masked SDPA (exact, differentiable,
``Lq x Lk`` mask). On CPU the trusted path keeps the grouped routes: a host read of a CPU tensor is no device sync
(``HOST_READS_ON_CPU``; set it to False to run the sync-free route on CPU, as the tests do).

CPU inference (fp32, autograd off) takes a faster, leaner route (:func:`_cpu_inference`): one SDPA call of all queries
over the shared keys, one per bucket over its segment (key views, no copies), merged exactly through the
log-sum-exp. Nothing is differentiated through that merge, since it only runs without autograd.

``segment_bias`` is folded into SDPA exactly by one extra head channel: with ``q' = [q, b / scale]`` and
``k' = [k, 1]`` on segment keys (``[k, 0]`` on shared keys), ``scale * q'.k' = scale * q.k + b`` on the segment only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import empty_lse, sdpa_with_lse, unit_stride_last_dim, zeros_output
from .lse import merge_attention_partials

HOST_READS_ON_CPU: bool = True


def _visible(x: torch.Tensor, shared: int, start: int, length: int) -> torch.Tensor:
    """Rows ``[0, shared) + [start, start + length)`` of ``x`` (L, H, D); a view when the two ranges touch."""
    if start == shared or length == 0:
        return x[: shared + length] if start == shared else x[:shared]
    return torch.cat([x[:shared], x[start : start + length]])


class _KeyWindow:
    """``[shared | segment]`` rows of one sample's keys (or values) for SDPA, with as few copies as possible.

    Segment 0 follows the shared keys, so it is a view. For later segments, with autograd off, the shared rows are
    copied once into a scratch buffer and each segment is copied behind them (``R_s`` rows per segment instead of
    ``shared + R_s``); reusing the buffer is safe because every consumer runs before the next copy in stream order.
    With autograd on, SDPA keeps its inputs for backward, so each window is a fresh ``torch.cat``.
    """

    def __init__(self, x: torch.Tensor, shared: int, max_length: int, reuse: bool):
        self.x, self.shared, self.max_length, self.reuse = x, shared, max_length, reuse
        self.buffer: torch.Tensor | None = None

    def __call__(self, start: int, length: int) -> torch.Tensor:
        x, shared = self.x, self.shared
        if start == shared or length == 0 or not self.reuse:
            return _visible(x, shared, start, length)
        if self.buffer is None:
            self.buffer = x.new_empty((shared + self.max_length, *x.shape[1:]))
            self.buffer[:shared].copy_(x[:shared])
        self.buffer[shared : shared + length].copy_(x[start : start + length])
        return self.buffer[: shared + length]


def _add_bias_channel(q, k, v, bias, shared: int, scale: float):
    n, h, _ = q.shape
    q = torch.cat([q, (bias / scale).to(q.dtype)[:, None, None].expand(n, h, 1)], dim=-1)
    indicator = torch.zeros(k.shape[0], h, 1, dtype=k.dtype, device=k.device)
    indicator[shared:] = 1
    k = torch.cat([k, indicator], dim=-1)
    v = torch.cat([v, torch.zeros_like(indicator)], dim=-1)
    return q, k, v


def torch_bucketed_attention(
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
    """``bucketed_attention`` backend; see the module docstring for its routes. LSE: ``(B, Lq, H)``, not differentiable."""
    batch, lq, heads, dim = query.shape
    shared = key.shape[1] - sum(segment_lengths)
    starts = [shared]
    for n in segment_lengths[:-1]:
        starts.append(starts[-1] + n)
    num_segments = len(segment_lengths)

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, segment_bias)
    )
    on_cpu = query.device.type == "cpu"
    static = torch.compiler.is_compiling() or (sync_free and not (on_cpu and HOST_READS_ON_CPU))
    if static and not needs_grad:
        out, lse = _static_route(query, key, value, query_buckets, segment_lengths, starts, scale, segment_bias)
        return (out, lse) if return_lse else out
    if static and torch.compiler.is_compiling():  # traced with autograd: the static, differentiable reference
        from ._dense_backend import dense_bucketed_attention

        return dense_bucketed_attention(
            query, key, value, query_buckets, segment_lengths, scale=scale, segment_bias=segment_bias,
            return_lse=return_lse, sync_free=True,
        )  # fmt: skip
    if not needs_grad and on_cpu and query.dtype == torch.float32:
        out, lse = _cpu_inference(
            query, key, value, query_buckets, segment_lengths, starts, scale, segment_bias, return_lse
        )
        return (out, lse) if return_lse else out
    max_length = max(segment_lengths, default=0)
    rows, lses, index = [], [], []
    for b in range(batch):
        keys = _KeyWindow(key[b], shared, max_length, reuse=not needs_grad)
        values = _KeyWindow(value[b], shared, max_length, reuse=not needs_grad)
        buckets = query_buckets[b]
        order = torch.argsort(buckets, stable=True)
        counts = torch.bincount(buckets + 1, minlength=num_segments + 1).tolist()
        offset = 0
        for s, n in zip(range(-1, num_segments), counts):
            idx = order[offset : offset + n]
            offset += n
            length = segment_lengths[s] if s >= 0 else 0
            if n == 0 or shared + length == 0:  # empty group, or nothing visible: output stays zero
                continue
            start = starts[s] if s >= 0 else shared
            q = query[b].index_select(0, idx)
            k, v = keys(start, length), values(start, length)
            if segment_bias is not None and length > 0:
                q, k, v = _add_bias_channel(q, k, v, segment_bias[b].index_select(0, idx), shared, scale)
            if return_lse:
                out, lse = sdpa_with_lse(q[None], k[None], v[None], scale)
                out = out[0]
                lses.append(lse[0])
            else:
                out = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale
                )[0].transpose(0, 1)
            rows.append(out[..., :dim])
            index.append(idx + b * lq)

    if not rows:  # no query sees any key: zeros, still attached to the graph so backward() works
        out = zeros_output(query, key, value, segment_bias)
        return (out, empty_lse(query)) if return_lse else out
    index = torch.cat(index)
    out = query.new_zeros(batch * lq, heads, dim).index_copy(0, index, torch.cat(rows)).view(batch, lq, heads, dim)
    if not return_lse:
        return out
    lse = empty_lse(query).view(batch * lq, heads).index_copy(0, index, torch.cat(lses).to(empty_lse(query).dtype))
    return out, lse.view(batch, lq, heads)


def _static_route(query, key, value, query_buckets, segment_lengths, starts, scale, segment_bias):
    """Sync-free, static shapes (no autograd): shared part and every segment for all queries, selected and merged."""
    shared = key.shape[1] - sum(segment_lengths)
    if shared > 0:
        out, lse = sdpa_with_lse(query, key[:, :shared], value[:, :shared], scale)
    else:
        out, lse = query.new_zeros(query.shape), empty_lse(query)
    seg_out, seg_lse = query.new_zeros(query.shape), empty_lse(query)
    for s, (start, length) in enumerate(zip(starts, segment_lengths)):
        if length == 0:
            continue
        o, lse_s = sdpa_with_lse(query, key[:, start : start + length], value[:, start : start + length], scale)
        if segment_bias is not None:  # constant over the segment's keys: shifts its LSE only
            lse_s = lse_s + segment_bias.to(lse_s.dtype)[..., None]
        mine = (query_buckets == s)[..., None]  # (B, Lq, 1); a select keeps another segment's NaN out
        seg_out = torch.where(mine[..., None], o, seg_out)
        seg_lse = torch.where(mine, lse_s, seg_lse)
    return merge_attention_partials(out, lse, seg_out, seg_lse)


def _cpu_inference(query, key, value, query_buckets, segment_lengths, starts, scale, segment_bias, return_lse):
    """Shared part for all queries at once, then each bucket's segment, merged exactly (CPU, fp32, no autograd).

    The two parts are merged by :func:`merge_attention_partials`. The segment bias is constant over a query's segment
    keys, so it only shifts the segment's LSE (its output is unchanged). Rows that see no key keep ``o = 0``.
    Returns ``(out, lse)``.
    """
    sdpa_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    query, key, value = (unit_stride_last_dim(t) for t in (query, key, value))
    batch, lq, heads, dim = query.shape
    shared = key.shape[1] - sum(segment_lengths)
    if shared > 0:
        o, lse = sdpa_lse(
            query.transpose(1, 2), key[:, :shared].transpose(1, 2), value[:, :shared].transpose(1, 2), scale=scale
        )[:2]
        out, lse = o.transpose(1, 2), lse.transpose(1, 2)  # (B, Lq, H, D), (B, Lq, H) views: no copies
    else:
        out, lse = query.new_zeros(batch, lq, heads, dim), empty_lse(query)
    for b in range(batch):
        buckets = query_buckets[b]
        order = torch.argsort(buckets, stable=True)
        counts = torch.bincount(buckets + 1, minlength=len(segment_lengths) + 1).tolist()
        # The routed queries, sorted by bucket, are gathered, merged and scattered once for all buckets: each small
        # op is a parallel region, and on a busy machine every region waits for a descheduled thread.
        rows = order[counts[0] :]  # bucket -1 sees the shared keys only: already done
        if rows.numel() == 0:
            continue
        q_sorted = query[b].index_select(0, rows)  # (m, H, D)
        parts, part_lses, offset = [], [], 0
        for s, n in enumerate(counts[1:]):
            length = segment_lengths[s]
            if n > 0 and length > 0:
                seg = slice(starts[s], starts[s] + length)
                q = q_sorted[offset : offset + n].transpose(0, 1)[None]  # (1, H, n, D) view
                k, v = key[b, seg].transpose(0, 1)[None], value[b, seg].transpose(0, 1)[None]
                o2, l2 = sdpa_lse(q, k, v, scale=scale)[:2]
                parts.append(o2[0].transpose(0, 1))  # (n, H, D)
                part_lses.append(l2[0].transpose(0, 1))  # (n, H)
            elif n > 0:  # empty segment: these queries see the shared keys only (weight 0 on this part)
                parts.append(query.new_zeros(n, heads, dim))
                part_lses.append(query.new_full((n, heads), float("-inf")))
            offset += n
        o2, l2 = torch.cat(parts), torch.cat(part_lses)
        if segment_bias is not None:
            l2 = l2 + segment_bias[b].index_select(0, rows).to(l2.dtype)[:, None]
        merged = merge_attention_partials(
            out[b].index_select(0, rows), lse[b].index_select(0, rows), o2, l2, return_lse=return_lse
        )
        if return_lse:
            merged, merged_lse = merged
            lse[b].index_copy_(0, rows, merged_lse)
        out[b].index_copy_(0, rows, merged)
    return out, lse
