"""FlexAttention backend: the bucket routing as a ``mask_mod`` (and the segment bias as a ``score_mod``).

Each query maps to its bucket and each key to its segment id (``-1`` = shared); a key is visible when it is shared or
its segment is the query's bucket. On GPU the block mask is built by ``create_block_mask(..., _compile=True)``,
which evaluates ``mask_mod`` per tile without materialising the dense ``Lq x Lk`` mask, and ``flex_attention`` runs
compiled (fused kernel, forward and backward). It is a cross-check of the Triton kernels and a second GPU path.

On CPU (torch 2.13) FlexAttention is forward-only and eager: it materialises the score matrix (small shapes only)
and has no backward, hence the explicit error below.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ._dense_backend import key_segment_ids


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_bucketed_attention(
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
    """``bucketed_attention`` backend; the LSE (``(B, Lq, H)``, ``-inf`` where no key is visible) is FlexAttention's."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    on_cpu = query.device.type == "cpu"
    if (
        on_cpu
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (query, key, value, segment_bias))
    ):
        raise NotImplementedError(
            "backend='flex' is forward-only on CPU: FlexAttention's backward is not implemented on CPU in torch "
            f"{torch.__version__.split('+')[0]}. Use backend='torch' for training on CPU (or run under torch.no_grad())."
        )
    batch, lq, heads, _ = query.shape
    lk = key.shape[1]
    kseg = key_segment_ids(lk, segment_lengths, query.device)  # (Lk,)
    buckets = query_buckets

    def mask_mod(b, h, q_idx, kv_idx):
        seg = kseg[kv_idx]
        return (seg == -1) | (seg == buckets[b, q_idx])

    score_mod = None
    if segment_bias is not None:
        bias = segment_bias

        def score_mod(score, b, h, q_idx, kv_idx):
            seg = kseg[kv_idx]
            own = (seg >= 0) & (seg == buckets[b, q_idx])
            return score + torch.where(own, bias[b, q_idx].to(score.dtype), 0.0)

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, L, D)
    aux = AuxRequest(lse=True) if return_lse else None
    if on_cpu and not torch.compiler.is_compiling():  # (a warnings filter is not traceable)
        with warnings.catch_warnings():  # eager flex warns that it is unfused: expected on CPU
            warnings.simplefilter("ignore", UserWarning)
            block_mask = create_block_mask(mask_mod, batch, None, lq, lk, device=query.device)
            out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_aux=aux)
    else:
        compiling = torch.compiler.is_compiling()
        block_mask = create_block_mask(mask_mod, batch, None, lq, lk, device=query.device, _compile=not compiling)
        flex = flex_attention if compiling else _compiled_flex()
        out = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_aux=aux)
    lse = None
    if return_lse:
        out, lse = out[0], out[1].lse.transpose(1, 2)  # (B, H, Lq) -> (B, Lq, H)
    out = out.transpose(1, 2)
    if lk - sum(segment_lengths) > 0:  # shared keys exist: every query sees some key
        return (out, lse) if return_lse else out
    # Rows with no visible key: make the op's contract (zeros) explicit instead of relying on flex's convention.
    has_key = torch.zeros_like(buckets, dtype=torch.bool)
    for s, n in enumerate(segment_lengths):
        if n > 0:
            has_key = has_key | (buckets == s)
    out = torch.where(has_key[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    if not return_lse:
        return out
    return out, torch.where(has_key[..., None], lse, float("-inf"))
