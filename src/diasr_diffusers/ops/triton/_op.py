"""Host side of the Triton backend: tile planning, kernel launches and the ``torch.library`` custom ops.

Two custom ops, ``diasr::bucketed_attention_fwd`` -> (out, lse) and ``diasr::bucketed_attention_bwd`` ->
(dq, dk, dv, dbias), tied together with ``register_autograd`` and given fake (meta) implementations, so the op is
opaque to ``torch.compile(fullgraph=True)`` and capturable in CUDA graphs: the planning below uses only device-side
torch ops (argsort, gather, searchsorted), never ``.item()`` / ``.tolist()``; ``segment_lengths`` and ``scale``
are op attributes (Python values).

The backward recomputes attention from the *final* O and LSE of the forward, so nothing is differentiated through
an LSE merge. The LSE output is differentiable: a gradient reaching it only shifts ``Delta`` in the backward kernels
(``d LSE / d z = P``), which ring attention needs when it merges partial results.
"""

from __future__ import annotations

import logging
import os

import torch
import triton

from .._common import unit_stride_last_dim
from .._dense_backend import key_segment_ids
from ..lse import merge_attention_partials
from . import _kernels

INTERPRET: bool = isinstance(_kernels._fwd_kernel, triton.runtime.interpreter.InterpretedFunction)
_LOG2E = 1.4426950408889634
logger = logging.getLogger(__name__)

# How the forward computes the shared-key part (every query against every shared key, i.e. dense attention):
#   "auto":   on CUDA fp16/bf16, the fastest SDPA kernel that returns the LSE (cuDNN, else FlashAttention-2), each
#             validated once per (device, dtype, head dim) against the pure Triton path; else "triton".
#   "sdpa":   like "auto", and on CPU the fused CPU flash kernel (used by the tests to check the continuation).
#   "triton": the Triton kernel does shared and segment keys in one online softmax.
# In the split, the segment keys run in Triton alone and the two partial results are merged exactly by the public
# ``merge_attention_partials`` (one elementwise pass over the output). The backward always recomputes from the
# merged O and LSE with the Triton kernels, so nothing is differentiated through a merge.
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


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# Tile configurations. On a GPU ``triton.autotune`` times the candidates once per (head dim, dtype) and keeps the
# fastest; the first entry of each list is the former hand-written choice, so autotuning can only match or beat it.
# Candidates a GPU cannot hold (shared memory, registers) are skipped by the autotuner. Under the interpreter a
# single small configuration (16 x 16 tiles) keeps the tests cheap and exercises the multi-tile paths; the
# interpreter cannot run a multi-config autotune.
_FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 2), (64, 32, 4, 2)]
_BWD_CONFIGS = [(64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)]
_INTERPRETER_CONFIG = (16, 16, 4, 1)
# DIASR_TRITON_AUTOTUNE=0 (read when the kernels are loaded): the first configuration of each list, no timing, one
# compilation per kernel variant (quick GPU correctness runs, e.g. the tests in benchmarks/gpu_check.sh).
AUTOTUNE: bool = os.environ.get("DIASR_TRITON_AUTOTUNE", "1") != "0"


def _configs(table):
    rows = [_INTERPRETER_CONFIG] if INTERPRET else table if AUTOTUNE else table[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in rows]


def _tuned(kernel, table):
    return triton.autotune(configs=_configs(table), key=["D"])(kernel)


_fwd_kernel = _tuned(_kernels._fwd_kernel, _FWD_CONFIGS)
_bwd_dq_kernel = _tuned(_kernels._bwd_dq_kernel, _BWD_CONFIGS)
_bwd_dkdv_kernel = _tuned(_kernels._bwd_dkdv_kernel, _BWD_CONFIGS)


def _flags(dtype: torch.dtype) -> dict:
    """fp32: fp32 dots without TF32. fp16/bf16: low-precision dot operands (P and dS rounded like FlashAttention)
    with fp32 accumulation; the interpreter gets bf16 wrong, so there bf16 is upcast, while fp16 runs the GPU path."""
    fp32 = dtype == torch.float32
    upcast = fp32 or (INTERPRET and dtype == torch.bfloat16)
    return dict(UPCAST=upcast, IEEE=upcast)


class _Plan:
    """Device-side bucket sort and the segment / bucket boundaries the kernels read (see the notes in ``_kernels``).

    Only sorts, gathers and searches on the device: no value is read back to the host, and nothing depends on the
    tile sizes, so the autotuner may pick any.
    """

    def __init__(self, buckets: torch.Tensor, segment_lengths: list[int], lk: int):
        device = buckets.device
        kseg = key_segment_ids(lk, segment_lengths, device)  # (Lk,) non-decreasing
        self.kseg32 = kseg.to(torch.int32)
        # (N + 1,) first key of each segment, last = Lk. Searched on the device: torch.tensor(list, device="cuda")
        # would be a blocking host-to-device copy, which set_sync_debug_mode("error") rejects.
        segments = torch.arange(len(segment_lengths) + 1, device=device)
        self.seg_start = torch.searchsorted(kseg, segments).to(torch.int32)
        order = torch.argsort(buckets, dim=1, stable=True)  # (B, Lq)
        sorted_buckets = buckets.gather(1, order)  # (B, Lq) non-decreasing per row
        self.order = order.to(torch.int32).contiguous()
        self.qb = sorted_buckets.to(torch.int32).contiguous()
        self.num_buckets = len(segment_lengths) + 1  # with the null bucket
        self._sorted = sorted_buckets

    def query_start(self) -> torch.Tensor:
        """``(B, N + 2)`` int32: position of the first sorted query of bucket ``>= t - 1`` (last column = Lq)."""
        values = torch.arange(-1, self.num_buckets, device=self._sorted.device).expand(self._sorted.shape[0], -1)
        return torch.searchsorted(self._sorted.contiguous(), values.contiguous()).to(torch.int32).contiguous()


def _unit_stride_bias(bias: torch.Tensor) -> torch.Tensor:
    return bias if bias.stride(1) == 1 else bias.contiguous()  # (B, Lq): tiny, the kernels read rows as unit-stride


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _segment_forward(q, k, v, buckets, bias, segment_lengths, scale, skip_shared, out):
    """Launch the forward kernel into ``out``; returns the LSE (B, H, Lq) fp32, ``+inf`` on rows without keys."""
    batch, lq, heads, dim = q.shape
    lk = k.shape[1]
    lse = q.new_empty((batch, heads, lq), dtype=torch.float32)
    plan = _Plan(buckets, segment_lengths, lk)
    bias_arg = _unit_stride_bias(bias) if bias is not None else q
    _fwd_kernel[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)](
        q, k, v, bias_arg, plan.order, plan.qb, plan.kseg32, plan.seg_start, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        bias_arg.stride(0) if bias is not None else 0,
        heads, lq, lk - sum(segment_lengths), scale * _LOG2E, dim,
        HAS_BIAS=bias is not None, **_flags(q.dtype), SKIP_SHARED=skip_shared, BLOCK_D=_block_d(dim),
    )  # fmt: skip
    return lse


def _forward(q, k, v, buckets, bias, segment_lengths, scale, shared_impl="auto"):
    batch, lq, heads, dim = q.shape
    lk = k.shape[1]
    shared = lk - sum(segment_lengths)
    if batch * heads * lq == 0 or lk == 0:
        return q.new_zeros(batch, lq, heads, dim), q.new_full((batch, heads, lq), float("inf"), dtype=torch.float32)
    if shared_impl == "auto":
        shared_impl = _shared_impl(q, shared)
    if shared_impl is not None and shared > 0:  # (dense kernels may not survive zero keys)
        try:
            # The fused SDPA kernels read the head dim as unit-stride; other strides are passed as they are.
            qs, ks, vs = (unit_stride_last_dim(t) for t in (q, k[:, :shared], v[:, :shared]))
            o_shared, lse_shared = shared_impl(qs, ks, vs, scale)  # (B, Lq, H, D), (B, H, Lq)
        except Exception as err:  # e.g. a shape this SDPA kernel rejects: the pure Triton path is always there
            logger.debug("bucketed_attention[triton]: shared part fell back to Triton (%s)", err)
        else:
            o_seg = q.new_empty((batch, lq, heads, dim), dtype=torch.float32)  # fp32: rounded once, after the merge
            lse_seg = _segment_forward(q, k, v, buckets, bias, segment_lengths, scale, True, o_seg)
            lse_seg = torch.where(lse_seg == float("inf"), float("-inf"), lse_seg)  # kernel: +inf = no key
            out, lse = merge_attention_partials(  # weights and sum in fp32, rounded to q's dtype once
                o_shared, lse_shared.reshape(batch, heads, lq).transpose(1, 2), o_seg, lse_seg.transpose(1, 2)
            )
            # Every row saw the shared keys, so no LSE is -inf here. Contiguous, as the fake implementation says
            # (the SDPA output is a transposed view, whose layout the merge would keep).
            return out.to(q.dtype).contiguous(), lse.transpose(1, 2).contiguous()
    out = q.new_empty(batch, lq, heads, dim)
    return out, _segment_forward(q, k, v, buckets, bias, segment_lengths, scale, False, out)


def _backward(dout, q, k, v, out, lse, grad_lse, buckets, bias, segment_lengths, scale):
    batch, lq, heads, dim = q.shape
    lk = k.shape[1]
    # Contiguous outputs (the fake impl promises the same layout).
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    dbias = q.new_zeros(batch, heads, lq, dtype=torch.float32)
    if batch * heads * lq == 0 or lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias.sum(1)
    # dZ = P (dP - Delta) + P dLSE: a gradient reaching the LSE only shifts Delta (d LSE / d z = P).
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # (B, H, Lq)
    if grad_lse is not None:
        delta = delta - grad_lse
    delta = delta.contiguous()
    plan = _Plan(buckets, segment_lengths, lk)
    bias_arg = _unit_stride_bias(bias) if bias is not None else q
    bias_stride = bias_arg.stride(0) if bias is not None else 0
    common = dict(HAS_BIAS=bias is not None, **_flags(q.dtype), BLOCK_D=_block_d(dim))
    _bwd_dq_kernel[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)](
        q, k, v, bias_arg, plan.order, plan.qb, plan.kseg32, plan.seg_start, dout, lse, delta, dq, dbias,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq), bias_stride,
        heads, lq, lk - sum(segment_lengths), scale * _LOG2E, scale, dim, **common,
    )  # fmt: skip
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), batch * heads)](
        q, k, v, bias_arg, plan.order, plan.qb, plan.kseg32, plan.query_start(), dout, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv), bias_stride,
        heads, lq, lk, plan.num_buckets, scale * _LOG2E, scale, dim, **common,
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
    """(out (B, Lq, H, D), lse (B, H, Lq) fp32; ``+inf`` on rows without visible keys, so that the backward's
    ``exp(z - LSE)`` is 0 there)."""
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
    grad_lse: torch.Tensor | None,
    query_buckets: torch.Tensor,
    segment_bias: torch.Tensor | None,
    segment_lengths: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias (B, Lq) fp32; zeros when there is no bias)."""
    return _backward(
        grad_out, query, key, value, out, lse, grad_lse, query_buckets, segment_bias, segment_lengths, scale
    )


@bucketed_attention_bwd.register_fake
def _(grad_out, query, key, value, out, lse, grad_lse, query_buckets, segment_bias, segment_lengths, scale):
    batch, lq, _, _ = query.shape
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            query.new_empty(batch, lq, dtype=torch.float32))  # fmt: skip


def _setup_context(ctx, inputs, output):
    query, key, value, query_buckets, segment_bias, segment_lengths, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, query_buckets, segment_bias)
    ctx.segment_lengths = segment_lengths
    ctx.scale = scale


def _autograd_backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, query_buckets, segment_bias = ctx.saved_tensors
    if grad_out is None:  # only the LSE reached the loss
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dbias = bucketed_attention_bwd(
        grad_out, query, key, value, out, lse, grad_lse, query_buckets, segment_bias, ctx.segment_lengths, ctx.scale
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
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    out, lse = bucketed_attention_fwd(
        query, key, value, query_buckets, segment_bias, list(segment_lengths), float(scale)
    )
    if not return_lse:
        return out
    # The op's convention (+inf where no key is visible, for the backward) -> log(0) = -inf, layout (B, Lq, H).
    lse = torch.where(lse == float("inf"), float("-inf"), lse).transpose(1, 2)
    return out, lse


__all__ = ["INTERPRET", "bucketed_attention_bwd", "bucketed_attention_fwd", "triton_bucketed_attention_impl"]
