"""Exact merge of two partial attention results over disjoint key sets, through their log-sum-exp.

With ``(o_a, l_a)`` the output and natural log-sum-exp of softmax attention over key set A and ``(o_b, l_b)`` over a
disjoint key set B, attention over ``A ∪ B`` is ``l = logaddexp(l_a, l_b)`` and
``o = o_a exp(l_a - l) + o_b exp(l_b - l) = lerp(o_a, o_b, sigmoid(l_b - l_a))``. This is the one place the op
merges partial results: the torch backend's CPU route and sync-free route, and the Triton backend's split (shared keys
by a dense SDPA kernel, segments by Triton) all call it; ring attention merges its steps the same way.
"""

from __future__ import annotations

import torch


def merge_attention_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *, return_lse: bool = True
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Merge two partial attention results over disjoint key sets into the result over their union (exact).

    Args:
        out_a, out_b: ``(..., D)`` outputs, each normalised over its own keys.
        lse_a, lse_b: ``out.shape[:-1]`` natural log-sum-exp of the logits of each part; ``-inf`` for a row that saw
            no key in that part (its output row must then be finite, e.g. zeros; FlashAttention-2 writes ``+inf``
            there, map it to ``-inf`` first).

        return_lse: ``False`` returns ``out`` alone (one op less per call on hot paths that do not need the LSE).

    Returns:
        ``(out, lse)``: ``out`` in the dtype of ``out_a`` (the weights are computed in the promoted dtype of the inputs
        and at least fp32), ``lse`` in that dtype too. A row with no key in either part gets ``out_a``'s row (zeros)
        and ``lse = -inf``. A NaN in one part reaches only the rows whose weight on that part is not exactly zero.
        Differentiable in all four inputs; the gradient is exact when the parts' LSE gradients are.

    Example:
        >>> q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
        >>> def part(k, v):
        ...     s = q @ k.transpose(-1, -2)
        ...     return s.softmax(-1) @ v, s.logsumexp(-1)
        >>> out, lse = merge_attention_partials(*part(k[..., :4, :], v[..., :4, :]), *part(k[..., 4:, :], v[..., 4:, :]))
        >>> torch.allclose(out, part(k, v)[0], atol=1e-6)
        True
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or lse_a.shape != out_a.shape[:-1]:
        raise ValueError(
            "`out_a`/`out_b` must share one shape (..., D) and `lse_a`/`lse_b` must have shape out.shape[:-1], got "
            f"{tuple(out_a.shape)}, {tuple(out_b.shape)}, {tuple(lse_a.shape)}, {tuple(lse_b.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(out_a.dtype, lse_a.dtype), torch.float32)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    # Where part b saw nothing its weight is exactly 0 (sigmoid(-inf - -inf) would be NaN when neither part saw a key).
    weight = torch.where(lse_b == float("-inf"), torch.zeros((), dtype=dtype, device=lse_b.device),
                         torch.sigmoid(lse_b - lse_a))  # fmt: skip
    out = torch.lerp(out_a.to(dtype), out_b.to(dtype), weight[..., None])
    if not return_lse:
        return out.to(out_a.dtype)
    return out.to(out_a.dtype), torch.logaddexp(lse_a, lse_b)


__all__ = ["merge_attention_partials"]
