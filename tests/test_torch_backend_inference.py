"""The torch backend's no-grad paths stay exact.

fp32 on CPU: shared part for all queries + per-bucket segments, merged through the log-sum-exp. Other dtypes: grouped
SDPA with the shared keys copied once into a reused window buffer.
"""

from __future__ import annotations

import pytest
import torch

from diasr_diffusers.ops import bucketed_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared", [0, 13])
@pytest.mark.parametrize("bias", [False, True])
def test_no_grad_paths_match_dense(dtype, shared, bias):
    g = torch.Generator().manual_seed(shared)
    segs = [5, 0, 9, 4]
    q = torch.randn(2, 60, 2, 16, generator=g, dtype=dtype)
    k = torch.randn(2, shared + sum(segs), 2, 16, generator=g, dtype=dtype)
    v = torch.randn_like(k)
    buckets = torch.randint(-1, len(segs), (2, 60), generator=g)
    buckets[1, :7] = -1  # always some null rows: with shared == 0 they must come out as zeros
    b = torch.randn(2, 60, generator=g, dtype=dtype) if bias else None
    with torch.no_grad():
        out = bucketed_attention(q, k, v, buckets, segs, segment_bias=b, backend="torch")
    ref = bucketed_attention(q, k, v, buckets, segs, segment_bias=b, backend="dense")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if shared == 0:
        assert out[1, :7].abs().max() == 0
    # The inputs are untouched by the scratch-buffer copies.
    torch.testing.assert_close(
        bucketed_attention(q, k, v, buckets, segs, segment_bias=b, backend="dense"), ref, atol=0, rtol=0
    )
