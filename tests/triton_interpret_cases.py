"""Kernel checks run by ``tests/test_triton_backend.py`` in a subprocess with ``TRITON_INTERPRET=1``.

The interpreter must be on before the kernels are decorated, i.e. before ``diasr_diffusers`` is imported, which a
pytest process that already imported the package cannot guarantee. This script sets it first, runs every case on
CPU tensors through the public op (``backend="triton"``), compares with the dense reference and prints one JSON object
``{case: {metric: value}}`` on its last stdout line. Thresholds live in the test, not here.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from diasr_diffusers.ops import bucketed_attention  # noqa: E402
from diasr_diffusers.ops._dense_backend import key_segment_ids  # noqa: E402
from diasr_diffusers.ops.triton import _op  # noqa: E402

GRADS = ("dq", "dk", "dv", "dbias")


def make_inputs(batch, lq, heads, dim, shared, segs, buckets=None, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lk = shared + sum(segs)
    q = torch.randn(batch, lq, heads, dim, generator=g)
    k = torch.randn(batch, lk, heads, dim, generator=g)
    v = torch.randn(batch, lk, heads, dim, generator=g)
    if buckets is None:
        buckets = torch.randint(-1, len(segs), (batch, lq), generator=g)
    b = torch.randn(batch, lq, generator=g) if bias else None
    dout = torch.randn(batch, lq, heads, dim, generator=g)
    return q, k, v, buckets, b, dout


def plain_attention(q, k, v, buckets, segs, *, segment_bias=None, backend=None):
    """The plain PyTorch implementation of FlashAttention's tolerance rule: every op in the input dtype."""
    seg = key_segment_ids(k.shape[1], segs, q.device)
    own = seg[None, None, :] == buckets[:, :, None]  # (B, Lq, Lk)
    visible = (seg[None, None, :] == -1) | own
    has_key = visible.any(-1)
    visible = visible | ~has_key[..., None]  # dummy key for empty rows, zeroed below
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if segment_bias is not None:
        scores = scores + (own.to(q.dtype) * segment_bias[..., None])[:, None]
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out * has_key[:, :, None, None].to(out.dtype)


def run(backend, q, k, v, buckets, segs, bias, dout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    b = bias.detach().to(dtype).requires_grad_() if bias is not None else None
    op = plain_attention if backend == "plain" else bucketed_attention
    out = op(*leaves, buckets, segs, segment_bias=b, backend=backend)
    grads = torch.autograd.grad(out, [*leaves, *([b] if b is not None else [])], dout.to(dtype))
    return [out.float(), *(x.float() for x in grads)]


def max_err(a, b):
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def unusual_strides(q, k, v):
    """Same shapes, no unit-stride last dim for q (step 2), zero strides for k (expanded heads) and v (head dim)."""
    q = torch.stack([q, q], dim=-1).flatten(-2)[..., ::2]
    k = k[:, :, :1].expand_as(k)
    v = v[..., :1].expand_as(v)
    return q, k, v


def check(name, dtype, batch, lq, heads, dim, shared, segs, buckets=None, bias=True, strided=False):
    q, k, v, buckets, b, dout = make_inputs(batch, lq, heads, dim, shared, segs, buckets, bias)
    if strided:
        q, k, v = unusual_strides(q, k, v)
    if dtype != torch.float32:  # the fp32 reference sees exactly the low-precision inputs
        q, k, v, dout = (t.to(dtype).float() for t in (q, k, v, dout))
        b = b.to(dtype).float() if b is not None else None
    ref = run("dense", q, k, v, buckets, segs, b, dout, torch.float32)
    got = run("triton", q, k, v, buckets, segs, b, dout, dtype)
    names = ("out", *GRADS[: len(got) - 1])
    res = {n: max_err(x, r) for n, x, r in zip(names, got, ref)}
    res["finite"] = all(bool(torch.isfinite(x).all()) for x in got)
    res["ref_scale"] = max(float(r.abs().max()) if r.numel() else 0.0 for r in ref)
    if dtype != torch.float32:  # FlashAttention rule: compare with a plain low-precision PyTorch implementation
        low = run("plain", q, k, v, buckets, segs, b, dout, dtype)
        res.update({f"baseline_{n}": max_err(x, r) for n, x, r in zip(names, low, ref)})
    # Rows without any visible key must be exact zeros with zero gradient.
    lk = k.shape[1]
    has = torch.zeros_like(buckets, dtype=torch.bool) | (lk - sum(segs) > 0)
    for s, n in enumerate(segs):
        has |= (buckets == s) & (n > 0)
    res["empty_rows"] = int((~has).sum())
    res["empty_out"] = float(got[0][~has].abs().max()) if (~has).any() else 0.0
    res["empty_dq"] = float(got[1][~has].abs().max()) if (~has).any() else 0.0
    return name, res


def compile_and_opcheck():
    """torch.compile(fullgraph=True) tracing through the custom op (fake impl + autograd) and torch.library.opcheck."""
    q, k, v, buckets, b, dout = make_inputs(2, 37, 2, 16, 11, [5, 0, 8], seed=3)
    segs = [5, 0, 8]

    def fn(q, k, v, b):
        return bucketed_attention(q, k, v, buckets, segs, segment_bias=b, backend="triton")

    leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
    ref = bucketed_attention(*ref_leaves[:3], buckets, segs, segment_bias=ref_leaves[3], backend="dense")
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    res = {"out": max_err(out, ref)}
    res.update({n: max_err(x, r) for n, x, r in zip(GRADS, grads, ref_grads)})
    args = (q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_(), buckets,
            b.clone().requires_grad_(), segs, 16**-0.5)  # fmt: skip
    torch.library.opcheck(torch.ops.diasr.bucketed_attention_fwd.default, args)
    res["opcheck"] = True
    res["finite"] = True
    res["ref_scale"] = 1.0
    res["empty_rows"] = 0
    return "compile_fullgraph_and_opcheck", res


# Head dims and (reduced) layouts of every supported family: heads cut to 2 and token counts to tens so that the
# interpreter stays fast; the odd sizes keep partial tiles everywhere. (family, head dim, shared, segments, Lq)
FAMILIES = {
    "wan": (128, 45, [13, 7, 0], 52),  # Wan 2.1/2.2: D = 128; video keys + reference segments
    "ltx": (64, 38, [9, 17], 41),  # LTX-Video: D = 64
    "cogvideox": (64, 30, [11, 5, 8], 47),  # CogVideoX: D = 64; joint [text, video] keys
    "hunyuanvideo15": (128, 27, [6, 19], 35),  # HunyuanVideo-1.5: D = 128
}


def family_case(family):
    dim, shared, segs, lq = FAMILIES[family]
    return check(f"family_{family}_d{dim}", torch.float32, 2, lq, 2, dim, shared, segs)


class Recorder(TorchDispatchMode):
    """Host reads (``_local_scalar_dense`` & co., plus ``Tensor.tolist``/``numpy``) and copies of float tensors."""

    READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default",
             "aten.nonzero.default", "aten.masked_select.default", "aten.equal.default",
             "aten.lift_fresh.default", "aten.lift_fresh_copy.default"}  # torch.tensor(list): H2D copy on a GPU
    COPIES = {"aten.clone.default", "aten.copy_.default", "aten._to_copy.default"}

    def __init__(self, min_copy_numel):
        super().__init__()
        self.reads, self.copies, self.min_copy_numel = [], [], min_copy_numel
        self._saved = {}

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = self._saved[name] = getattr(torch.Tensor, name)

            def wrapper(t, *a, _n=name, _o=original, **kw):
                self.reads.append(f"Tensor.{_n}")
                return _o(t, *a, **kw)

            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in self.READS:
            self.reads.append(name)
        src = args[-1] if name == "aten.copy_.default" else args[0] if args else None
        if name in self.COPIES and isinstance(src, torch.Tensor) and src.dtype.is_floating_point:
            if src.numel() >= self.min_copy_numel:
                self.copies.append(f"{name} {tuple(src.shape)}")
        return func(*args, **(kwargs or {}))


def trusted_no_host_reads_no_copies():
    """Trusted path, forward + backward, on strided views (the shapes a processor slices out of a joint sequence, and
    (B, H, L, D) storage): nothing read back to the host, no copy of q/k/v/dO, same numbers as the dense reference."""
    segs = [7, 0, 12]
    q, k, v, buckets, b, dout = make_inputs(2, 40, 2, 16, 19, segs, seed=5)
    q_store = torch.cat([q, torch.randn_like(q[:, :9])], dim=1).requires_grad_()  # query = its first 40 tokens
    k_store, v_store = (t.transpose(1, 2).contiguous().requires_grad_() for t in (k, v))  # (B, H, L, D) storage
    bias = b.clone().requires_grad_()
    views = [q_store[:, :40], k_store.transpose(1, 2), v_store.transpose(1, 2), bias]
    dout_view = dout.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (*views[:3], dout_view))
    rec = Recorder(min_copy_numel=min(t.numel() for t in (q, k, v)))
    with rec:
        out, lse = bucketed_attention(*views[:3], buckets, segs, segment_bias=views[3], backend="triton",
                                      return_lse=True, check_inputs=False)  # fmt: skip
        grads = torch.autograd.grad(out, views, dout_view)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
    ref = bucketed_attention(*ref_leaves[:3], buckets, segs, segment_bias=ref_leaves[3], backend="dense")
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    res = {"out": max_err(out, ref), "host_reads": rec.reads, "copies": rec.copies, "finite": True, "ref_scale": 1.0}
    res.update({n: max_err(x, r) for n, x, r in zip(GRADS, grads, ref_grads)})
    res["empty_rows"] = 0
    return "trusted_no_host_reads_no_copies", res


def lse_case(name, shared, segs, hybrid=False):
    """return_lse: forward LSE and the gradient of a loss on both out and LSE, against the dense reference (whose LSE
    is differentiable); -inf where no key is visible."""
    q, k, v, buckets, b, dout = make_inputs(2, 37, 2, 16, shared, segs, seed=11)
    dlse = torch.randn(2, 37, 2, generator=torch.Generator().manual_seed(12))

    def run_lse(backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
        out, lse = bucketed_attention(*leaves[:3], buckets, segs, segment_bias=leaves[3], backend=backend,
                                      return_lse=True)  # fmt: skip
        loss = (out * dout).sum() + torch.where(torch.isfinite(lse), lse * dlse, 0).sum()
        return [out, lse, *torch.autograd.grad(loss, leaves)]

    saved = _op.SHARED_FORWARD
    _op.SHARED_FORWARD = "sdpa" if hybrid else "triton"
    try:
        got = run_lse("triton")
    finally:
        _op.SHARED_FORWARD = saved
    ref = run_lse("dense")
    empty = torch.isneginf(ref[1])
    res = {n: max_err(x, r) for n, x, r in zip(("out", "dq", "dk", "dv", "dbias"), [got[0], *got[2:]], [ref[0], *ref[2:]])}
    res["lse"] = max_err(got[1][~empty], ref[1][~empty])
    res["lse_empty_match"] = bool(torch.equal(torch.isneginf(got[1]), empty))
    res["empty_rows"] = int(empty.any(-1).sum())
    res["finite"] = all(bool(torch.isfinite(x).all()) for x in [got[0], *got[2:]])
    res["ref_scale"] = 1.0
    return name, res


def nonfinite_value_case(value):
    """Issue 25: a NaN/inf in one segment's value reaches only the queries of that bucket (forward and dQ)."""
    segs = [6, 9, 5]
    q, k, v, buckets, _, dout = make_inputs(1, 48, 2, 16, 21, segs, bias=False, seed=13)
    poisoned = v.clone()
    poisoned[0, 21 + 6 + 2, 1, 3] = value  # a value of segment 1
    leaves = [t.clone().requires_grad_() for t in (q, k, poisoned)]
    out = bucketed_attention(*leaves, buckets, segs, backend="triton")
    sees = buckets == 1
    clean = bucketed_attention(q, k, v, buckets, segs, backend="dense")
    dq = torch.autograd.grad(out[~sees].sum(), leaves[0])[0]
    res = {
        "seeing_rows": int(sees.sum()),
        "seeing_nonfinite": bool((~torch.isfinite(out[sees])).any()),
        "others_finite": bool(torch.isfinite(out[~sees]).all()),
        "others_err": max_err(out[~sees], clean[~sees]),
        "others_dq_finite": bool(torch.isfinite(dq[~sees]).all()),
    }
    return f"nonfinite_value_{'nan' if value != value else 'inf'}", res


def cases():
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    yield check("fp32_bias", f32, 2, 70, 2, 32, 37, [9, 0, 21])
    yield check("fp32_no_bias", f32, 2, 70, 2, 32, 37, [9, 0, 21], bias=False)
    yield check("fp32_d16_shared0_zero_len", f32, 1, 53, 2, 16, 0, [0, 13, 30])
    yield check("fp32_d64_all_null", f32, 1, 41, 1, 64, 23, [10, 7], buckets=torch.full((1, 41), -1))
    yield check("fp32_single_bucket", f32, 1, 50, 2, 32, 19, [27], buckets=torch.zeros(1, 50, dtype=torch.long))
    mixed = torch.stack([torch.full((45,), -1), torch.full((45,), 1), torch.arange(45) % 4 - 1])
    yield check("fp32_batch3_different_routings", f32, 3, 45, 2, 16, 21, [6, 17, 0])
    yield check("fp32_batch3_structured_routings", f32, 3, 45, 2, 16, 21, [6, 17, 9], buckets=mixed)
    yield check("fp32_shared0_null_rows", f32, 2, 40, 1, 16, 0, [12, 9])
    yield check("fp32_d24_non_pow2", f32, 1, 33, 2, 24, 18, [7, 5])
    yield check("fp32_block_multiples", f32, 1, 48, 2, 16, 32, [16, 5])  # tile-aligned shared part and queries
    yield check("fp32_no_segments", f32, 1, 30, 1, 16, 25, [], buckets=torch.full((1, 30), -1))
    yield check("fp32_unusual_strides", f32, 2, 29, 2, 16, 13, [6, 0, 9], strided=True)
    yield check("fp16_bias", f16, 2, 70, 2, 32, 37, [9, 0, 21])
    yield check("fp16_d64_shared0", f16, 1, 48, 2, 64, 0, [20, 11])
    yield check("bf16_bias", bf16, 2, 70, 2, 32, 37, [9, 0, 21])
    yield compile_and_opcheck()
    yield from hybrid_cases()
    for family in FAMILIES:
        yield family_case(family)
    yield trusted_no_host_reads_no_copies()
    yield lse_case("lse_fp32", 13, [5, 0, 8])
    yield lse_case("lse_fp32_no_shared", 0, [5, 0, 8])
    yield lse_case("lse_hybrid_fp32", 13, [5, 0, 8], hybrid=True)
    yield nonfinite_value_case(float("inf"))
    yield nonfinite_value_case(float("nan"))


def hybrid_cases():
    """Shared keys by a dense SDPA kernel (the CPU flash kernel standing in for cuDNN / FlashAttention-2 on GPU),
    segments by the Triton continuation from its (O, LSE); backward from the merged O and LSE."""
    f32, f16 = torch.float32, torch.float16
    calls = []
    dense_impl = _op._sdpa_cpu

    def counting(*args, **kwargs):
        calls.append(1)
        return dense_impl(*args, **kwargs)

    _op.SHARED_FORWARD, _op._sdpa_cpu = "sdpa", counting
    try:
        for args, kwargs in (
            (("hybrid_fp32_bias", f32, 2, 70, 2, 32, 37, [9, 0, 21]), {}),
            (("hybrid_fp32_no_bias_short_shared", f32, 2, 45, 2, 16, 5, [6, 17, 0]), {"bias": False}),
            (("hybrid_fp16_bias", f16, 2, 70, 2, 32, 37, [9, 0, 21]), {}),
        ):
            calls.clear()
            name, res = check(*args, **kwargs)
            res["dense_shared_calls"] = len(calls)
            yield name, res
    finally:
        _op.SHARED_FORWARD, _op._sdpa_cpu = "auto", dense_impl


def main() -> int:
    assert _op.INTERPRET, "kernels were not built for the interpreter"
    torch.manual_seed(0)
    results, start = {}, time.time()
    for name, res in cases():
        res["seconds"] = round(time.time() - start, 2)
        results[name] = res
        print(name, res, file=sys.stderr, flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
