"""The op's trusted path (``check_inputs=False``): no value read back to the host, ``torch.compile(fullgraph=True)``
without graph breaks, and the same results as the checked path.

A host read is what stalls a GPU: ``.item()`` / ``.tolist()`` / ``bool(tensor)`` / ops whose output size depends on
the data (``nonzero``, ``masked_select``, ``unique``). The recorder (`_host_reads.py`) sees the dispatcher-level ones
(``aten._local_scalar_dense`` and friends) and, since ``Tensor.tolist`` / ``numpy`` on CPU tensors bypass the
dispatcher, wraps those Python methods too. It is checked to catch the checked path's bucket-range read. The Triton
backend's trusted path is checked the same way under the interpreter (``triton_interpret_cases.py``).
"""

from __future__ import annotations

import pytest
import torch
from _host_reads import HostReads

from diasr_diffusers.ops import _torch_backend as torch_backend_module
from diasr_diffusers.ops import bucketed_attention

SEGS = [5, 0, 9, 3]


def _inputs(batch=2, lq=23, shared=11, heads=2, dim=8, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lk = shared + sum(SEGS)
    q = torch.randn(batch, lq, heads, dim, generator=g)
    k = torch.randn(batch, lk, heads, dim, generator=g)
    v = torch.randn(batch, lk, heads, dim, generator=g)
    buckets = torch.randint(-1, len(SEGS), (batch, lq), generator=g)
    b = torch.randn(batch, lq, generator=g) if bias else None
    return q, k, v, buckets, b


@pytest.fixture
def no_cpu_host_reads(monkeypatch):
    """Run the torch backend's sync-free route on CPU too (by default CPU keeps the grouped routes)."""
    monkeypatch.setattr(torch_backend_module, "HOST_READS_ON_CPU", False)


def test_recorder_catches_the_checked_paths_host_reads(monkeypatch):
    q, k, v, buckets, b = _inputs()
    with torch.no_grad():
        with HostReads(monkeypatch) as rec:
            bucketed_attention(q, k, v, buckets, SEGS, segment_bias=b, backend="dense")
    assert any("tolist" in r for r in rec.reads), rec.reads  # the bucket range check
    assert "aten.nonzero.default" in rec.reads  # the dense reference's grouping


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("bias", [False, True])
# FlexAttention's eager CPU path compiles internally, which a Python dispatch mode breaks: its trusted path is shown
# free of host reads by torch.compile(fullgraph=True) tracing it without a graph break (last test).
@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_trusted_path_reads_nothing_back_and_matches_checked(backend, bias, return_lse, monkeypatch, no_cpu_host_reads):
    q, k, v, buckets, b = _inputs(bias=bias)
    kw = dict(segment_bias=b, backend=backend, return_lse=return_lse)
    with torch.no_grad():
        want = bucketed_attention(q, k, v, buckets, SEGS, **kw)
        with HostReads(monkeypatch) as rec:
            got = bucketed_attention(q, k, v, buckets, SEGS, check_inputs=False, **kw)
    assert rec.reads == [], f"host reads on the trusted path of {backend!r}: {rec.reads}"
    for x, y in zip(got if return_lse else [got], want if return_lse else [want]):
        torch.testing.assert_close(x, y, atol=2e-6, rtol=2e-6)


def test_trusted_path_passes_no_checks_but_still_dispatches():
    q, k, v, buckets, _ = _inputs()
    bad = buckets.clone()
    bad[0, 0] = 7  # out of range: the checked path refuses it before any work
    with pytest.raises(ValueError, match="query_buckets"):
        bucketed_attention(q, k, v, bad, SEGS, backend="torch")
    with pytest.raises(ValueError, match="Unknown `backend`"):
        bucketed_attention(q, k, v, buckets, SEGS, backend="nope")
    with torch.no_grad():  # trusted: the caller vouches for the buckets; valid ones give the checked result
        torch.testing.assert_close(
            bucketed_attention(q, k, v, buckets, SEGS, check_inputs=False, scale=0.3),
            bucketed_attention(q, k, v, buckets, SEGS, scale=0.3),
        )


def test_torch_static_route_keeps_nan_with_its_queries(no_cpu_host_reads):
    q, k, v, buckets, _ = _inputs(batch=1)
    seg2 = 11 + SEGS[0] + SEGS[1]  # first key of segment 2
    v = v.clone()
    v[0, seg2, 1, 3] = float("nan")
    with torch.no_grad():
        out = bucketed_attention(q, k, v, buckets, SEGS, backend="torch", check_inputs=False)
    sees = buckets[0] == 2
    assert sees.any() and torch.isnan(out[0, sees]).any()
    assert torch.isfinite(out[0, ~sees]).all()


# --------------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, same numbers as eager.


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("check_inputs", [True, False])
@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_compile_fullgraph_matches_eager(backend, check_inputs, grad):
    torch._dynamo.reset()
    q, k, v, buckets, b = _inputs()

    def fn(q, k, v, b):
        out, lse = bucketed_attention(q, k, v, buckets, SEGS, segment_bias=b, backend=backend, return_lse=True,
                                      check_inputs=check_inputs)  # fmt: skip
        return out, lse

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v, b)]
    ref_leaves = [t.clone().requires_grad_(grad) for t in (q, k, v, b)]
    with torch.set_grad_enabled(grad):
        out, lse = compiled(*leaves)
        want, want_lse = bucketed_attention(*ref_leaves[:3], buckets, SEGS, segment_bias=ref_leaves[3],
                                            backend="dense", return_lse=True)  # fmt: skip
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse, want_lse, atol=2e-6, rtol=2e-6)
    if grad:
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad((out * go).sum(), leaves)
        ref = torch.autograd.grad((want * go).sum(), ref_leaves)
        for n, x, r in zip(("q", "k", "v", "bias"), got, ref):
            torch.testing.assert_close(x, r, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"d{n}: {m}")


def test_flex_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, k, v, buckets, b = _inputs()

    def fn(q, k, v, b):
        return bucketed_attention(q, k, v, buckets, SEGS, segment_bias=b, backend="flex", check_inputs=False)

    with torch.no_grad():
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, b)
        want = bucketed_attention(q, k, v, buckets, SEGS, segment_bias=b, backend="dense")
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)
