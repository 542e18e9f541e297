"""Triton backend: kernels under the CPU interpreter (subprocess), the CPU error without it, and GPU-only checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diasr_diffusers.ops import bucketed_attention

ROOT = Path(__file__).resolve().parents[1]
CASES_SCRIPT = Path(__file__).with_name("triton_interpret_cases.py")

FP32_CASES = [
    "fp32_bias",
    "fp32_no_bias",
    "fp32_d16_shared0_zero_len",
    "fp32_d64_all_null",
    "fp32_single_bucket",
    "fp32_batch3_different_routings",
    "fp32_batch3_structured_routings",
    "fp32_shared0_null_rows",
    "fp32_d24_non_pow2",
    "fp32_block_multiples",
    "fp32_no_segments",
    "fp32_unusual_strides",
    "compile_fullgraph_and_opcheck",
    "hybrid_fp32_bias",
    "hybrid_fp32_no_bias_short_shared",
    # every supported family's head dim (64: LTX, CogVideoX; 128: Wan, HunyuanVideo-1.5) on a reduced layout
    "family_wan_d128",
    "family_ltx_d64",
    "family_cogvideox_d64",
    "family_hunyuanvideo15_d128",
]
LSE_CASES = ["lse_fp32", "lse_fp32_no_shared", "lse_hybrid_fp32"]
NONFINITE_CASES = ["nonfinite_value_inf", "nonfinite_value_nan"]
LOW_PRECISION_CASES = {"fp16_bias": 1e-4, "fp16_d64_shared0": 1e-4, "bf16_bias": 1e-3, "hybrid_fp16_bias": 1e-4}
HYBRID_CASES = ["hybrid_fp32_bias", "hybrid_fp32_no_bias_short_shared", "hybrid_fp16_bias"]
CASES_WITH_EMPTY_ROWS = ["fp32_d16_shared0_zero_len", "fp32_shared0_null_rows", "fp16_d64_shared0"]
METRICS = ("out", "dq", "dk", "dv")


triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Run every kernel case once in a fresh interpreter process (TRITON_INTERPRET=1 set before any import)."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(CASES_SCRIPT)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, f"kernel case script failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_all_cases_ran(interpreted):
    extra = {"trusted_no_host_reads_no_copies", *LSE_CASES, *NONFINITE_CASES}
    assert set(interpreted) == set(FP32_CASES) | set(LOW_PRECISION_CASES) | extra


def test_trusted_path_reads_nothing_back_and_copies_no_strided_input(interpreted):
    res = interpreted["trusted_no_host_reads_no_copies"]
    assert res["host_reads"] == [], f"device-to-host reads on the trusted Triton path: {res['host_reads']}"
    assert res["copies"] == [], f"strided q/k/v/dO were copied: {res['copies']}"
    for m in (*METRICS, "dbias"):
        assert res[m] <= 1e-5, f"{m}: {res[m]:.3g}"


@pytest.mark.parametrize("case", LSE_CASES)
def test_return_lse_and_its_gradient_match_dense(interpreted, case):
    res = interpreted[case]
    assert res["finite"] and res["lse_empty_match"], res
    if case == "lse_fp32_no_shared":
        assert res["empty_rows"] > 0, "case lost its rows without visible keys (LSE = -inf)"
    for m in ("lse", *METRICS, "dbias"):  # the gradients include a loss term on the LSE
        assert res[m] <= 1e-5, f"{case}: max |{m} - reference| = {res[m]:.3g} > 1e-5"


@pytest.mark.parametrize("case", NONFINITE_CASES)
def test_nonfinite_value_reaches_only_the_queries_that_see_it(interpreted, case):
    # Issue 25: an inf/NaN in one segment's value made every query's output non-finite (0 * inf in P @ V).
    res = interpreted[case]
    assert res["seeing_rows"] > 0 and res["seeing_nonfinite"], res
    assert res["others_finite"] and res["others_dq_finite"], res
    assert res["others_err"] <= 1e-5, res


@pytest.mark.parametrize("case", FP32_CASES)
def test_fp32_forward_backward_match_dense(interpreted, case):
    res = interpreted[case]
    assert res["finite"]
    metrics = METRICS + (("dbias",) if "dbias" in res else ())
    if "no_bias" not in case:
        assert "dbias" in res, "bias gradient was not checked"
    for m in metrics:
        assert res[m] <= 1e-5, f"{case}: max |{m} - reference| = {res[m]:.3g} > 1e-5"


@pytest.mark.parametrize("case", list(LOW_PRECISION_CASES))
def test_low_precision_within_flash_attention_rule(interpreted, case):
    res = interpreted[case]
    assert res["finite"]
    for m in (*METRICS, "dbias"):
        bound = 2 * res[f"baseline_{m}"] + LOW_PRECISION_CASES[case]
        assert res[m] <= bound, f"{case}: {m} error {res[m]:.3g} > 2 x plain {res[f'baseline_{m}']:.3g} + slack"


@pytest.mark.parametrize("case", CASES_WITH_EMPTY_ROWS)
def test_rows_without_keys_are_zero(interpreted, case):
    res = interpreted[case]
    assert res["empty_rows"] > 0, "case lost its rows without visible keys"
    assert res["empty_out"] == 0.0 and res["empty_dq"] == 0.0


@pytest.mark.parametrize("case", HYBRID_CASES)
def test_hybrid_cases_used_the_dense_shared_kernel(interpreted, case):
    # Forward ran the dense kernel once for the shared keys (the backward never does: it is all Triton).
    assert interpreted[case]["dense_shared_calls"] == 1


def test_compile_fullgraph_and_opcheck(interpreted):
    assert interpreted["compile_fullgraph_and_opcheck"]["opcheck"] is True


def test_cpu_without_interpreter_raises_clear_error(monkeypatch):
    from diasr_diffusers.ops import triton as triton_backend

    if triton_backend.interpreter_enabled():
        pytest.skip("this process runs the kernels under TRITON_INTERPRET=1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 5, 1, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before importing diasr_diffusers"):
        bucketed_attention(q, q, q, torch.zeros(1, 5, dtype=torch.long), [2], backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# GPU only: real compilation, tensor-core dtypes, torch.compile and CUDA graphs.
# ----------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_inputs(dtype, dim, batch=2, lq=1000, heads=4, shared=777, segs=(130, 0, 257), seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lk = shared + sum(segs)
    q = torch.randn(batch, lq, heads, dim, device="cuda", generator=g)
    k = torch.randn(batch, lk, heads, dim, device="cuda", generator=g)
    v = torch.randn(batch, lk, heads, dim, device="cuda", generator=g)
    buckets = torch.randint(-1, len(segs), (batch, lq), device="cuda", generator=g)
    bias = torch.randn(batch, lq, device="cuda", generator=g)
    dout = torch.randn(batch, lq, heads, dim, device="cuda", generator=g)
    return [t.to(dtype) for t in (q, k, v)], buckets, list(segs), bias.to(dtype), dout.to(dtype)


def _fwd_bwd(backend, qkv, buckets, segs, bias, dout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (*qkv, bias)]
    out = bucketed_attention(*leaves[:3], buckets, segs, segment_bias=leaves[3], backend=backend)
    return [out, *torch.autograd.grad(out, leaves, dout.to(dtype))]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("shared_forward", ["auto", "triton"])
def test_gpu_kernels_match_reference(dtype, dim, shared_forward, monkeypatch):
    from diasr_diffusers.ops.triton import _op

    monkeypatch.setattr(_op, "SHARED_FORWARD", shared_forward)
    qkv, buckets, segs, bias, dout = _gpu_inputs(dtype, dim)
    ref = _fwd_bwd("dense", qkv, buckets, segs, bias, dout, torch.float32)
    got = _fwd_bwd("triton", qkv, buckets, segs, bias, dout, dtype)
    names = ("out", "dq", "dk", "dv", "dbias")
    if dtype == torch.float32:
        for n, x, r in zip(names, got, ref):
            torch.testing.assert_close(x, r, atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
        return
    low = _fwd_bwd("dense", qkv, buckets, segs, bias, dout, dtype)
    for n, x, lo, r in zip(names, got, low, ref):
        err, base = (x.float() - r).abs().max().item(), (lo.float() - r).abs().max().item()
        assert err <= 2 * base + 1e-3, f"{n}: {err:.3g} > 2 x {base:.3g} + 1e-3"


@pytest.mark.gpu
@needs_cuda
def test_gpu_torch_compile_fullgraph_and_cuda_graph():
    qkv, buckets, segs, bias, dout = _gpu_inputs(torch.bfloat16, 128)

    def fn(q, k, v, b):
        return bucketed_attention(q, k, v, buckets, segs, segment_bias=b, backend="triton")

    expected = fn(*qkv, bias)
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(*qkv, bias), expected, atol=0, rtol=0)

    static = [t.clone() for t in (*qkv, bias)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*static)  # warm-up (kernel compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    for t, new in zip(static, (*qkv, bias)):
        t.copy_(new * 0.5)
    graph.replay()
    torch.testing.assert_close(out, fn(*static), atol=0, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_gpu_triton_matches_flex():
    qkv, buckets, segs, bias, _ = _gpu_inputs(torch.bfloat16, 128, lq=1024)
    with torch.no_grad():
        a = bucketed_attention(*qkv, buckets, segs, segment_bias=bias, backend="triton").float()
        b = bucketed_attention(*qkv, buckets, segs, segment_bias=bias, backend="flex").float()
    assert (a - b).abs().max().item() < 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "flex", "torch", "dense"])
def test_gpu_trusted_path_never_syncs(backend):
    # With autograd the torch backend reads its group sizes (documented), so it is checked without.
    qkv, buckets, segs, bias, dout = _gpu_inputs(torch.bfloat16, 128)
    grad = backend != "torch"
    leaves = [t.detach().requires_grad_(grad) for t in (*qkv, bias)]

    def step():
        with torch.set_grad_enabled(grad):
            out, lse = bucketed_attention(*leaves[:3], buckets, segs, segment_bias=leaves[3], backend=backend,
                                          return_lse=True, check_inputs=False)  # fmt: skip
            if grad:
                torch.autograd.grad(out, leaves, dout)
        return out, lse

    step()  # warm-up: kernel compilation, autotuning and the one-time SDPA self-check may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "flex", "torch"])
def test_gpu_return_lse_matches_dense(backend):
    qkv, buckets, segs, bias, _ = _gpu_inputs(torch.float32, 64, segs=(130, 0, 257), shared=0)
    with torch.no_grad():
        out, lse = bucketed_attention(*qkv, buckets, segs, segment_bias=bias, backend=backend, return_lse=True)
        ref, ref_lse = bucketed_attention(*qkv, buckets, segs, segment_bias=bias, backend="dense", return_lse=True)
    empty = torch.isneginf(ref_lse)
    assert empty.any() and torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=1e-4, rtol=1e-4)
