"""FlexAttention backend: forward parity on CPU, the clear CPU-backward error, GPU forward+backward parity."""

from __future__ import annotations

import pytest
import torch

from diasr_diffusers.ops import bucketed_attention

CASES = [
    # batch, lq, heads, dim, shared, segment lengths, bias
    (1, 37, 2, 16, 20, [5, 9], True),
    (2, 50, 2, 32, 31, [0, 12, 7], False),
    (2, 29, 1, 16, 0, [6, 0, 11], True),  # no shared keys: null queries and bucket 1 see nothing
    (3, 40, 2, 16, 17, [], False),  # no segments at all
]


def _inputs(batch, lq, heads, dim, shared, segs, bias, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    lk = shared + sum(segs)
    q = torch.randn(batch, lq, heads, dim, generator=g, device=device)
    k = torch.randn(batch, lk, heads, dim, generator=g, device=device)
    v = torch.randn(batch, lk, heads, dim, generator=g, device=device)
    buckets = torch.randint(-1, max(len(segs), 0), (batch, lq), generator=g, device=device)
    b = torch.randn(batch, lq, generator=g, device=device) if bias else None
    return q, k, v, buckets, b


@pytest.mark.parametrize("case", CASES)
def test_flex_forward_matches_dense_on_cpu(case):
    *shape, segs, bias = case
    q, k, v, buckets, b = _inputs(*shape, segs, bias)
    out = bucketed_attention(q, k, v, buckets, segs, segment_bias=b, backend="flex")
    ref = bucketed_attention(q, k, v, buckets, segs, segment_bias=b, backend="dense")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if shape[4] == 0:  # shared length 0: some rows have no visible key and must be exact zeros
        empty = buckets == -1
        if 1 < len(segs) and segs[1] == 0:
            empty |= buckets == 1
        assert empty.any()
        assert out[empty].abs().max() == 0


def test_flex_backward_on_cpu_raises_clear_error():
    q, k, v, buckets, b = _inputs(1, 20, 1, 16, 10, [4], True)
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match=r"backward is not implemented on CPU.*backend='torch'"):
        bucketed_attention(q, k, v, buckets, [4], segment_bias=b, backend="flex")


def test_flex_on_cpu_with_grad_tensors_under_no_grad_runs():
    q, k, v, buckets, b = _inputs(1, 20, 1, 16, 10, [4], True)
    b.requires_grad_()
    with torch.no_grad():
        out = bucketed_attention(q, k, v, buckets, [4], segment_bias=b, backend="flex")
        ref = bucketed_attention(q, k, v, buckets, [4], segment_bias=b, backend="dense")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_forward_backward_on_gpu():
    q, k, v, buckets, b = _inputs(2, 700, 4, 64, 301, [130, 0, 257], True, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
    out = bucketed_attention(*leaves[:3], buckets, [130, 0, 257], segment_bias=leaves[3], backend="flex")
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
    ref = bucketed_attention(*ref_leaves[:3], buckets, [130, 0, 257], segment_bias=ref_leaves[3], backend="dense")
    dout = torch.randn_like(out)
    for x, r in zip(
        (out, *torch.autograd.grad(out, leaves, dout)), (ref, *torch.autograd.grad(ref, ref_leaves, dout))
    ):
        torch.testing.assert_close(x, r, atol=2e-3, rtol=2e-3)
