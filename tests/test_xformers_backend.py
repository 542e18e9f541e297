"""backend="xformers": the decomposition (shared keys dense + segments block-diagonal + log-sum-exp merge) against the
dense reference, forward and backward, on CPU through a stand-in for xFormers' kernels (`_xformers_standin.py`) with
xFormers' own mask classes when installed (and a local reimplementation otherwise); the CPU refusal; "auto"
selection; the sync-free packing; and `gpu`-marked tests of the real kernels."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _xformers_standin import LocalAttnBias, StandInFmha, real_attn_bias

from diasr_diffusers.ops import _xformers_backend as xb
from diasr_diffusers.ops import available_backends, bucketed_attention, select_backend

ROOT = Path(__file__).resolve().parents[1]
ba = sys.modules["diasr_diffusers.ops.bucketed_attention"]
REAL_BIAS = real_attn_bias()
BIAS_MODULES = [
    pytest.param(REAL_BIAS, id="xformers-masks",
                 marks=pytest.mark.skipif(REAL_BIAS is None, reason="xformers is not installed")),
    pytest.param(LocalAttnBias, id="local-masks"),
]  # fmt: skip
LSE_LAYOUTS = ["packed", "padded"]


@contextlib.contextmanager
def stand_in(monkeypatch, attn_bias, lse_layout="packed", self_check=False):
    """Route backend="xformers" to the CPU stand-in (xFormers has no CPU kernel, nor fp64 support). The backend's
    one-time self-check is skipped unless asked for: the tests count the kernel calls."""
    fmha = StandInFmha(attn_bias, lse_layout)
    with monkeypatch.context() as m:
        if not self_check:
            m.setattr(xb, "_self_check", lambda *args: None)
        m.setattr(xb, "_fmha", lambda: fmha)
        m.setattr(xb, "xformers_available", lambda: True)
        m.setattr(xb, "KERNEL_DEVICES", ("cuda", "cpu"))
        m.setattr(xb, "SUPPORTED_DTYPES", (*xb.SUPPORTED_DTYPES, torch.float64))  # exact comparisons in fp64
        yield fmha


def make_inputs(b, lq, lk, h, d, lengths, *, seed=0, null_frac=0.25, buckets=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=dtype) for n in (lq, lk, lk))
    if buckets is None:
        n = len(lengths)
        buckets = torch.randint(0, max(n, 1), (b, lq), generator=g)
        nulls = (torch.rand(b, lq, generator=g) < null_frac) | (n == 0)
        buckets = torch.where(nulls, torch.full_like(buckets, -1), buckets)
    bias = torch.randn(b, lq, generator=g, dtype=dtype)
    return q, k, v, buckets, bias


def grads(backend, q, k, v, buckets, lengths, bias=None, grad_out=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v) + ((bias,) if bias is not None else ())]
    out = bucketed_attention(*leaves[:3], buckets, lengths, segment_bias=leaves[3] if bias is not None else None,
                             backend=backend)  # fmt: skip
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * grad_out).sum().backward()
    return out.detach(), [t.grad for t in leaves], grad_out


# (B, Lq, Lk, H, D, segment_lengths, buckets or None = random)
LAYOUTS = {
    "basic": (1, 10, 7, 2, 8, [2, 1], None),
    "odd_ragged_zero_segment": (2, 37, 53, 3, 16, [5, 0, 11, 7], None),
    "no_shared": (2, 19, 12, 2, 8, [7, 5], None),  # queries of bucket -1 see nothing: zeros
    "no_segments": (1, 9, 13, 2, 4, [], None),
    "all_zero_segments": (2, 11, 6, 1, 8, [0, 0, 0], None),
    "all_null": (2, 13, 9, 2, 8, [2, 3], torch.full((2, 13), -1)),
    "one_subject": (2, 16, 11, 2, 8, [4], None),
    "many_subjects": (2, 40, 70, 2, 8, [3, 5, 0, 2, 7, 1, 4, 6, 2, 3, 5, 1], None),
    "empty_buckets": (2, 12, 20, 2, 8, [3, 4, 5, 2], torch.tensor([[0] * 6 + [3] * 6, [-1] * 6 + [0] * 6])),
    "single_query": (1, 1, 5, 1, 8, [2], None),
}


@pytest.mark.parametrize("lse_layout", LSE_LAYOUTS)
@pytest.mark.parametrize("attn_bias", BIAS_MODULES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "segment-bias"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_matches_dense_reference_forward_and_backward(monkeypatch, name, with_bias, attn_bias, lse_layout):
    b, lq, lk, h, d, lengths, buckets = LAYOUTS[name]
    q, k, v, buckets, bias = make_inputs(b, lq, lk, h, d, lengths, seed=sorted(LAYOUTS).index(name), buckets=buckets)
    bias = bias if with_bias else None
    ref, ref_grads, g = grads("dense", q, k, v, buckets, lengths, bias)
    with stand_in(monkeypatch, attn_bias, lse_layout) as fmha:
        out, got_grads, _ = grads("xformers", q, k, v, buckets, lengths, bias, grad_out=g)
        with torch.no_grad():
            inference = bucketed_attention(q, k, v, buckets, lengths, segment_bias=bias, backend="xformers")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(inference, ref, atol=1e-10, rtol=1e-10)
    for what, got, want in zip(["query", "key", "value", "segment_bias"], got_grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=lambda m, w=what: f"grad of {w}: {m}")
    # the decomposition: one dense call for the shared keys, one block-diagonal call for the segments, each once
    shared, segments = lk - sum(lengths) > 0, sum(lengths) > 0
    assert fmha.calls.count("forward") == 2 * shared and fmha.calls.count("forward_varlen") == 2 * segments
    assert fmha.calls.count("backward") == shared and fmha.calls.count("backward_varlen") == segments


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_output_dtype_and_accuracy(monkeypatch, dtype):
    lengths = [6, 0, 9]
    q, k, v, buckets, bias = make_inputs(2, 33, 40, 2, 16, lengths, seed=3)
    ref = bucketed_attention(q, k, v, buckets, lengths, segment_bias=bias, backend="dense")
    with stand_in(monkeypatch, LocalAttnBias):
        out = bucketed_attention(q.to(dtype), k.to(dtype), v.to(dtype), buckets, lengths, segment_bias=bias.float(),
                                 backend="xformers")  # fmt: skip
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_refused_on_cpu_with_one_line_reason():
    q = torch.randn(1, 6, 1, 8)
    with pytest.raises(RuntimeError) as err:
        bucketed_attention(q, q, q, torch.zeros(1, 6, dtype=torch.long), [2], backend="xformers")
    message = str(err.value)
    assert "\n" not in message and "backend='xformers'" in message
    assert ("no CPU kernel" in message and "CUDA" in message) or "not installed" in message


def test_refused_without_xformers_naming_the_extra(monkeypatch):
    monkeypatch.setattr(xb, "xformers_available", lambda: False)
    q = torch.randn(1, 6, 1, 8)
    with pytest.raises(RuntimeError, match=r"not installed \(pip install 'diasr-diffusers\[xformers\]'\)"):
        bucketed_attention(q, q, q, torch.zeros(1, 6, dtype=torch.long), [2], backend="xformers")


def test_works_without_xformers_installed():
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "xformers" or name.startswith("xformers."):
                    raise ImportError("xformers blocked for this test")
        sys.meta_path.insert(0, Block())
        import torch
        from diasr_diffusers.ops import _xformers_backend as xb, bucketed_attention, select_backend
        q = torch.randn(1, 6, 1, 8)
        assert not xb.xformers_available() and "not installed" in xb.unsupported_reason(q)
        assert select_backend(q) == "torch"
        try:
            bucketed_attention(q, q, q, torch.zeros(1, 6, dtype=torch.long), [2], backend="xformers")
        except RuntimeError as err:
            assert "not installed" in str(err), err
            print("OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


@pytest.mark.skipif(REAL_BIAS is None, reason="xformers is not installed")
def test_merge_equals_xformers_merge_attentions():
    """The backend merges in PyTorch because `fmha.merge_attentions` is a Triton kernel (no use where Triton is
    missing); on CPU it runs under Triton's interpreter, which is enough to check both merges agree."""
    script = textwrap.dedent(
        """
        import torch
        from xformers.ops import fmha
        from diasr_diffusers.ops._xformers_backend import _merge_weights
        g = torch.Generator().manual_seed(0)
        attn = torch.randn(2, 3, 17, 4, 8, generator=g)  # (parts, B, M, H, K)
        lse = torch.randn(2, 3, 4, 17, generator=g)  # (parts, B, H, M)
        lse[1, 0, :, :5] = float("-inf")  # rows the second part has no key for
        want, want_lse = fmha.merge_attentions(attn, lse)
        l, w1, w2 = _merge_weights(lse[0].transpose(1, 2), lse[1].transpose(1, 2))
        got = attn[0] * w1[..., None] + attn[1] * w2[..., None]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l.transpose(1, 2), want_lse, atol=1e-5, rtol=1e-5)
        print("OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_registered():
    assert "xformers" in available_backends()


def _fake_cuda_query(dtype=torch.float16, dim=128):
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(1, 64, 2, dim))


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(ba, "_LOGGED_CHOICES", set())


def test_auto_prefers_triton_then_xformers_then_torch(monkeypatch, fresh_log, caplog):
    asked = []

    def xformers_reason(q, needs_grad=False):
        asked.append(needs_grad)
        return None

    monkeypatch.setattr(ba, "xformers_unsupported_reason", xformers_reason)
    monkeypatch.setattr(ba, "_capturing", lambda q: False)  # CPU-only torch cannot answer for a fake CUDA tensor
    monkeypatch.setattr(ba, "unsupported_reason", lambda q: None)
    assert select_backend(_fake_cuda_query()) == "triton" and asked == []  # xFormers not even probed
    monkeypatch.setattr(ba, "unsupported_reason", lambda q: "the `triton` package is not installed")
    with caplog.at_level(logging.INFO, logger=ba.__name__):
        assert select_backend(_fake_cuda_query()) == "xformers"
        with torch.no_grad():
            assert select_backend(_fake_cuda_query()) == "xformers"
    assert asked == [True, False]  # the backward is checked only when autograd is on
    assert any("uses 'xformers'" in r.getMessage() and "triton" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(ba, "xformers_unsupported_reason", lambda q, needs_grad=False: "no operator for fp16")
    assert select_backend(_fake_cuda_query()) == "torch"
    monkeypatch.setattr(ba, "xformers_unsupported_reason", lambda q, needs_grad=False: 1 / 0)
    assert select_backend(_fake_cuda_query()) == "torch"  # a broken xFormers install never breaks the op
    monkeypatch.setattr(ba, "xformers_unsupported_reason", xformers_reason)
    monkeypatch.setattr(ba, "_capturing", lambda q: True)
    assert select_backend(_fake_cuda_query()) == "torch" and len(asked) == 2  # no self-check inside a graph capture
    assert select_backend(torch.randn(1, 4, 1, 8)) == "torch"  # CPU: never xFormers


def test_unsupported_reason_checks(monkeypatch):
    monkeypatch.setattr(xb, "xformers_available", lambda: False)
    assert "not installed" in xb.unsupported_reason(_fake_cuda_query())
    monkeypatch.setattr(xb, "xformers_available", lambda: True)
    assert "no CPU kernel" in xb.unsupported_reason(torch.randn(1, 4, 1, 8))
    assert "dtype" in xb.unsupported_reason(_fake_cuda_query(torch.float64))


@pytest.mark.parametrize("needs_grad", [False, True])
def test_self_check_passes_on_the_stand_in_and_catches_a_wrong_kernel(monkeypatch, needs_grad):
    with stand_in(monkeypatch, LocalAttnBias, "padded", self_check=True) as fmha:
        q = torch.randn(1, 4, 2, 8)
        assert xb.unsupported_reason(q, needs_grad=needs_grad) is None
        assert ("backward_varlen" in fmha.calls) == needs_grad
        forward = fmha.memory_efficient_attention_forward_requires_grad
        fmha.memory_efficient_attention_forward_requires_grad = lambda *a, **kw: (
            lambda out, lse: (out * 1.01, lse))(*forward(*a, **kw))  # fmt: skip
        reason = xb.unsupported_reason(torch.randn(1, 4, 2, 16), needs_grad=needs_grad)
        assert reason is not None and "differs from the exact backend" in reason
        fmha.memory_efficient_attention_forward_requires_grad = lambda *a, **kw: 1 / 0
        assert "ZeroDivisionError" in xb.unsupported_reason(torch.randn(1, 4, 2, 32), needs_grad=needs_grad)
        # an explicit backend="xformers" refuses a build that fails its self-check, naming why
        with pytest.raises(RuntimeError, match="backend='xformers' cannot run here: .*ZeroDivisionError"):
            q = torch.randn(1, 6, 2, 32, requires_grad=needs_grad)
            bucketed_attention(q, q, q, torch.zeros(1, 6, dtype=torch.long), [2], backend="xformers")


class _NoHostSync:
    """Makes every Python-level device-to-host read (`item`, `tolist`, `bool(t)`, `int(t)`, ...) raise."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        for name in self.NAMES:
            self.monkeypatch.setattr(torch.Tensor, name, self._refuse(name))

    def __exit__(self, *exc):
        self.monkeypatch.undo()

    @staticmethod
    def _refuse(name):
        def refuse(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name}")

        return refuse


def test_packing_reads_nothing_back_to_the_host(monkeypatch):
    """The backend's own work (grouping, packing, merge, backward) never reads a device value on the host; the
    stand-in kernels, like the real ones, get the block starts as a device tensor (their host copy is lazy)."""
    lengths = [3, 0, 5]
    q, k, v, buckets, bias = make_inputs(2, 17, 14, 2, 8, lengths, seed=1)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    shapes = []

    class Recording(StandInFmha):  # computes nothing that needs host values: zeros of the right shapes
        def memory_efficient_attention_forward_requires_grad(self, query, key, value, attn_bias=None, **kw):
            shapes.append(type(attn_bias.q_seqinfo.seqstart_py).__name__ if attn_bias is not None else None)
            m = query.shape[1]
            lse = torch.zeros(query.shape[0], query.shape[2], m) if attn_bias is None else torch.zeros(1, query.shape[2], m)
            return torch.zeros_like(query), lse

        def memory_efficient_attention_backward(self, grad, output, lse, query, key, value, attn_bias=None, **kw):
            return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)

    fmha = Recording(LocalAttnBias)
    monkeypatch.setattr(xb, "_fmha", lambda: fmha)
    with _NoHostSync(monkeypatch):
        out, _ = xb._XFormersBucketedAttention.apply(*leaves[:3], leaves[3], buckets, lengths, 0.3, fmha)
        out.sum().backward()
    assert shapes == [None, "_LazyHostList"]


def test_lazy_host_list_reads_the_device_values():
    starts = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    lazy = xb._LazyHostList(starts)
    assert len(lazy) == 4 and lazy[-1] == 7 and list(lazy) == [0, 3, 3, 7] and lazy == [0, 3, 3, 7]


# ---------------------------------------------------------------------------------------------------------------------
# Real kernels (CUDA + xFormers). Tolerance: FlashAttention's rule, at most 2x the error of the "dense" backend run in
# the same low precision against the fp64 reference, plus a few ulps (that SDPA-based baseline can be near-exact).

needs_xformers_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or REAL_BIAS is None, reason="needs a CUDA device and xformers"
)


@pytest.mark.gpu
@needs_xformers_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["odd_ragged_zero_segment", "no_shared", "all_null", "many_subjects"])
def test_real_kernels_match_reference_on_gpu(name, dtype):
    b, lq, lk, h, d, lengths, buckets = LAYOUTS[name]
    d = 64
    q, k, v, buckets, bias = make_inputs(b, 4 * lq, 3 * lk, h, d, [3 * n for n in lengths], seed=11,
                                         buckets=None if buckets is None else buckets.repeat(1, 4))  # fmt: skip
    lengths = [3 * n for n in lengths]
    ref, ref_grads, g = grads("dense", q, k, v, buckets, lengths, bias)
    low, low_grads, _ = grads("dense", *(t.cuda().to(dtype) for t in (q, k, v)), buckets.cuda(), lengths,
                              bias.cuda().float(), grad_out=g.cuda().to(dtype))  # fmt: skip
    out, got_grads, _ = grads("xformers", *(t.cuda().to(dtype) for t in (q, k, v)), buckets.cuda(), lengths,
                              bias.cuda().float(), grad_out=g.cuda().to(dtype))  # fmt: skip
    assert out.dtype == dtype

    def check(got, lowp, want, what):
        err = (got.double().cpu() - want).abs().max().item()
        base = (lowp.double().cpu() - want).abs().max().item()
        floor = 4 * torch.finfo(dtype).eps * max(1.0, want.abs().max().item())  # a few ulps: SDPA can be near-exact
        assert err <= 2 * base + floor, f"{what}: xformers err {err:.3g} vs plain {dtype} err {base:.3g}"

    check(out, low, ref, "output")
    for what, got, lowp, want in zip(["query", "key", "value", "segment_bias"], got_grads, low_grads, ref_grads):
        check(got, lowp, want, f"grad of {what}")


@pytest.mark.gpu
@needs_xformers_gpu
def test_real_kernels_self_check_and_no_sync_on_gpu():
    q = torch.randn(1, 256, 4, 128, device="cuda", dtype=torch.bfloat16)
    assert xb.unsupported_reason(q, needs_grad=True) is None
    k = torch.randn(1, 256 + 40, 4, 128, device="cuda", dtype=torch.bfloat16)
    buckets = torch.randint(-1, 2, (1, 256), device="cuda")
    xb.xformers_bucketed_attention(q, k, k, buckets, [15, 25], scale=0.1)  # warm (caches the small tables)
    torch.cuda.set_sync_debug_mode("error")
    try:
        xb.xformers_bucketed_attention(q, k, k, buckets, [15, 25], scale=0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@needs_xformers_gpu
def test_nan_in_one_segment_stays_in_its_bucket_on_gpu():
    # Not testable with the dense CPU stand-in (its P @ V multiplies masked zeros by every value): the real
    # block-diagonal kernels never read another block's keys.
    lengths = [8, 8]
    q, k, v, buckets, _ = make_inputs(1, 64, 32, 2, 64, lengths, seed=5, null_frac=0.3, dtype=torch.float16)
    v = v.clone()
    v[0, 16 + 8] = float("nan")  # segment 1's first value
    out = bucketed_attention(q.cuda(), k.cuda(), v.cuda(), buckets.cuda(), lengths, backend="xformers").cpu()
    poisoned = buckets[0] == 1
    assert out[0, poisoned].isnan().all() and out[0, ~poisoned].isfinite().all()


# ---------------------------------------------------------------------------------------------------------------------
# Item 3: `pipe.enable_xformers_memory_efficient_attention()` / `transformer.set_attention_backend("xformers")` on every
# DiasR pipeline keep routing; stock paths go to Diffusers' xFormers backend, routed attention to backend="xformers".
# On CPU, Diffusers' xFormers paths are emulated with SDPA and ours with the stand-in; the output must not change.


def _family_pipelines():
    import numpy as np

    from diasr_diffusers.pipelines import (
        DiasRCogVideoXPipeline,
        DiasRHunyuanVideo15Pipeline,
        DiasRLTXPipeline,
        DiasRPipeline,
    )
    from diasr_diffusers.utils import tiny

    rs = np.random.RandomState(0)
    images = [rs.rand(24, 20, 3).astype(np.float32), rs.rand(20, 30, 3).astype(np.float32)]
    common = dict(num_inference_steps=1, output_type="pt", subject_images=images, routing="similarity")
    return {
        "wan": (lambda: DiasRPipeline(**tiny.tiny_wan_components()),
                dict(common, prompt="a man and a woman", height=32, width=32, num_frames=5, guidance_scale=1.0)),
        "ltx": (lambda: DiasRLTXPipeline(**tiny.tiny_ltx_components()),
                dict(common, prompt="a man and a woman", height=64, width=64, num_frames=9, guidance_scale=1.0)),
        "cogvideox": (lambda: DiasRCogVideoXPipeline(**tiny.tiny_cogvideox_components()),
                      dict(common, prompt="a man and a woman", height=32, width=32, num_frames=9, guidance_scale=1.0,
                           max_sequence_length=16)),
        "hunyuan_video15": (
            lambda: tiny.configure_tiny_hunyuan_video15(
                DiasRHunyuanVideo15Pipeline(**tiny.tiny_hunyuan_video15_components())),
            dict(common, prompt="a man and a woman", height=32, width=32, num_frames=5, guidance_scale=1.0,
                 max_sequence_length=24)),
    }  # fmt: skip


def _sdpa_like_xformers(query, key, value, attn_bias=None, op=None, scale=None, **kwargs):
    """What Diffusers' `XFormersAttnProcessor` asks of `xformers.ops.memory_efficient_attention`, on CPU."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias, scale=scale)


@contextlib.contextmanager
def _diffusers_xformers_on_cpu(monkeypatch):
    """Let Diffusers enable and run its xFormers paths on CPU: availability checks pass, its one-off CUDA probe is
    skipped, and its xFormers attention computes SDPA (same numbers). Restores Diffusers' global backend after."""
    import diffusers.models.attention as attention
    import diffusers.models.attention_dispatch as dispatch
    import diffusers.models.attention_processor as legacy

    fake = SimpleNamespace(ops=SimpleNamespace(memory_efficient_attention=_sdpa_like_xformers))
    registry = dispatch._AttentionBackendRegistry
    with monkeypatch.context() as m:
        for module in (attention, legacy):
            m.setattr(module, "is_xformers_available", lambda: True)
        m.setattr(attention, "xops", fake, raising=False)
        m.setattr(legacy, "xformers", fake, raising=False)
        m.setattr(dispatch, "_CAN_USE_XFORMERS_ATTN", True)
        m.setitem(registry._backends, dispatch.AttentionBackendName.XFORMERS,
                  registry._backends[dispatch.AttentionBackendName.NATIVE])  # fmt: skip
        m.setattr(registry, "_active_backend", registry._active_backend)  # restored on exit
        # Only while enabling: Diffusers refuses CPU-only torch, then probes xFormers on a `device="cuda"` tensor.
        randn = torch.randn
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch, "randn", lambda *a, device=None, **kw: randn(*a, **kw))
        yield m


@pytest.mark.parametrize("how", ["enable_xformers", "set_attention_backend"])
@pytest.mark.parametrize("family", ["wan", "ltx", "cogvideox", "hunyuan_video15"])
def test_pipelines_keep_routing_under_diffusers_xformers(monkeypatch, family, how):
    from diffusers.models.attention_dispatch import AttentionBackendName

    make, kwargs = _family_pipelines()[family]
    torch.manual_seed(0)
    pipe = make()
    pipe.set_progress_bar_config(disable=True)
    want = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames

    randn = torch.randn
    with _diffusers_xformers_on_cpu(monkeypatch) as m:
        if how == "enable_xformers":
            pipe.enable_xformers_memory_efficient_attention()
        else:
            pipe.transformer.set_attention_backend("xformers")
        m.setattr(torch.cuda, "is_available", lambda: False)
        m.setattr(torch, "randn", randn)
        with stand_in(monkeypatch, LocalAttnBias) as fmha:
            got = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
        routed = [p for name, p in pipe.transformer.attn_processors.items()
                  if pipe._processor_prefix is None or name.startswith(pipe._processor_prefix)]  # fmt: skip
    assert routed and all(isinstance(p, pipe._processor_class) and p.state is pipe.routing_state for p in routed)
    assert all(p._attention_backend == AttentionBackendName.XFORMERS for p in routed)
    assert "forward_varlen" in fmha.calls  # routed attention ran backend="xformers"
    assert pipe.routing_state.op_backend == "xformers" and pipe.routing_state.backend == "auto"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if how == "enable_xformers":
        pipe.disable_xformers_memory_efficient_attention()
        routed = [p for name, p in pipe.transformer.attn_processors.items()
                  if pipe._processor_prefix is None or name.startswith(pipe._processor_prefix)]  # fmt: skip
        assert all(isinstance(p, pipe._processor_class) and p._attention_backend is None for p in routed)


def test_an_explicit_routing_backend_wins_over_diffusers_xformers():
    from diasr_diffusers.processors import SubjectRoutingState

    state = SubjectRoutingState(ref_lengths=[2], backend="torch")
    state._xformers_caller = True
    assert state.op_backend == "torch"
    state.backend = "auto"
    assert state.op_backend == "xformers"
    state._xformers_caller = False
    assert state.op_backend == "auto"


def test_reinstalling_after_diffusers_xformers_swap_keeps_xformers(monkeypatch):
    """`transformer.enable_xformers_memory_efficient_attention()` on a legacy-`Attention` model (CogVideoX) swaps in
    Diffusers' `XFormersAttnProcessor`; installing the routed processors again keeps the xFormers choice."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.attention_processor import XFormersAttnProcessor

    from diasr_diffusers.processors import (
        CogVideoXSubjectSparseAttnProcessor,
        set_cogvideox_subject_sparse_attn_processor,
    )
    from diasr_diffusers.utils.tiny import tiny_cogvideox_components

    transformer = tiny_cogvideox_components()["transformer"]
    state = set_cogvideox_subject_sparse_attn_processor(transformer)
    with _diffusers_xformers_on_cpu(monkeypatch):
        transformer.enable_xformers_memory_efficient_attention()
    assert all(isinstance(p, XFormersAttnProcessor) for p in transformer.attn_processors.values())
    set_cogvideox_subject_sparse_attn_processor(transformer, state)
    processors = list(transformer.attn_processors.values())
    assert all(isinstance(p, CogVideoXSubjectSparseAttnProcessor) for p in processors)
    assert all(p._attention_backend == AttentionBackendName.XFORMERS for p in processors)
