"""Small helpers shared by the ``bucketed_attention`` dispatcher and its backends."""

from __future__ import annotations

import torch


def zeros_output(query: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """Zeros shaped like ``query`` that stay in the autograd graph of every input, with zero gradients.

    ``query.mul(0)`` would turn a NaN/inf query into NaN, and leave the other inputs without a gradient. A sum over an
    empty slice is an exact zero whatever the tensor holds, and still carries its graph.
    """
    out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
    if torch.is_grad_enabled():
        for t in (query, *inputs):
            if t is not None and t.requires_grad:
                out = out + t[:0].sum().to(out.dtype)
    return out


def unit_stride_last_dim(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its last dim is unit-stride, else a contiguous copy.

    The fused SDPA kernels called directly through ``torch.ops.aten`` (unlike ``F.scaled_dot_product_attention``, which
    checks this and falls back) read the head dim as unit-stride: ``x[..., ::2]``, permuted views or an expanded head
    dim would silently give wrong numbers. Other strides (zero strides from ``expand`` included) are handled.
    """
    return t if t.stride(-1) == 1 else t.contiguous()


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the returned log-sum-exp: fp32 for fp32/fp16/bf16 inputs (as FlashAttention), fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_lse(query: torch.Tensor) -> torch.Tensor:
    """``(B, Lq, H)`` log-sum-exp of rows that see no key: ``log(0) = -inf``."""
    return torch.full(query.shape[:-1], float("-inf"), dtype=lse_dtype(query.dtype), device=query.device)


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its natural log-sum-exp, ``(B, Lq, H, D)`` layout in and out, LSE ``(B, Lq, H)``.

    The fused kernels that return the LSE (CPU flash; CUDA memory-efficient) where they apply, else plain math. The
    output is differentiable; the LSE is not (as in FlashAttention), so route gradients through the output only.
    No host reads.
    """
    lq = q.shape[1]
    qt, kt, vt = (unit_stride_last_dim(t).transpose(1, 2) for t in (q, k, v))
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, scale=scale)[:2]
    elif q.device.type == "cuda" and q.shape[-1] % 8 == 0 and q.dtype != torch.float64:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, scale=scale)[:2]
        lse = lse[..., :lq]  # the kernel pads the LSE's query dim
    else:
        scores = (qt @ kt.transpose(-1, -2)).mul(scale)
        lse = scores.float().logsumexp(-1).detach() if q.dtype != torch.float64 else scores.logsumexp(-1).detach()
        out = scores.softmax(-1) @ vt
    return out.transpose(1, 2), lse.transpose(1, 2).to(lse_dtype(q.dtype))
