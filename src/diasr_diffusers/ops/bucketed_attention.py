"""Subject-sparse bucketed attention: the exact op behind DiasR's routing.

Keys are laid out as ``[shared | segment 0 | segment 1 | ... | segment N-1]``. A query in bucket ``s`` sees the
shared keys plus segment ``s``; a query in bucket ``-1`` sees the shared keys only. In a video transformer the
shared keys are the video tokens and segment ``s`` holds subject ``s``'s reference tokens (self-attention), or
the shared keys are the general prompt tokens and segment ``s`` holds subject ``s``'s phrase tokens
(cross-attention).

This module is the thin public interface: argument checks and backend dispatch. Backends live next to it:

* ``"torch"`` (:mod:`._torch_backend`): portable and exact; one SDPA call per (sample, bucket) group, never an
  ``Lq x Lk`` mask or score matrix.
* ``"dense"`` (:mod:`._dense_backend`): the reference, for tests: an explicit ``Lq x Lk`` visibility mask, SDPA
  over exactly the keys each query sees.
* ``"triton"`` (:mod:`.triton`): fused forward/backward kernels, a ``torch.library`` custom op (``torch.compile``
  and CUDA-graph friendly). CUDA, or CPU under ``TRITON_INTERPRET=1`` (for tests). Triton is imported lazily.
* ``"flex"`` (:mod:`._flex_backend`): PyTorch FlexAttention with a bucket ``mask_mod``; forward-only on CPU.
* ``"xformers"`` (:mod:`._xformers_backend`): xFormers' memory-efficient kernels (one dense call for the shared keys,
  one block-diagonal variable-length call for the segments, merged through the log-sum-exps). CUDA only.

``"auto"`` picks ``"triton"`` on CUDA tensors when Triton imports and supports the GPU/dtype/head dim, else
``"xformers"`` when xFormers is installed and passes its one-time self-check for the GPU/dtype/head dim, else
``"torch"``; the choice is logged once per distinct outcome.

Checked and trusted calls: by default the op validates its arguments, and the bucket range check reads one value
back to the host (a device sync on a GPU). Callers that produce valid buckets themselves (the routing processors,
whose buckets are checked where the router, the masks or the routing state make them) pass ``check_inputs=False``:
no argument checks and no host read in the op or in the sync-free backends (see :func:`bucketed_attention`).
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence, Set

import torch

from ._common import empty_lse, zeros_output
from ._dense_backend import dense_bucketed_attention
from ._flex_backend import flex_bucketed_attention
from ._torch_backend import torch_bucketed_attention
from ._xformers_backend import unsupported_reason as xformers_unsupported_reason
from ._xformers_backend import xformers_bucketed_attention
from .triton import triton_bucketed_attention, unsupported_reason

logger = logging.getLogger(__name__)

BackendFn = Callable[..., torch.Tensor]

_BACKENDS: dict[str, BackendFn] = {
    "torch": torch_bucketed_attention,
    "dense": dense_bucketed_attention,
    "triton": triton_bucketed_attention,
    "flex": flex_bucketed_attention,
    "xformers": xformers_bucketed_attention,
}
# Capabilities by backend name. A backend registered without them takes the base call only
# (query, key, value, buckets, lengths, *, scale, segment_bias).
_LSE_BACKENDS: set[str] = {"torch", "dense", "triton", "flex"}  # accept return_lse=True
_SYNC_FREE_BACKENDS: set[str] = {"torch", "dense"}  # take sync_free=True on the trusted path (the others never sync)
_LOGGED_CHOICES: set[tuple[str, str, str | None]] = set()


def available_backends() -> list[str]:
    """Names accepted by ``bucketed_attention(..., backend=...)``, ``"auto"`` included."""
    return ["auto", *_BACKENDS]


def register_backend(name: str, fn: BackendFn, *, supports_lse: bool = False) -> None:
    """Register an extra backend.

    ``fn(query, key, value, query_buckets, segment_lengths, *, scale, segment_bias)`` returns the ``(B, Lq, H, D)``
    output; with ``supports_lse=True`` it also takes ``return_lse`` and then returns ``(out, lse)``, lse ``(B, Lq, H)``.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"`name` must be a non-empty string other than 'auto', got {name!r}")
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}")
    _BACKENDS[name] = fn
    _SYNC_FREE_BACKENDS.discard(name)
    (_LSE_BACKENDS.add if supports_lse else _LSE_BACKENDS.discard)(name)


def select_backend(query: torch.Tensor) -> str:
    """The backend ``"auto"`` resolves to for tensors like ``query`` (B, Lq, H, D).

    ``"triton"`` on CUDA tensors when Triton is importable and supports the GPU, dtype and head dim; else ``"xformers"``
    when xFormers is importable and passes its self-check there (forward and, with autograd on, backward); otherwise
    ``"torch"``. Never raises on a tensor: any problem probing Triton or xFormers means the next backend.
    """
    if not all(hasattr(query, a) for a in ("device", "dtype", "shape")):
        raise TypeError(f"`query` must be a torch.Tensor, got {type(query).__name__}")
    choice, reason = "torch", "not a CUDA tensor"
    if query.device.type == "cuda":
        try:
            triton_reason = unsupported_reason(query)
        except Exception as err:  # a broken Triton/driver install must not break the op
            triton_reason = f"probing Triton failed ({type(err).__name__}: {err})"
        reason = f"Triton: {triton_reason}"
        if triton_reason is None:
            choice, reason = "triton", None
        elif not torch.compiler.is_compiling():  # eager only: its self-check runs kernels and syncs
            try:
                if _capturing(query):
                    xformers_reason = "not probed while a CUDA graph is being captured"
                else:
                    xformers_reason = xformers_unsupported_reason(query, needs_grad=torch.is_grad_enabled())
            except Exception as err:
                xformers_reason = f"probing xFormers failed ({type(err).__name__}: {err})"
            if xformers_reason is None:
                choice = "xformers"
            else:
                reason += f"; xFormers: {xformers_reason}"
    key = (choice, query.device.type, reason)
    if key not in _LOGGED_CHOICES and not torch.compiler.is_compiling():  # logging is not traceable
        _LOGGED_CHOICES.add(key)
        suffix = f" ({reason})" if reason else ""
        logger.info("bucketed_attention: backend='auto' uses %r on %s%s", choice, query.device, suffix)
    return choice


def _capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured: the bucket range check would sync the host, which is illegal."""
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_segment_lengths(segment_lengths: Sequence[int]) -> list[int]:
    """Exact non-negative ints: ``int()`` would truncate 2.7 to 2 and take ``True`` or ``"3"`` as lengths."""
    unordered = isinstance(segment_lengths, (Set, Mapping))  # a set would silently reorder the segments
    if isinstance(segment_lengths, (str, bytes)) or unordered or not isinstance(segment_lengths, Iterable):
        raise ValueError(f"`segment_lengths` must be a sequence of ints, got {type(segment_lengths).__name__}")
    if getattr(segment_lengths, "ndim", 1) != 1:  # tensors and arrays
        raise ValueError(f"`segment_lengths` must be 1-D, got shape {tuple(segment_lengths.shape)}")
    lengths = []
    for n in segment_lengths:
        try:
            if isinstance(n, bool) or (isinstance(n, torch.Tensor) and n.dtype == torch.bool):
                raise TypeError
            lengths.append(operator.index(n))
        except TypeError:
            raise ValueError(f"`segment_lengths` must be a sequence of ints, got {segment_lengths!r}") from None
    if any(n < 0 for n in lengths):
        raise ValueError(f"`segment_lengths` must be non-negative, got {lengths}")
    return lengths


def _check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5 if head_dim > 0 else 1.0  # head dim 0 gives an empty output: any scale will do
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"`scale` must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        # Some fused kernels read a non-finite scale as "use the default" and would return plausible numbers.
        raise ValueError(f"`scale` must be a finite number > 0 or None, got {scale}")
    return float(scale)


def _check_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_buckets: torch.Tensor,
    segment_lengths: Sequence[int],
    segment_bias: torch.Tensor | None,
) -> list[int]:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"`{name}` must have shape (B, L, H, D), got shape {tuple(t.shape)}")
    if key.shape != value.shape:
        raise ValueError(
            f"`key` and `value` must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    (b, lq, h, d), (bk, lk, hk, dk) = query.shape, key.shape
    if (b, h, d) != (bk, hk, dk):
        raise ValueError(
            f"`query` {tuple(query.shape)} and `key` {tuple(key.shape)} must agree on batch, heads and head dim "
            "(layout (B, L, H, D))"
        )
    if not query.dtype.is_floating_point or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"`query`, `key`, `value` must share one floating dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not isinstance(query_buckets, torch.Tensor) or query_buckets.shape != (b, lq):
        shape = tuple(query_buckets.shape) if isinstance(query_buckets, torch.Tensor) else type(query_buckets).__name__
        raise ValueError(f"`query_buckets` must be a tensor of shape (B, Lq) = {(b, lq)}, got {shape}")
    if query_buckets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"`query_buckets` must be int64 (or int32), got {query_buckets.dtype}")
    if segment_bias is not None:
        if not isinstance(segment_bias, torch.Tensor) or segment_bias.shape != (b, lq):
            shape = (
                tuple(segment_bias.shape) if isinstance(segment_bias, torch.Tensor) else type(segment_bias).__name__
            )
            raise ValueError(f"`segment_bias` must be a tensor of shape (B, Lq) = {(b, lq)}, got {shape}")
        if not segment_bias.dtype.is_floating_point:
            raise ValueError(f"`segment_bias` must be a floating tensor, got {segment_bias.dtype}")
    # Every backend indexes one tensor with another: a device mismatch would fail deep inside torch.
    for name, t in (("key", key), ("value", value), ("query_buckets", query_buckets), ("segment_bias", segment_bias)):
        if t is not None and t.device != query.device:
            raise ValueError(f"`{name}` is on {t.device} but `query` is on {query.device}; use one device")
    lengths = _check_segment_lengths(segment_lengths)
    if sum(lengths) > lk:
        raise ValueError(f"`segment_lengths` sum to {sum(lengths)} but `key` has only Lk = {lk} tokens")
    if query_buckets.numel() and not torch.compiler.is_compiling() and not _capturing(query):
        lo, hi = torch.aminmax(query_buckets)  # one host sync for both bounds
        lo, hi = torch.stack([lo, hi]).tolist()
        if lo < -1 or hi >= len(lengths):
            raise ValueError(
                f"`query_buckets` must lie in [-1, {len(lengths)}) for {len(lengths)} segments, got values in [{lo}, {hi}]"
            )
    return lengths


def bucketed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_buckets: torch.Tensor,
    segment_lengths: Sequence[int],
    *,
    scale: float | None = None,
    segment_bias: torch.Tensor | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    check_inputs: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention where each query sees the shared keys plus the private segment of its bucket.

    Args:
        query: ``(B, Lq, H, D)``.
        key, value: ``(B, Lk, H, D)``, laid out as ``[shared | segment 0 | ... | segment N-1]``; the shared part
            has ``Lk - sum(segment_lengths)`` tokens (may be 0).
        query_buckets: ``(B, Lq)`` int64 in ``[-1, N)``. Bucket ``s`` sees shared + segment ``s``; ``-1`` sees
            shared keys only. A query with no visible key returns zeros.
        segment_lengths: ``N`` non-negative ints (zeros allowed), the same for every sample.
        scale: finite softmax scale; defaults to ``1 / sqrt(D)``.
        segment_bias: optional ``(B, Lq)`` float added to the logits of the query's own segment keys (not the shared
            keys). Passing the router's log-probability of the chosen bucket, e.g. ``logp - logp.detach()``
            (straight-through: the forward is unchanged), lets gradients reach a router whose forward is hard.
        backend: ``"auto"`` (best available, see :func:`select_backend`), ``"torch"``, ``"triton"``, ``"xformers"``,
            ``"flex"`` or ``"dense"`` (reference, materialises the mask).
        return_lse: also return the natural log-sum-exp of each query's logits over its visible keys (segment bias
            included), ``(B, Lq, H)``, fp32 (fp64 for fp64 inputs), ``-inf`` for a query that sees no key. With it,
            partial results over disjoint key sets merge exactly (:func:`~diasr_diffusers.ops.merge_attention_partials`,
            ring attention). Gradients through the output stay exact on every backend; the LSE itself is
            differentiable on ``"triton"`` and ``"dense"`` and a constant (``requires_grad=False``) on ``"torch"``,
            whose fused kernels do not differentiate it; ``"flex"`` has no backward on CPU.
        check_inputs: ``False`` is the trusted path for callers that guarantee valid arguments (buckets in
            ``[-1, N)``, shapes, dtypes, devices, a valid ``scale``, ``segment_lengths`` a list of Python ints): no
            checks and no value read back to the host. The ``"triton"``, ``"flex"`` and ``"dense"`` backends then
            read nothing back (``"dense"`` switches to its masked form; shown on CPU by the tests, on a GPU by
            ``benchmarks/gpu_check.sh`` under ``torch.cuda.set_sync_debug_mode("error")``). ``"torch"`` does not sync without autograd on a
            GPU (its static route, at ``Lq * sum(R_s)`` segment FLOPs); with autograd it reads its group sizes on the
            host (one sync per call), and on CPU it keeps its faster grouped routes (a CPU host read is no device
            sync). Invalid arguments here give wrong results or errors from deep inside torch.

    Returns:
        ``(B, Lq, H, D)``, the dtype of ``query`` (and the LSE with ``return_lse=True``). Any strides are accepted
        (views, expanded tensors). Empty sizes give an empty (or, without keys, all-zero) result. A NaN/inf in a key or
        value reaches only the queries that see it (except for a value under ``"flex"`` on CPU, whose eager ``P @ V``
        multiplies masked zeros by every value, and on the sync-free routes, see the backends' notes).

    Example:
        >>> q = torch.randn(1, 10, 2, 8); k = v = torch.randn(1, 7, 2, 8)  # 4 shared keys, segments of 2 and 1
        >>> buckets = torch.tensor([[0, 1, -1, 0, 1, 1, -1, 0, 0, 1]])
        >>> bucketed_attention(q, k, v, buckets, [2, 1]).shape
        torch.Size([1, 10, 2, 8])
    """
    if check_inputs:
        if not isinstance(backend, str) or (backend != "auto" and backend not in _BACKENDS):
            raise ValueError(f"Unknown `backend` {backend!r}; expected one of {available_backends()}")
        lengths = _check_inputs(query, key, value, query_buckets, segment_lengths, segment_bias)
        scale = _check_scale(scale, query.shape[-1])
    else:
        lengths = list(segment_lengths)
        scale = float(scale) if scale is not None else (query.shape[-1] ** -0.5 if query.shape[-1] else 1.0)
    if backend == "auto":
        backend = select_backend(query)
    if return_lse and backend not in _LSE_BACKENDS:
        raise ValueError(f"`return_lse=True` is not supported by backend {backend!r}; use one of {sorted(_LSE_BACKENDS)}")
    # Empty sizes never reach a backend: the CPU flash kernel dies with SIGFPE on H = 0 and FlexAttention fails on
    # B = 0 or Lk = 0. Without keys every query sees nothing, so the output is zeros.
    if query.numel() == 0 or key.shape[1] == 0:
        out = zeros_output(query, key, value, segment_bias)
        return (out, empty_lse(query)) if return_lse else out
    extra = {}
    if return_lse:
        extra["return_lse"] = True
    if not check_inputs and backend in _SYNC_FREE_BACKENDS:
        extra["sync_free"] = True
    query_buckets = query_buckets.long()
    return _BACKENDS[backend](query, key, value, query_buckets, lengths, scale=scale, segment_bias=segment_bias, **extra)
