"""Host side of the Triton backend: tile planning, kernel launches and the ``torch.library`` custom ops.

Two custom ops, ``diasr::bucketed_attention_fwd`` -> (out, lse) and ``diasr::bucketed_attention_bwd`` ->
(dq, dk, dv, dbias), tied together with ``register_autograd`` and given fake (meta) implementations, so the op is
opaque to ``torch.compile(fullgraph=True)`` and capturable in CUDA graphs: the planning below uses only device-side
torch ops (argsort, gather, searchsorted), never ``.item()`` / ``.tolist()``; ``segment_lengths`` and ``scale``
are op attributes (Python values).

The backward recomputes attention from the *final* O and LSE of the forward (one online softmax over shared and
segment keys), so there is no LSE merge to differentiate through.
"""

from __future__ import annotations

import logging

import torch
import triton

from .._dense_backend import key_segment_ids
from . import _kernels

INTERPRET: bool = isinstance(_kernels._fwd_kernel, triton.runtime.interpreter.InterpretedFunction)
_LOG2E = 1.4426950408889634
logger = logging.getLogger(__name__)

# How the forward computes the shared-key part (every query against every shared key, i.e. dense attention):
#   "auto":   on CUDA fp16/bf16, the fastest SDPA kernel that returns the LSE (cuDNN, else FlashAttention-2), each
#             validated once per (device, dtype, head dim) against the pure Triton path; else "triton".
#   "sdpa":   like "auto", and on CPU the fused CPU flash kernel (used by the tests to check the continuation).
#   "triton": the Triton kernel does shared and segment keys in one online softmax.
# The segment keys always run in Triton, continuing exactly from the shared part's (O, LSE). The backward always
# recomputes from the merged O and LSE with the Triton kernels, so nothing is differentiated through a merge.
SHARED_FORWARD = "auto"
_VALIDATED: dict[tuple, object] = {}


def _sdpa_cudnn(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=scale
    )[:2]
    return out.transpose(1, 2), lse


def _sdpa_flash(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=scale
    )[:2]
    return out.transpose(1, 2), lse


def _sdpa_cpu(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )[:2]
    return out.transpose(1, 2), lse


def _self_check(impl, device, dtype, dim) -> bool:
    """Does ``impl`` + the Triton continuation reproduce the pure Triton forward on a small random problem?"""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 300, 2, dim, device=device, generator=g).to(dtype)
    k = torch.randn(1, 280, 2, dim, device=device, generator=g).to(dtype)
    v = torch.randn(1, 280, 2, dim, device=device, generator=g).to(dtype)
    buckets = torch.randint(-1, 3, (1, 300), device=device, generator=g)
    segs = [40, 0, 33]
    want, want_lse = _forward(q, k, v, buckets, None, segs, dim**-0.5, shared_impl=None)
    got, got_lse = _forward(q, k, v, buckets, None, segs, dim**-0.5, shared_impl=impl)
    return bool(((got.float() - want.float()).abs().max() < 2e-2) & ((got_lse - want_lse).abs().max() < 1e-2))


def _shared_impl(q: torch.Tensor, shared: int):
    """The dense kernel to use for the shared part of this call, or ``None`` for the pure Triton path."""
    if SHARED_FORWARD == "triton" or shared == 0:
        return None
    if q.device.type == "cpu":
        return _sdpa_cpu if SHARED_FORWARD == "sdpa" else None
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    key = (q.device.index, q.dtype, q.shape[-1])
    if key not in _VALIDATED:
        if torch.cuda.is_current_stream_capturing():  # the check syncs: not now, use the pure path this time
            return None
        chosen = None
        for name, impl in (("cuDNN", _sdpa_cudnn), ("FlashAttention-2", _sdpa_flash)):
            try:
                ok = _self_check(impl, q.device, q.dtype, q.shape[-1])
            except Exception as err:  # unsupported GPU/shape/build: try the next one
                logger.info("bucketed_attention[triton]: %s shared part unavailable (%s)", name, err)
                continue
            if ok:
                chosen = impl
                logger.info("bucketed_attention[triton]: shared keys via %s SDPA, segments via Triton", name)
                break
            logger.warning("bucketed_attention[triton]: %s shared part failed its self-check; not used", name)
        _VALIDATED[key] = chosen
    return _VALIDATED[key]


def _config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes. Under the interpreter small tiles keep tests cheap and exercise the multi-tile paths."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if INTERPRET:
        return dict(BLOCK_D=block_d, fwd=(16, 16), bwd=(16, 16), num_warps=4, num_stages=1)
    if dtype == torch.float32 or block_d > 128:  # fp32 IEEE dots and wide heads need more registers per tile
        return dict(BLOCK_D=block_d, fwd=(64, 32), bwd=(32, 32), num_warps=4 if block_d <= 64 else 8, num_stages=2)
    if block_d <= 64:
        return dict(BLOCK_D=block_d, fwd=(128, 64), bwd=(64, 64), num_warps=4, num_stages=3)
    return dict(BLOCK_D=block_d, fwd=(128, 64), bwd=(64, 64), num_warps=8, num_stages=3)


def _flags(dtype: torch.dtype) -> dict:
    """fp32: fp32 dots without TF32. fp16/bf16: low-precision dot operands (P and dS rounded like FlashAttention)
    with fp32 accumulation; the interpreter gets bf16 wrong, so there bf16 is upcast, while fp16 runs the GPU path."""
    fp32 = dtype == torch.float32
    upcast = fp32 or (INTERPRET and dtype == torch.bfloat16)
    return dict(UPCAST=upcast, IEEE=upcast)


class _Plan:
    """Device-side bucket sort and per-tile key / query ranges (see the notes at the top of ``_kernels``)."""

    def __init__(self, buckets: torch.Tensor, segment_lengths: list[int], lk: int):
        self.kseg = key_segment_ids(lk, segment_lengths, buckets.device)  # (Lk,) non-decreasing
        order = torch.argsort(buckets, dim=1, stable=True)  # (B, Lq)
        self.sorted_buckets = buckets.gather(1, order)  # (B, Lq) non-decreasing per row
        self.order = order.to(torch.int32).contiguous()
        self.qb = self.sorted_buckets.to(torch.int32).contiguous()
        self.kseg32 = self.kseg.to(torch.int32)

    def query_tile_key_range(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, cdiv(Lq, block_m))`` key range ``[lo, hi)`` holding the segments of each sorted query tile."""
        lq = self.sorted_buckets.shape[1]
        first = torch.arange(0, lq, block_m, device=self.kseg.device)
        last = (first + block_m - 1).clamp(max=lq - 1)
        bmin, bmax = self.sorted_buckets[:, first], self.sorted_buckets[:, last]
        lo = torch.searchsorted(self.kseg, bmin.clamp(min=0).contiguous())
        hi = torch.searchsorted(self.kseg, bmax.contiguous(), right=True)
        hi = torch.where(bmax < 0, lo, hi)  # tile of null queries only: no segment keys
        return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()

    def key_tile_query_range(self, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, cdiv(Lk, block_n))`` sorted-query range ``[lo, hi)`` of the buckets that can see each key tile."""
        batch, lq = self.sorted_buckets.shape
        lk = self.kseg.shape[0]
        first = torch.arange(0, lk, block_n, device=self.kseg.device)
        last = (first + block_n - 1).clamp(max=lk - 1)
        kmin = self.kseg[first].expand(batch, -1).contiguous()
        kmax = self.kseg[last].expand(batch, -1).contiguous()
        lo = torch.searchsorted(self.sorted_buckets, kmin)
        hi = torch.searchsorted(self.sorted_buckets, kmax, right=True)
        shared = kmin < 0  # the tile holds shared keys: every query sees it
        lo = torch.where(shared, 0, lo)
        hi = torch.where(shared, lq, hi)
        return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _forward(q, k, v, buckets, bias, segment_lengths, scale, shared_impl="auto"):
    batch, lq, heads, dim = q.shape
    lk = k.shape[1]
    shared = lk - sum(segment_lengths)
    out = q.new_zeros(batch, lq, heads, dim)
    lse = q.new_full((batch, heads, lq), float("inf"), dtype=torch.float32)
    if batch * heads * lq == 0 or lk == 0:
        return out, lse
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if shared_impl == "auto":
        shared_impl = _shared_impl(q, shared)
    shared_done = False
    if shared_impl is not None and shared > 0:  # (dense kernels may not survive zero keys)
        try:
            o_shared, lse_shared = shared_impl(q, k[:, :shared], v[:, :shared], scale)
            out.copy_(o_shared)
            lse.copy_(lse_shared.reshape(batch, heads, lq))
            shared_done = True
        except Exception as err:  # e.g. a shape this SDPA kernel rejects: the pure Triton path is always there
            logger.debug("bucketed_attention[triton]: shared part fell back to Triton (%s)", err)
    cfg = _config(dim, q.dtype)
    block_m, block_n = cfg["fwd"]
    plan = _Plan(buckets, segment_lengths, lk)
    lo, hi = plan.query_tile_key_range(block_m)
    bias_arg = bias.contiguous() if bias is not None else q
    grid = (triton.cdiv(lq, block_m), batch * heads)
    _kernels._fwd_kernel[grid](
        q, k, v, bias_arg, plan.order, plan.qb, plan.kseg32, lo, hi, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        bias_arg.stride(0) if bias is not None else 0,
        heads, lq, shared, lo.shape[1], scale * _LOG2E, dim,
        HAS_BIAS=bias is not None, **_flags(q.dtype), SHARED_DONE=shared_done,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out, lse


def _backward(dout, q, k, v, out, lse, buckets, bias, segment_lengths, scale):
    batch, lq, heads, dim = q.shape
    lk = k.shape[1]
    # Contiguous outputs (the fake impl promises the same layout).
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    dbias = q.new_zeros(batch, heads, lq, dtype=torch.float32)
    if batch * heads * lq == 0 or lk == 0:
        return dq, dk, dv, dbias.sum(1)
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # (B, H, Lq)
    cfg = _config(dim, q.dtype)
    block_m, block_n = cfg["bwd"]
    plan = _Plan(buckets, segment_lengths, lk)
    bias_arg = bias.contiguous() if bias is not None else q
    bias_stride = bias_arg.stride(0) if bias is not None else 0
    common = dict(HAS_BIAS=bias is not None, **_flags(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])  # fmt: skip

    lo, hi = plan.query_tile_key_range(block_m)
    _kernels._bwd_dq_kernel[(triton.cdiv(lq, block_m), batch * heads)](
        q, k, v, bias_arg, plan.order, plan.qb, plan.kseg32, lo, hi, dout, lse, delta, dq, dbias,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq), bias_stride,
        heads, lq, lk - sum(segment_lengths), lo.shape[1], scale * _LOG2E, scale, dim, **common,
    )  # fmt: skip
    qlo, qhi = plan.key_tile_query_range(block_n)
    _kernels._bwd_dkdv_kernel[(triton.cdiv(lk, block_n), batch * heads)](
        q, k, v, bias_arg, plan.order, plan.qb, plan.kseg32, qlo, qhi, dout, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv), bias_stride,
        heads, lq, lk, qlo.shape[1], scale * _LOG2E, scale, dim, **common,
    )  # fmt: skip
    return dq, dk, dv, dbias.sum(1)


# ------------------------------------------------------------------------------------------------------------------
# torch.library registration
# ------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("diasr::bucketed_attention_fwd", mutates_args=())
def bucketed_attention_fwd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_buckets: torch.Tensor,
    segment_bias: torch.Tensor | None,
    segment_lengths: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Lq, H, D), lse (B, H, Lq) fp32; ``+inf`` on rows without visible keys)."""
    return _forward(query, key, value, query_buckets, segment_bias, segment_lengths, scale)


@bucketed_attention_fwd.register_fake
def _(query, key, value, query_buckets, segment_bias, segment_lengths, scale):
    batch, lq, heads, dim = query.shape
    return query.new_empty(batch, lq, heads, dim), query.new_empty(batch, heads, lq, dtype=torch.float32)


@torch.library.custom_op("diasr::bucketed_attention_bwd", mutates_args=())
def bucketed_attention_bwd(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    query_buckets: torch.Tensor,
    segment_bias: torch.Tensor | None,
    segment_lengths: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias (B, Lq) fp32; zeros when there is no bias)."""
    return _backward(grad_out, query, key, value, out, lse, query_buckets, segment_bias, segment_lengths, scale)


@bucketed_attention_bwd.register_fake
def _(grad_out, query, key, value, out, lse, query_buckets, segment_bias, segment_lengths, scale):
    batch, lq, _, _ = query.shape
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            query.new_empty(batch, lq, dtype=torch.float32))  # fmt: skip


def _setup_context(ctx, inputs, output):
    query, key, value, query_buckets, segment_bias, segment_lengths, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(query, key, value, out, lse, query_buckets, segment_bias)
    ctx.segment_lengths = segment_lengths
    ctx.scale = scale


def _autograd_backward(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, query_buckets, segment_bias = ctx.saved_tensors
    dq, dk, dv, dbias = bucketed_attention_bwd(
        grad_out, query, key, value, out, lse, query_buckets, segment_bias, ctx.segment_lengths, ctx.scale
    )
    dbias = dbias.to(segment_bias.dtype) if segment_bias is not None and ctx.needs_input_grad[4] else None
    return dq, dk, dv, None, dbias, None, None


bucketed_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def triton_bucketed_attention_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_buckets: torch.Tensor,
    segment_lengths: list[int],
    *,
    scale: float,
    segment_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return bucketed_attention_fwd(query, key, value, query_buckets, segment_bias, list(segment_lengths), float(scale))[0]


__all__ = ["INTERPRET", "bucketed_attention_bwd", "bucketed_attention_fwd", "triton_bucketed_attention_impl"]
