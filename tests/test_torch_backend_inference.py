"""The torch backend's no-grad path (shared keys copied once into a reused buffer) stays exact."""

from __future__ import annotations

import pytest
import torch

from diasr_diffusers.ops import bucketed_attention


@pytest.mark.parametrize("shared", [0, 13])
@pytest.mark.parametrize("bias", [False, True])
def test_no_grad_window_reuse_matches_dense(shared, bias):
    g = torch.Generator().manual_seed(shared)
    segs = [5, 0, 9, 4]
    q = torch.randn(2, 60, 2, 16, generator=g)
    k = torch.randn(2, shared + sum(segs), 2, 16, generator=g)
    v = torch.randn_like(k)
    buckets = torch.randint(-1, len(segs), (2, 60), generator=g)
    b = torch.randn(2, 60, generator=g) if bias else None
    with torch.no_grad():
        out = bucketed_attention(q, k, v, buckets, segs, segment_bias=b, backend="torch")
    ref = bucketed_attention(q, k, v, buckets, segs, segment_bias=b, backend="dense")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The inputs are untouched by the scratch-buffer copies.
    torch.testing.assert_close(
        bucketed_attention(q, k, v, buckets, segs, segment_bias=b, backend="dense"), ref, atol=0, rtol=0
    )
