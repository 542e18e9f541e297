"""xFormers backend of ``bucketed_attention``: the routed op on xFormers' memory-efficient kernels (CUDA only).

For GPUs where the Triton backend does not run (no official Triton wheel on Windows, GPUs older than Ampere, head
dims above 256) but xFormers does. Two kernel calls, merged exactly through their log-sum-exps:

1. **Shared part, one dense call**: every query against the shared keys (``Lk - sum(segment_lengths)`` of them).
2. **Segments, one variable-length call**: the queries are sorted on the device by ``(sample, bucket)`` and packed
   into one sequence; the keys of every sample's non-empty segments are packed the same way; an xFormers
   ``BlockDiagonalMask`` lets block ``(b, s)`` of queries see only block ``(b, s)`` of keys. Queries with no segment
   (bucket ``-1``, or a zero-length segment) go to one extra block per sample holding a single zero key, so every
   block has a key (FA2 writes ``lse = +inf`` for key-less rows), and their result is then dropped.
3. **Merge**: ``l = logaddexp(l1, l2 + bias)``, ``o = o1 e^(l1 - l) + o2 e^(l2 + bias - l)``. The segment bias is
   constant over a query's segment keys, so it only shifts ``l2``.

Backward (an ``autograd.Function``): xFormers' backward does not take a gradient of the log-sum-exp, so
differentiating through the merge would give wrong ``dq``/``dk``. Instead each call's backward runs with the *merged*
output and log-sum-exp (the segment call with ``l - bias``): it then yields exactly that call's share of the
gradient of the full softmax. ``d bias = sum_h w2 (dO . (o2 - o))`` with ``w2 = e^(l2 + bias - l)``.

Host syncs. The query block sizes are data-dependent. xFormers' ``BlockDiagonalMask.from_seqlens`` wants host
lists, so the query ``_SeqLenInfo`` is built directly from the device ``cumsum`` of the counts, with ``max_seqlen``
set to the upper bound ``Lq`` (the FA2/cutlass kernels only size their grid with it). Its ``seqstart_py`` (the host
copy) is a lazy list that syncs only if read: on A100/H100 (cutlass, FA2, FA3 ops) xFormers never reads it, so the
call has no host sync. On Blackwell (sm100) xFormers' dispatcher asks the ``cutlass_blackwell`` op, whose support
check reads it: one sync per call there (the op then declines the mask and another one runs). The key side
(segment lengths) is host data already. The one-time self-check below (per device, dtype and head dim) syncs once.

``xformers.ops.fmha.merge_attentions`` is not used: it is a Triton kernel (the list form a CUDA-only custom op built
on it), so it would not run exactly where this backend matters, on machines without Triton. The merge is three
element-wise PyTorch ops in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ._common import unit_stride_last_dim

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INSTALL_HINT = "pip install 'diasr-diffusers[xformers]'"
# The devices xFormers' attention kernels run on. Tests add "cpu" together with a CPU stand-in for `_fmha`.
KERNEL_DEVICES = ("cuda",)


@functools.cache
def _import_fmha() -> Any:
    from xformers.ops import fmha

    return fmha


def _fmha() -> Any:
    """``xformers.ops.fmha`` (the one place the backend reaches xFormers; tests replace it with a CPU stand-in)."""
    return _import_fmha()


@functools.cache
def xformers_available() -> bool:
    """True when ``xformers.ops.fmha`` imports (probed once)."""
    try:
        _import_fmha()
        return True
    except Exception:  # ImportError, or a broken install raising something else at import time
        return False


def _basic_reason(query: Any) -> str | None:
    """What rules xFormers out without running anything: the package, the device, the dtype."""
    if not xformers_available():
        return f"the `xformers` package is not installed ({INSTALL_HINT})"
    if query.device.type not in KERNEL_DEVICES:
        return (
            f"xFormers' memory_efficient_attention has no {query.device.type.upper()} kernel (got tensors on "
            f"{query.device}; it runs on CUDA only)"
        )
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not supported (fp16, bf16, fp32)"
    return None


_SELF_CHECKED: dict[tuple, str | None] = {}


def unsupported_reason(query: Any, needs_grad: bool = False) -> str | None:
    """Why the xFormers backend cannot take tensors like ``query`` (B, Lq, H, D) here; ``None`` if it can.

    Beyond the package/device/dtype checks, the first call per (device, dtype, head dim) runs a tiny routed
    attention (and, with ``needs_grad``, its backward) against the ``"torch"`` backend: an xFormers build without
    a kernel for this GPU/dtype/head dim, or giving other numbers, is reported here instead of failing (or being
    silently wrong) mid-model.
    """
    reason = _basic_reason(query)
    if reason is not None:
        return reason
    key = (_fmha(), query.device.type, query.device.index, query.dtype, query.shape[-1], needs_grad)
    if key not in _SELF_CHECKED:
        try:
            _SELF_CHECKED[key] = _self_check(query.device, query.dtype, query.shape[-1], needs_grad)
        except Exception as err:  # no operator for this GPU/dtype/head dim, a broken build, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _SELF_CHECKED[key] = f"xFormers failed on a tiny {query.dtype} head-dim-{query.shape[-1]} case " + (
                f"({type(err).__name__}: {first})"
            )
    return _SELF_CHECKED[key]


def _self_check(device: torch.device, dtype: torch.dtype, dim: int, needs_grad: bool) -> str | None:
    from ._torch_backend import torch_bucketed_attention

    g = torch.Generator().manual_seed(0)
    lengths = [3, 0, 5]
    q = torch.randn(2, 24, 2, dim, generator=g).to(device, dtype)
    k = torch.randn(2, 6 + sum(lengths), 2, dim, generator=g).to(device, dtype)
    v = torch.randn(k.shape, generator=g).to(device, dtype)
    buckets = torch.randint(-1, len(lengths), (2, 24), generator=g).to(device)
    bias = torch.randn(2, 24, generator=g).to(device)
    scale = max(dim, 1) ** -0.5
    leaves = [t.float().requires_grad_(needs_grad) for t in (q, k, v, bias)]
    with torch.enable_grad():
        want = torch_bucketed_attention(*leaves[:3], buckets, lengths, scale=scale, segment_bias=leaves[3])
        got_leaves = [t.detach().to(dtype if i < 3 else torch.float32).requires_grad_(needs_grad)
                      for i, t in enumerate(leaves)]  # fmt: skip
        got = _apply(*got_leaves[:3], buckets, lengths, scale, got_leaves[3])
        pairs = [("output", got, want)]
        if needs_grad:
            grad = torch.randn(want.shape, generator=g).to(device)
            (want * grad).sum().backward()
            (got.float() * grad).sum().backward()
            pairs += [(f"grad of {n}", a.grad, b.grad) for n, a, b in zip(("query", "key", "value", "segment_bias"),
                                                                          got_leaves, leaves)]  # fmt: skip
    atol = 1e-3 if dtype == torch.float32 else 3e-2
    for name, a, b in pairs:
        err = (a.float() - b.float()).abs().max().item()
        if not err <= atol * max(1.0, b.abs().max().item()):
            return f"xFormers' {name} differs from the exact backend by {err:.3g} on a tiny {dtype} case"
    return None


class _LazyHostList(Sequence):
    """The host copy of a device ``seqstart`` for ``_SeqLenInfo.seqstart_py``: read (and synced) only if used."""

    def __init__(self, tensor: torch.Tensor):
        self._tensor, self._list = tensor, None

    def _values(self) -> list[int]:
        if self._list is None:
            self._list = self._tensor.tolist()
        return self._list

    def __len__(self) -> int:
        return self._tensor.numel()

    def __getitem__(self, i):
        return self._values()[i]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


@functools.lru_cache(maxsize=64)
def _host_to_device(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small int64 table on ``device``, cached: a plain ``torch.tensor(..., device="cuda")`` copies from pageable
    memory and waits for the stream (a host sync) on every call."""
    return torch.tensor(values, device=device)


@functools.lru_cache(maxsize=64)
def _key_seqinfo(seqlen_info: type, lengths: tuple[int, ...], device: torch.device) -> Any:
    """xFormers' block starts of the packed keys (host data: the segment lengths), cached per layout."""
    return seqlen_info.from_seqlens(lengths, device=device)


class _Layout:
    """How the queries and keys are packed for the variable-length call (all on the device, no host sync)."""

    def __init__(self, fmha: Any, query_buckets: torch.Tensor, segment_lengths: list[int], lq: int):
        batch, device = query_buckets.shape[0], query_buckets.device
        live = [s for s, n in enumerate(segment_lengths) if n > 0]
        self.groups = len(live) + 1  # per sample: the non-empty segments, then the "no segment" block
        table = [len(live)] * (len(segment_lengths) + 1)  # bucket + 1 -> group
        for g, s in enumerate(live):
            table[s + 1] = g
        gid = _host_to_device(tuple(table), device)[query_buckets + 1]  # (B, Lq)
        self.has_segment = gid < len(live)
        block = (torch.arange(batch, device=device)[:, None] * self.groups + gid).reshape(-1)
        self.order = torch.argsort(block, stable=True)
        self.block_sorted = block.index_select(0, self.order)
        # Not `bincount`: on CUDA it reads the maximum back to the host to size its output.
        counts = torch.zeros(batch * self.groups + 1, dtype=torch.int32, device=device)
        counts[1:].scatter_add_(0, block, torch.ones_like(block, dtype=torch.int32))
        seqstart = counts.cumsum(0, dtype=torch.int32)
        self.position = torch.arange(batch * lq, device=device) - seqstart.long().index_select(0, self.block_sorted)
        attn_bias = fmha.attn_bias
        q_info = attn_bias._SeqLenInfo(seqstart=seqstart, max_seqlen=lq, min_seqlen=0,
                                       seqstart_py=_LazyHostList(seqstart))  # fmt: skip
        k_lengths = [segment_lengths[s] for s in live] + [1]  # one zero key for the "no segment" block
        k_info = _key_seqinfo(attn_bias._SeqLenInfo, tuple(k_lengths * batch), device)
        self.mask = attn_bias.BlockDiagonalMask(q_seqinfo=q_info, k_seqinfo=k_info)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Lq, ...) -> (1, B*Lq, ...) sorted by block."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.order)[None]

    def unpack(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """(1, B*Lq, ...) sorted by block -> (B, Lq, ...)."""
        x = x[0]
        return torch.empty_like(x).index_copy_(0, self.order, x).view(batch, -1, *x.shape[1:])

    def lse_rows(self, lse: torch.Tensor, rows: int) -> torch.Tensor:
        """The kernel's log-sum-exp (packed ``(1, H, >=M)`` or padded per block ``(blocks, H, >=max_seqlen)``, as
        the op chose) -> ``(M, H)`` in packed row order."""
        if lse.shape[0] == 1:  # packed (with one block, both layouts coincide)
            return lse[0, :, :rows].transpose(0, 1)
        return lse.permute(0, 2, 1)[self.block_sorted, self.position]

    def lse_like(self, template: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`lse_rows`: ``rows`` (M, H) in the layout of ``template``; unused slots ``+inf``."""
        out = torch.full(template.shape, float("inf"), dtype=template.dtype, device=template.device)
        if template.shape[0] == 1:
            out[0, :, : rows.shape[0]] = rows.transpose(0, 1)
        else:
            out.permute(0, 2, 1).index_put_((self.block_sorted, self.position), rows)
        return out


def _merge_weights(l1: torch.Tensor, l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse, w1, w2)``: the merged log-sum-exp and each part's weight; rows seeing no key get ``w1 = w2 = 0``."""
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros((), device=lse.device))
    return lse, torch.exp(l1 - safe), torch.exp(l2 - safe)


class _XFormersBucketedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, segment_bias, query_buckets, segment_lengths, scale, fmha):
        batch, lq, heads, dim = query.shape
        shared = key.shape[1] - sum(segment_lengths)
        acc = torch.promote_types(query.dtype, torch.float32)  # merge precision (the kernels' LSE is fp32)
        query, key, value = (unit_stride_last_dim(t) for t in (query, key, value))
        if shared > 0:
            k1, v1 = key[:, :shared], value[:, :shared]
            o1, lse1_raw = fmha.memory_efficient_attention_forward_requires_grad(query, k1, v1, None, scale=scale)
            l1 = lse1_raw[:, :, :lq].transpose(1, 2).to(acc)  # (B, Lq, H)
        else:
            o1, lse1_raw = torch.zeros_like(query), None
            l1 = query.new_full((batch, lq, heads), float("-inf"), dtype=acc)
        layout = None
        if sum(segment_lengths) > 0:
            layout = _Layout(fmha, query_buckets, segment_lengths, lq)
            qp = layout.pack(query)
            kp, vp = (torch.cat([t[:, shared:], t.new_zeros(batch, 1, heads, dim)], dim=1).reshape(1, -1, heads, dim)
                      for t in (key, value))  # fmt: skip
            o2p, lse2_raw = fmha.memory_efficient_attention_forward_requires_grad(qp, kp, vp, layout.mask, scale=scale)
            o2 = layout.unpack(o2p, batch)
            l2 = layout.unpack(layout.lse_rows(lse2_raw, batch * lq)[None], batch).to(acc)
            if segment_bias is not None:
                l2 = l2 + segment_bias.to(acc)[..., None]
            l2 = torch.where(layout.has_segment[..., None], l2, torch.full((), float("-inf"), device=l2.device))
            o2 = torch.where(layout.has_segment[..., None, None], o2, torch.zeros((), dtype=o2.dtype, device=o2.device))
        else:
            o2, lse2_raw = torch.zeros_like(query), None
            l2 = torch.full_like(l1, float("-inf"))
        lse, w1, w2 = _merge_weights(l1, l2)
        out = (o1.to(acc) * w1[..., None] + o2.to(acc) * w2[..., None]).to(query.dtype)

        ctx.meta = (segment_lengths, scale, fmha, layout, shared, lse1_raw, lse2_raw)
        bias_grad = segment_bias is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(query, key, value, segment_bias, out, lse, w2 if bias_grad else None,
                              o2 if bias_grad else None)  # fmt: skip
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        segment_lengths, scale, fmha, layout, shared, lse1_raw, lse2_raw = ctx.meta
        query, key, value, segment_bias, out, lse, w2, o2 = ctx.saved_tensors
        batch, lq, heads, dim = query.shape
        grad_out = grad_out.to(query.dtype).contiguous()
        dq = torch.zeros_like(query)
        dk, dv = torch.zeros_like(key), torch.zeros_like(value)
        if shared > 0:
            template = lse1_raw
            lse1 = torch.full(template.shape, float("inf"), dtype=template.dtype, device=query.device)
            lse1[:, :, :lq] = lse.transpose(1, 2)
            gq, gk, gv = fmha.memory_efficient_attention_backward(
                grad_out, out, lse1, query, key[:, :shared], value[:, :shared], None, scale=scale
            )
            dq += gq
            dk[:, :shared], dv[:, :shared] = gk, gv
        if layout is not None:
            rows = lse if segment_bias is None else lse - segment_bias.to(lse.dtype)[..., None]
            # +inf: the "no segment" rows get probability 0 on their placeholder key, hence no gradient.
            rows = torch.where(layout.has_segment[..., None], rows, torch.full((), float("inf"), device=rows.device))
            lse2 = layout.lse_like(lse2_raw, layout.pack(rows)[0])
            kp, vp = (torch.cat([t[:, shared:], t.new_zeros(batch, 1, heads, dim)], dim=1).reshape(1, -1, heads, dim)
                      for t in (key, value))  # fmt: skip
            gq, gk, gv = fmha.memory_efficient_attention_backward(
                layout.pack(grad_out), layout.pack(out), lse2, layout.pack(query), kp, vp, layout.mask, scale=scale
            )
            dq += layout.unpack(gq, batch)
            dk[:, shared:] = gk.view(batch, -1, heads, dim)[:, :-1]
            dv[:, shared:] = gv.view(batch, -1, heads, dim)[:, :-1]
        dbias = None
        if w2 is not None:
            g = grad_out.to(w2.dtype)
            dbias = (w2 * ((g * o2.to(g.dtype)).sum(-1) - (g * out.to(g.dtype)).sum(-1))).sum(-1)
            dbias = dbias.to(segment_bias.dtype)
        return dq, dk, dv, dbias, None, None, None, None


def xformers_bucketed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_buckets: torch.Tensor,
    segment_lengths: list[int],
    *,
    scale: float,
    segment_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``bucketed_attention`` backend running xFormers' kernels (see the module docstring for the decomposition).

    Refuses, with the reason, tensors xFormers cannot take and, once per (device, dtype, head dim), a build whose
    self-check fails (:func:`unsupported_reason`): no silent fallback, no silently wrong numbers. The self-check is
    skipped while compiling or capturing a CUDA graph (it syncs); run one call eagerly first there.
    """
    reason = _basic_reason(query)
    if reason is None and not torch.compiler.is_compiling() and not _capturing(query):
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (query, key, value, segment_bias)
        )
        reason = unsupported_reason(query, needs_grad=needs_grad)
    if reason is not None:
        raise RuntimeError(f"backend='xformers' cannot run here: {reason}; use backend='torch' or 'auto'")
    return _apply(query, key, value, query_buckets, segment_lengths, scale, segment_bias)


def _capturing(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _apply(query, key, value, query_buckets, segment_lengths, scale, segment_bias) -> torch.Tensor:
    out, _ = _XFormersBucketedAttention.apply(
        query, key, value, segment_bias, query_buckets, list(segment_lengths), scale, _fmha()
    )
    return out


__all__ = ["unsupported_reason", "xformers_available", "xformers_bucketed_attention"]
