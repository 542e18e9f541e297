"""Subject-sparse attention across devices, on Diffusers' own parallelism (``transformer.enable_parallelism``).

**Context parallelism (Ulysses).** Diffusers' ``_cp_plan`` splits the ``[video | ref_0 | ... | ref_{N-1}]`` sequence
(and the rotary tables) across the ranks before the first block and gathers the output after the last one; every
attention processor sees its rank's rows only. With subjects active, :func:`context_parallel_routed_self_attention`:

1. routes this rank's video tokens against the *whole* references: the reference rows the router (hidden states)
   or the similarity router (pre-rotary keys) needs are all-gathered (they are a small part of the sequence), and the
   routing logits of all ``Lv`` video tokens are all-gathered, so every rank holds the same buckets and the same
   recorded maps as one process would;
2. exchanges sequence for heads with Diffusers' Ulysses all-to-all (each rank then holds the whole sequence for
   ``H / P`` heads) and runs :func:`~.core.routed_self_attention` unchanged; exchanges back.

Routed text cross-attention needs no communication: the text is whole on every rank, and this rank's queries take
their rows of the gathered buckets. Lengths that do not divide the world size: Diffusers' equal split refuses them,
so pass ``ContextParallelConfig(ulysses_degree=P, ulysses_anything=True)`` (uneven rows per rank, forward only, as in
Diffusers); :func:`check_context_parallel_inputs` says so before any work.

**Ring attention** (``ContextParallelConfig(ring_degree=R)``, and ring x Ulysses with ``ulysses_degree=U`` too): the
routing is step 1 above, unchanged; the attention runs inside Diffusers' own ring (``TemplatedRingAttention``, and
for ring x Ulysses its Ulysses all-to-all around it), with :class:`RoutedRingChunks` as the per-chunk forward and
backward ops in place of a dense kernel's. Each ring chunk of keys is a contiguous slice of
``[video | ref_0 | ... | ref_{N-1}]`` and therefore itself in the op's ``[shared | segment_0 | ...]`` layout (with
some segments, or the shared part, empty): its segment lengths follow from its row range alone, so the bucket ids of
the keys need not travel with the key/value shards. Each step returns
``bucketed_attention(..., return_lse=True)``'s output and log-sum-exp, which Diffusers' ring merges. Unrouted
self-attention under ring, where Diffusers' attention backend cannot ring (its default, SDPA, returns no log-sum-exp),
runs the same ops with no segments (:func:`context_parallel_attention`). See ``docs/distributed.md``.

**Tensor parallelism** shards each attention's heads (``to_q``/``to_k``/``to_v`` column-wise, as DTensors). The
similarity router averages over heads, so each rank would route differently: :func:`heads_group` finds the group the
heads are sharded over and :func:`~.core.similarity_logits` all-reduces the per-head sum over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .._diffusers_compat import (
    context_parallel_config,
    flattened_group,
    functional_collectives,
    gather_size_by_comm,
    heads_to_seq,
    parallel_config_of,
    ring_rank,
    seq_to_heads,
    templated_ring_attention,
    ulysses_group,
)
from ..ops import bucketed_attention, select_backend
from .core import (
    SubjectRoutingState,
    check_processors_before_parallelism,
    heads_group,
    route_video_tokens,
    routed_cross_attention,
    routed_self_attention,
    subject_of_reference_tokens,
)

# Defined in core.py / _diffusers_compat.py (core must not import this module); kept here as public names.
__all__ = [
    "RING_BACKENDS",
    "RING_UNSUPPORTED",
    "RoutedRingChunks",
    "SequenceShard",
    "check_context_parallel_inputs",
    "check_processors_before_parallelism",
    "context_parallel_attention",
    "context_parallel_config",
    "context_parallel_routed_cross_attention",
    "context_parallel_routed_self_attention",
    "heads_group",
    "needs_own_ring",
    "ulysses_routed_cross_attention",
    "ulysses_routed_self_attention",
]

# `bucketed_attention` backends that return the log-sum-exp a ring step needs.
RING_BACKENDS = ("torch", "triton", "flex", "dense")
# Backends whose log-sum-exp is differentiable: the ring's backward recomputes each step through them (the others'
# steps are recomputed with "dense", the exact reference, so the gradients stay exact).
_LSE_GRAD_BACKENDS = ("triton", "dense")

RING_UNSUPPORTED = (
    "ring attention with subjects active (`ContextParallelConfig(ring_degree > 1)`) merges the steps of the ring "
    f"through `bucketed_attention(..., return_lse=True)`, which backends {list(RING_BACKENDS)} support"
)


def _gather_rows(part: torch.Tensor, counts: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate along dim 1 the ``counts[r]`` rows each rank ``r`` holds (the same result on every rank).

    Rows are padded to the longest share so the all-gather has equal shapes (gloo refuses uneven ones);
    differentiable: the backward hands every rank the gradient of its own rows.
    """
    longest = max(counts)
    if part.shape[1] < longest:
        part = torch.cat([part, part.new_zeros((part.shape[0], longest - part.shape[1], *part.shape[2:]))], dim=1)
    gathered = functional_collectives().all_gather_tensor_autograd(part.contiguous(), gather_dim=1, group=group)
    return torch.cat([p[:, :n] for p, n in zip(gathered.split(longest, dim=1), counts)], dim=1)


@dataclass
class SequenceShard:
    """This rank's rows of the ``[video | refs]`` sequence under Diffusers' context-parallel split.

    ``sizes``: rows held by each rank (Diffusers' order); ``rank``: this rank's index in them; ``num_video_tokens``:
    ``Lv`` of the whole sequence. Implements :class:`~.core.VideoShard` for :func:`~.core.route_video_tokens`.
    """

    sizes: list[int]
    rank: int
    num_video_tokens: int
    config: Any  # the ContextParallelConfig

    @classmethod
    def build(cls, config: Any, local_length: int, num_ref_tokens: int) -> SequenceShard:
        group = flattened_group(config)
        world = dist.get_world_size(group)
        # The equal split has one size by construction; only "anything" modes need the (tiny) size all-gather.
        uneven = config.ulysses_anything or config.ring_anything
        sizes = gather_size_by_comm(local_length, group) if uneven else [local_length] * world
        shard = cls(sizes, dist.get_rank(group), sum(sizes) - num_ref_tokens, config)
        if shard.num_video_tokens <= 0:
            raise ValueError(
                f"the sequence has {sum(sizes)} tokens but the state declares {num_ref_tokens} reference tokens"
            )
        return shard

    @property
    def group(self) -> dist.ProcessGroup:
        return flattened_group(self.config)

    def bounds(self, rank: int | None = None) -> tuple[int, int]:
        """``[start, stop)`` of a rank's rows in the whole sequence (this rank's by default)."""
        rank = self.rank if rank is None else rank
        start = sum(self.sizes[:rank])
        return start, start + self.sizes[rank]

    def _clipped(self, lo: int, hi: int) -> list[tuple[int, int]]:
        # Each rank's rows within [lo, hi), as local offsets.
        out = []
        for r in range(len(self.sizes)):
            start, stop = self.bounds(r)
            a, b = max(start, lo), min(stop, hi)
            out.append((a - start, max(a, b) - start))
        return out

    @property
    def video_rows(self) -> tuple[int, int]:
        """Local ``[start, stop)`` of this rank's video rows (possibly empty)."""
        return self._clipped(0, self.num_video_tokens)[self.rank]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, l, ...)`` values of this rank's video tokens -> ``(B, Lv, ...)`` on every rank."""
        counts = [b - a for a, b in self._clipped(0, self.num_video_tokens)]
        return _gather_rows(t, counts, self.group)

    def gather_references(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, l, ...)`` rows this rank holds -> ``(B, sum R_s, ...)``: all reference rows, on every rank."""
        spans = self._clipped(self.num_video_tokens, sum(self.sizes))
        a, b = spans[self.rank]
        return _gather_rows(x[:, a:b], [hi - lo for lo, hi in spans], self.group)

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Ulysses all-to-all ``(B, l, H, D)`` -> ``(B, L, H_local, D)`` (Diffusers' own exchange)."""
        return seq_to_heads(x, ulysses_group(self.config), self.config.ulysses_anything)

    def to_sequence(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        """The inverse of :meth:`to_heads`: ``(B, L, H_local, D)`` -> ``(B, l, H, D)``."""
        return heads_to_seq(x, ulysses_group(self.config), self.config.ulysses_anything, num_heads,
                            self.sizes[self.rank])  # fmt: skip

    def ring_chunks(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of the rows each ring rank holds (the rows of its Ulysses group: Diffusers' mesh is
        ``(ring, ulysses)``, row-major, and splits the sequence over it flattened)."""
        u = self.config.ulysses_degree
        return [(self.bounds(j * u)[0], self.bounds((j + 1) * u - 1)[1]) for j in range(self.config.ring_degree)]


def _check_ring_backward(config: Any) -> None:
    """Diffusers 0.42's ``TemplatedRingAttention.backward`` passes each key/value gradient accumulator to ring rank
    ``r + 1`` while the next step reads the chunk of rank ``r + step + 1``: with more than 2 ring ranks the gradients
    land on the wrong chunks (the forward is right). Refuse autograd there rather than train on wrong gradients."""
    if config.ring_degree > 2 and torch.is_grad_enabled():
        raise NotImplementedError(
            f"ring attention with `ring_degree={config.ring_degree}` has no correct backward in Diffusers' "
            "`TemplatedRingAttention` (its key/value gradients rotate the wrong way for more than 2 ring ranks): run "
            "under `torch.no_grad()`, or train with `ring_degree=2` (with `ulysses_degree=...` for more ranks)"
        )


def _check_config(config: Any, num_heads: int, state: SubjectRoutingState, query: torch.Tensor) -> None:
    anything = "ulysses_anything" if config.ulysses_anything else "ring_anything" if config.ring_anything else None
    if anything and torch.is_grad_enabled():
        raise NotImplementedError(
            f"`ContextParallelConfig({anything}=True)` is forward-only in Diffusers (no backward): run under "
            "`torch.no_grad()`, or use lengths (and heads) divisible by the degrees to train"
        )
    if config.ring_degree > 1 and _ring_backend(state, query) not in RING_BACKENDS:
        raise NotImplementedError(f"{RING_UNSUPPORTED}; got backend {_ring_backend(state, query)!r}")
    _check_ring_backward(config)
    if not config.ulysses_anything and num_heads % config.ulysses_degree:
        raise ValueError(
            f"Ulysses context parallelism needs the attention heads ({num_heads}) to divide by `ulysses_degree` "
            f"({config.ulysses_degree}); use `ContextParallelConfig(..., ulysses_anything=True)`"
        )


def _ring_backend(state: SubjectRoutingState, query: torch.Tensor) -> str:
    backend = state.op_backend
    return select_backend(query) if backend == "auto" else backend


@dataclass
class RoutedRingChunks:
    """The per-step ``forward_op`` / ``backward_op`` of routed self-attention inside Diffusers' ring attention.

    Diffusers' ``TemplatedRingAttention`` calls ``forward_op`` once per ring step with this rank's queries and one
    chunk of keys/values: its own chunk first, then those of ring ranks ``rank + 1, rank + 2, ...`` (mod ``R``); it
    merges the steps through their log-sum-exps; its backward calls ``backward_op`` in the same order with the merged
    output and log-sum-exp. It hands the ops the tensors only, so the step count says which chunk they hold; the
    chunk's rows then give its layout: a contiguous slice of ``[video | ref_0 | ...]`` is ``[video part | the part of
    ref_0 | ...]``, the op's ``[shared | segment_0 | ...]`` with some parts empty. Video queries see the shared part and
    their bucket's segment; reference queries their own subject's segment (and the video part with
    ``ref_attends_video``), exactly as :func:`~.core.routed_self_attention` does over the whole sequence.

    Every step's queries include the key it holds at its own row (the own chunk comes first), so the first step's
    log-sum-exp is finite and Diffusers' merge never meets ``-inf - -inf``; later steps may see no key (``-inf``,
    zero output), which the merge leaves out.

    One instance serves one attention call (it counts the calls). ``chunks``: ``[start, stop)`` rows of every ring
    rank (:meth:`SequenceShard.ring_chunks`); ``buckets`` / ``bias``: ``(B, Lv)`` for all video tokens. With
    ``ref_lengths=None`` every query sees every key (plain attention, :func:`context_parallel_attention`). The
    routing inputs are copied, not read from the state: the backward usually runs after ``state.activate`` ended.
    """

    ref_lengths: list[int] | None
    ref_attends_video: bool
    buckets: torch.Tensor | None
    bias: torch.Tensor | None
    chunks: list[tuple[int, int]]
    rank: int
    num_video_tokens: int
    backend: str
    calls: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    bias_grad: torch.Tensor | None = None

    def _next_chunk(self, kind: str) -> int:
        step = self.calls[kind]
        if step >= len(self.chunks):
            raise RuntimeError(f"Diffusers' ring called the {kind} op {step + 1} times for {len(self.chunks)} chunks")
        self.calls[kind] = step + 1
        return (self.rank + step) % len(self.chunks)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        chunk: int,
        bias: torch.Tensor | None,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's queries against ring chunk ``chunk``'s keys: ``(out (B, l, H, D), lse (B, l, H))``.

        The op's trusted path (no host read): the buckets were checked when the routing state was activated (or come
        from an argmax), and the chunk's segment lengths are computed here from the chunk bounds."""
        backend = backend or self.backend
        if self.ref_lengths is None:  # plain attention: every query sees every key, the shared part of the op's layout
            buckets = torch.full(query.shape[:2], -1, dtype=torch.long, device=query.device)
            return bucketed_attention(
                query, key, value, buckets, [], backend=backend, return_lse=True, check_inputs=False
            )
        (q0, q1), (k0, k1) = self.chunks[self.rank], self.chunks[chunk]
        lv, lengths = self.num_video_tokens, self.ref_lengths
        starts = [lv + sum(lengths[:s]) for s in range(len(lengths))]
        segments = [max(0, min(k1, a + n) - max(k0, a)) for a, n in zip(starts, lengths)]
        video_keys, video_queries = max(0, min(k1, lv) - k0), max(0, min(q1, lv) - q0)
        parts = []
        if video_queries:
            parts.append(
                bucketed_attention(query[:, :video_queries], key, value, self.buckets[:, q0 : q0 + video_queries],
                                   segments, segment_bias=None if bias is None else bias[:, q0 : q0 + video_queries],
                                   backend=backend, return_lse=True,
                                   check_inputs=False)
            )  # fmt: skip
        if video_queries < q1 - q0:
            ref_rows = slice(max(q0, lv) - lv, q1 - lv)
            ref_buckets = subject_of_reference_tokens(lengths, query.shape[0], query.device)[:, ref_rows]
            if not self.ref_attends_video:
                key, value = key[:, video_keys:], value[:, video_keys:]
            parts.append(
                bucketed_attention(query[:, video_queries:], key, value, ref_buckets, segments, backend=backend,
                                   return_lse=True)
            )  # fmt: skip
        return torch.cat([o for o, _ in parts], dim=1), torch.cat([lse for _, lse in parts], dim=1)

    def forward_op(
        self,
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = True,
        _save_ctx: bool = True,
        _parallel_config: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if _save_ctx:  # Diffusers' ring backward reads the first step's tensors back
            ctx.save_for_backward(query, key, value)
        out, lse = self.attend(query, key, value, self._next_chunk("forward"), self.bias)
        return (out, lse) if return_lse else out

    def backward_op(
        self,
        ctx: Any,
        grad_out: torch.Tensor,
        *args: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of one step, recomputed: with ``(o, l)`` the step's output and log-sum-exp and ``L`` the merged
        one, ``out = sum_steps exp(l - L) o``, so ``d out / d o = w`` and ``d out / d l = w (o - out)`` with
        ``w = exp(l - L)``. The segment bias's gradient is kept in ``bias_grad`` (Diffusers' ring returns q/k/v's
        only; :class:`_RouterGradient` hands it on)."""
        chunk = self._next_chunk("backward")
        backend = self.backend if self.backend in _LSE_GRAD_BACKENDS else "dense"
        bias = self.bias
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
            inputs = [q, k, v]
            if bias is not None and bias.requires_grad:
                bias = bias.detach().requires_grad_()
                inputs.append(bias)
            o, lse_step = self.attend(q, k, v, chunk, bias, backend)
            weight = torch.exp(lse_step - lse.to(lse_step.dtype))  # a step that saw no key: exp(-inf) = 0
            grad = grad_out.to(weight.dtype)
            grad_lse = weight * ((o.to(weight.dtype) - out.to(weight.dtype)) * grad).sum(-1)
            # A step whose queries see no key at all returns a constant (-inf) log-sum-exp: it has nothing to pass.
            pairs = [(t, g) for t, g in ((o, (grad * weight[..., None]).to(o.dtype)), (lse_step, grad_lse))
                     if t.requires_grad]  # fmt: skip
            grads = torch.autograd.grad([t for t, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
        if len(grads) == 4:
            self.bias_grad = grads[3] if self.bias_grad is None else self.bias_grad + grads[3]
        return grads[0], grads[1], grads[2]


class _RouterGradient(torch.autograd.Function):
    """Identity on ``query`` that hands the segment bias (the router's straight-through carrier) the gradient
    :meth:`RoutedRingChunks.backward_op` collected. ``query`` feeds the ring, so this backward runs after the ring's."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, bias: torch.Tensor, chunks: RoutedRingChunks) -> torch.Tensor:
        ctx.chunks = chunks
        return query.view_as(query)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        return grad, ctx.chunks.bias_grad, None


def _ring_self_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: SubjectRoutingState,
    buckets: torch.Tensor,
    bias: torch.Tensor | None,
    shard: SequenceShard,
) -> torch.Tensor:
    config = shard.config
    rank = ring_rank(config)
    if shard.rank // config.ulysses_degree != rank:  # the mesh layout `ring_chunks` relies on
        raise RuntimeError(
            f"rank {shard.rank} of the flattened context-parallel mesh is not in ring chunk {rank}: Diffusers' mesh is "
            "expected to be (ring, ulysses), row-major"
        )
    chunks = RoutedRingChunks(list(state.ref_lengths), state.ref_attends_video, buckets, bias, shard.ring_chunks(),
                              rank, shard.num_video_tokens, _ring_backend(state, query))  # fmt: skip
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        query = _RouterGradient.apply(query, bias, chunks)
    return templated_ring_attention(query, key, value, chunks.forward_op, chunks.backward_op, config)


def context_parallel_routed_self_attention(
    state: SubjectRoutingState,
    layer_idx: int | None,
    hidden_states: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rotate: Callable[[torch.Tensor], torch.Tensor] | None,
    config: Any,
) -> torch.Tensor:
    """Routed self-attention of this rank's rows under Diffusers' context parallelism: Ulysses, ring, or both.

    Args:
        state: the active routing state (its inputs, e.g. ``mask_buckets``, describe the whole sequence).
        layer_idx: the block index (for per-layer routers and recorded maps).
        hidden_states: ``(B, l, C)`` this rank's input rows (router features).
        query, key, value: ``(B, l, H, D)`` this rank's projections, *before* rotary embedding.
        rotate: applies this rank's rotary embedding to a ``(B, l, H, D)`` tensor (``None``: no rotary).
        config: the ``ContextParallelConfig``.

    Returns:
        ``(B, l, H, D)``: this rank's rows of the attention output. ``state.buckets`` (and ``logits`` when
        recording) hold all ``Lv`` video tokens on every rank.
    """
    num_heads = query.shape[2]
    _check_config(config, num_heads, state, query)
    shard = SequenceShard.build(config, hidden_states.shape[1], sum(state.ref_lengths))
    v0, v1 = shard.video_rows
    uses_router = state.router is not None and state.mode in ("router", "masks")
    ref_hidden = shard.gather_references(hidden_states) if uses_router else None
    ref_key = shard.gather_references(key) if state.mode == "similarity" else None
    buckets, bias = route_video_tokens(
        state, layer_idx, hidden_states[:, v0:v1], ref_hidden, query[:, v0:v1], ref_key, shard=shard
    )
    state.current_buckets = buckets
    if rotate is not None:
        query, key = rotate(query), rotate(key)
    if config.ring_degree > 1:
        return _ring_self_attention(query, key, value, state, buckets, bias, shard)
    query, key, value = (shard.to_heads(t) for t in (query, key, value))
    out = routed_self_attention(query, key, value, state, buckets, bias)
    return shard.to_sequence(out, num_heads)


def context_parallel_routed_cross_attention(
    state: SubjectRoutingState, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: Any
) -> torch.Tensor:
    """Routed text cross-attention of this rank's query rows (``(B, l, H, D)``; text keys/values are whole), under
    any of Diffusers' context parallelisms: no communication."""
    shard = SequenceShard.build(config, query.shape[1], sum(state.ref_lengths))
    return routed_cross_attention(query, key, value, state, state.current_buckets, query_range=shard.bounds())


def context_parallel_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: Any, backend: str = "auto"
) -> torch.Tensor:
    """Plain self-attention of this rank's rows ``(B, l, H, D)`` under Diffusers' ring (and ring x Ulysses) context
    parallelism, each ring step by :func:`~diasr_diffusers.ops.bucketed_attention` (no segments) with its
    log-sum-exp, on any device.

    Diffusers' default attention backend (``"native"``, PyTorch SDPA) returns no log-sum-exp and so refuses
    ``ring_degree > 1`` (``ValueError: Native attention does not support return_lse=True``); its ring-capable
    backends (FlashAttention, cuDNN, ...) are GPU-only. The routed processors run their unrouted self-attention
    (no subjects, ``routing="dense"``) here in that case, so a routed transformer under ring attention runs with the
    default backend, on CPU too.
    """
    if backend == "auto":
        backend = select_backend(query)
    if backend not in RING_BACKENDS:
        raise NotImplementedError(f"{RING_UNSUPPORTED}; got backend {backend!r}")
    _check_ring_backward(config)
    # Plain attention needs no row ranges; one (unused) entry per ring rank keeps the step count.
    chunks = RoutedRingChunks(None, False, None, None, [(0, 0)] * config.ring_degree, ring_rank(config), 0, backend)
    return templated_ring_attention(query, key, value, chunks.forward_op, chunks.backward_op, config)


def needs_own_ring(attention_backend: Any, config: Any) -> bool:
    """Whether Diffusers' attention backend ``attention_backend`` (a processor's ``_attention_backend``; ``None``:
    the default) cannot run ring attention under ``config``, so :func:`context_parallel_attention` must."""
    if config is None or config.ring_degree == 1:
        return False
    return getattr(attention_backend, "value", attention_backend) in (None, "native")


# The names of the Ulysses-only version (kept: public).
ulysses_routed_self_attention = context_parallel_routed_self_attention
ulysses_routed_cross_attention = context_parallel_routed_cross_attention


def check_context_parallel_inputs(transformer: Any, sequence_lengths: list[int]) -> None:
    """Raise a ``ValueError`` naming the fix when Diffusers' context parallelism would refuse these sequences deep in
    the transformer (an ``AssertionError`` of its equal split): lengths or heads that do not divide the degree."""
    config = context_parallel_config(parallel_config_of(transformer))
    if config is None or config.ulysses_anything or config.ring_anything:
        return
    heads = getattr(getattr(transformer, "config", None), "num_attention_heads", None)
    if isinstance(heads, int) and heads % config.ulysses_degree:
        raise ValueError(
            f"Ulysses context parallelism needs the attention heads ({heads}) to divide by `ulysses_degree` "
            f"({config.ulysses_degree}); use another degree, or `ContextParallelConfig(..., ulysses_anything=True)`"
        )
    degree = config.ring_degree * config.ulysses_degree
    bad = sorted({n for n in sequence_lengths if n % degree})
    if bad:
        raise ValueError(
            f"context parallelism over {degree} ranks splits the token sequence evenly, but this call has sequences "
            f"of {bad} tokens (video + reference frames); pick frames/height/width so the tokens divide by {degree}, "
            "or enable uneven splits with `ContextParallelConfig(ulysses_degree=..., ulysses_anything=True)`"
        )
