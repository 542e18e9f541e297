"""Triton backend of ``bucketed_attention`` (forward + backward kernels, ``torch.library`` custom op).

Triton is imported lazily: ``import diasr_diffusers`` works without it, and only ``backend="triton"`` (or ``"auto"``
on a CUDA tensor) loads the kernels. On CPU tensors the kernels run only under Triton's interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before the kernels are defined, i.e. before ``diasr_diffusers`` is imported
(safest) or at least before the first Triton call.
"""

from __future__ import annotations

import os
import sys

import torch

_KERNELS_MODULE = __name__ + "._op"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


_AVAILABLE: bool | None = None


def triton_available() -> bool:
    """True when ``import triton`` works (probed once)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import triton  # noqa: F401

            _AVAILABLE = True
        except Exception:  # ImportError, or a broken install raising something else at import time
            _AVAILABLE = False
    return _AVAILABLE


def interpreter_enabled() -> bool:
    """Whether the kernels are (or, once loaded, will be) defined for Triton's CPU interpreter."""
    op = sys.modules.get(_KERNELS_MODULE)
    if op is not None:  # already decorated: the env var no longer matters
        return op.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_CAPABILITY: dict[int, int] = {}


def _capability_major(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)[0]
    return _CAPABILITY[index]


def unsupported_reason(query: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take tensors like ``query`` (B, Lq, H, D) on this machine; ``None`` if they can.

    CPU tensors count as supported only under the interpreter.
    """
    if not triton_available():
        return "the `triton` package is not installed (pip install 'diasr-diffusers[triton]', Linux only)"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not supported (fp16, bf16, fp32)"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} > {MAX_HEAD_DIM}"
    if query.device.type == "cuda":
        if interpreter_enabled():
            return "TRITON_INTERPRET=1 is set, so the kernels were built for the CPU interpreter"
        major = _capability_major(query.device)
        if major < 8:  # Triton's tensor-core paths (and bf16) are only maintained for Ampere and newer
            return f"GPU compute capability {major}.x < 8.0"
        return None
    if query.device.type == "cpu":
        if not interpreter_enabled():
            return "CPU tensors need TRITON_INTERPRET=1"
        return None
    return f"device type {query.device.type!r} is not supported"


def triton_bucketed_attention(
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
    """``bucketed_attention`` backend running the Triton kernels (see :mod:`._kernels` for the design)."""
    if torch.compiler.is_compiling():  # probed in eager already; keep the traced graph free of host-side checks
        from ._op import triton_bucketed_attention_impl

        return triton_bucketed_attention_impl(
            query, key, value, query_buckets, segment_lengths, scale=scale, segment_bias=segment_bias,
            return_lse=return_lse,
        )  # fmt: skip
    if not triton_available():
        raise RuntimeError(
            "backend='triton' needs the `triton` package (pip install 'diasr-diffusers[triton]', Linux only); "
            "use backend='torch' or 'auto' instead"
        )
    if query.device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError(
            "backend='triton' got CPU tensors, but Triton kernels only run on CPU under its interpreter: set the "
            "environment variable TRITON_INTERPRET=1 before importing diasr_diffusers (e.g. "
            "`TRITON_INTERPRET=1 python ...`), or use backend='torch' on CPU"
        )
    reason = unsupported_reason(query)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run here: {reason}; use backend='torch' or 'auto'")
    from ._op import triton_bucketed_attention_impl

    return triton_bucketed_attention_impl(
        query, key, value, query_buckets, segment_lengths, scale=scale, segment_bias=segment_bias, return_lse=return_lse
    )


__all__ = ["interpreter_enabled", "triton_available", "triton_bucketed_attention", "unsupported_reason"]
