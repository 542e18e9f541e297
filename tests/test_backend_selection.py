"""backend="auto" selection, logging once, and the fallbacks when Triton is missing or unsupported."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diasr_diffusers.ops import available_backends, bucketed_attention, select_backend
from diasr_diffusers.ops import triton as triton_backend

ROOT = Path(__file__).resolve().parents[1]
# The module object (the package re-exports the function under the same name).
ba = sys.modules["diasr_diffusers.ops.bucketed_attention"]


def _fake_cuda_query(dtype=torch.float16, dim=128):
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(1, 64, 2, dim))


@pytest.fixture(autouse=True)
def _fresh_log_state(monkeypatch):
    monkeypatch.setattr(ba, "_LOGGED_CHOICES", set())


def test_backends_registered():
    assert {"auto", "torch", "dense", "triton", "flex"} <= set(available_backends())
    with pytest.raises(ValueError, match="triton"):
        bucketed_attention(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4),
                           torch.zeros(1, 3, dtype=torch.long), [1], backend="cuda")  # fmt: skip


def test_cpu_tensors_use_torch_even_under_interpreter(monkeypatch):
    monkeypatch.setattr(triton_backend, "interpreter_enabled", lambda: True)
    assert select_backend(torch.randn(1, 4, 1, 8)) == "torch"


def test_cuda_supported_picks_triton(monkeypatch):
    monkeypatch.setattr(ba, "unsupported_reason", lambda q: None)
    assert select_backend(_fake_cuda_query()) == "triton"


@pytest.mark.parametrize("behaviour", ["reason", "raises"])
def test_cuda_unsupported_falls_back_to_torch(monkeypatch, behaviour):
    def probe(q):
        if behaviour == "raises":
            raise RuntimeError("driver exploded")
        return "GPU compute capability 7.x < 8.0"

    monkeypatch.setattr(ba, "unsupported_reason", probe)
    assert select_backend(_fake_cuda_query()) == "torch"


def test_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(ba, "unsupported_reason", lambda q: None)
    with caplog.at_level(logging.INFO, logger=ba.__name__):
        for _ in range(3):
            select_backend(_fake_cuda_query())
        select_backend(torch.randn(1, 4, 1, 8))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("uses 'triton'" in m for m in messages) == 1
    assert sum("uses 'torch'" in m for m in messages) == 1


def test_unsupported_reason_checks(monkeypatch):
    monkeypatch.setattr(triton_backend, "triton_available", lambda: True)
    monkeypatch.setattr(triton_backend, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(triton_backend, "_capability_major", lambda device: 9)
    assert triton_backend.unsupported_reason(_fake_cuda_query()) is None
    assert triton_backend.unsupported_reason(_fake_cuda_query(torch.bfloat16, 64)) is None
    assert "dtype" in triton_backend.unsupported_reason(_fake_cuda_query(torch.float64))
    assert "head dim" in triton_backend.unsupported_reason(_fake_cuda_query(dim=512))
    monkeypatch.setattr(triton_backend, "_capability_major", lambda device: 7)
    assert "compute capability" in triton_backend.unsupported_reason(_fake_cuda_query())
    monkeypatch.setattr(triton_backend, "triton_available", lambda: False)
    assert "not installed" in triton_backend.unsupported_reason(_fake_cuda_query())


def test_auto_on_cpu_matches_torch_backend():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 30, 2, 16, generator=g), torch.randn(2, 25, 2, 16, generator=g)
    buckets = torch.randint(-1, 2, (2, 30), generator=g)
    auto = bucketed_attention(q, k, k, buckets, [4, 6])
    torch.testing.assert_close(auto, bucketed_attention(q, k, k, buckets, [4, 6], backend="torch"), atol=0, rtol=0)


def test_works_without_triton_installed():
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked for this test")
        sys.meta_path.insert(0, Block())
        import torch
        import diasr_diffusers
        from diasr_diffusers.ops import bucketed_attention, select_backend
        q = torch.randn(1, 6, 1, 8)
        out = bucketed_attention(q, q, q, torch.zeros(1, 6, dtype=torch.long), [2])
        assert out.shape == q.shape and select_backend(q) == "torch"
        try:
            bucketed_attention(q, q, q, torch.zeros(1, 6, dtype=torch.long), [2], backend="triton")
        except RuntimeError as err:
            assert "needs the `triton` package" in str(err), err
            print("OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_select_backend_traces_under_fullgraph_compile():
    # First call for this key happens while tracing: the one-time log must not break the graph.
    def fn(q):
        return q * (2.0 if select_backend(q) == "torch" else 3.0)

    q = torch.randn(4)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(q), q * 2.0)
