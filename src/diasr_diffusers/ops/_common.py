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
