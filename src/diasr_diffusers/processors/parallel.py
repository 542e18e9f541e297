"""Subject-sparse attention across devices, on Diffusers' own parallelism (``transformer.enable_parallelism``).

**Context parallelism (Ulysses).** Diffusers' ``_cp_plan`` splits the ``[video | ref_0 | ... | ref_{N-1}]`` sequence
(and the rotary tables) across the ranks before the first block and gathers the output after the last one; every
attention processor sees its rank's rows only. With subjects active, :func:`ulysses_routed_self_attention`:

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

**Ring attention** is refused with subjects active (:data:`RING_UNSUPPORTED`).

**Tensor parallelism** shards each attention's heads (``to_q``/``to_k``/``to_v`` column-wise, as DTensors). The
similarity router averages over heads, so each rank would route differently: :func:`heads_group` finds the group the
heads are sharded over and :func:`~.core.similarity_logits` all-reduces the per-head sum over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    seq_to_heads,
    ulysses_group,
)
from .core import (
    SubjectRoutingState,
    check_processors_before_parallelism,
    heads_group,
    route_video_tokens,
    routed_cross_attention,
    routed_self_attention,
)

# Defined in core.py / _diffusers_compat.py (core must not import this module); kept here as public names.
__all__ = [
    "RING_UNSUPPORTED",
    "SequenceShard",
    "check_context_parallel_inputs",
    "check_processors_before_parallelism",
    "context_parallel_config",
    "heads_group",
    "ulysses_routed_cross_attention",
    "ulysses_routed_self_attention",
]

RING_UNSUPPORTED = (
    "subject-sparse attention does not support ring attention (`ContextParallelConfig(ring_degree > 1)`): a ring "
    "step attends to one chunk of keys and the chunks are merged through each partial result's log-sum-exp, but "
    "`bucketed_attention` does not return its log-sum-exp, and a chunk of keys does not keep the "
    "[video | ref_0 | ...] layout the buckets index. Use `ContextParallelConfig(ulysses_degree=...)` (every routing "
    "mode), or `routing='dense'` (stock attention, any Diffusers context parallelism)"
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
        # The equal split has one size by construction; only "anything" mode needs the (tiny) size all-gather.
        sizes = gather_size_by_comm(local_length, group) if config.ulysses_anything else [local_length] * world
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


def _check_config(config: Any, num_heads: int) -> None:
    if config.ring_degree > 1:
        raise NotImplementedError(RING_UNSUPPORTED)
    if config.ulysses_anything:
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "`ContextParallelConfig(ulysses_anything=True)` is forward-only in Diffusers (no backward): run under "
                "`torch.no_grad()`, or use lengths and heads divisible by `ulysses_degree` to train"
            )
    elif num_heads % config.ulysses_degree:
        raise ValueError(
            f"Ulysses context parallelism needs the attention heads ({num_heads}) to divide by `ulysses_degree` "
            f"({config.ulysses_degree}); use `ContextParallelConfig(..., ulysses_anything=True)`"
        )


def ulysses_routed_self_attention(
    state: SubjectRoutingState,
    layer_idx: int | None,
    hidden_states: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rotate: Callable[[torch.Tensor], torch.Tensor] | None,
    config: Any,
) -> torch.Tensor:
    """Routed self-attention of this rank's rows under Ulysses context parallelism.

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
    _check_config(config, num_heads)
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
    query, key, value = (shard.to_heads(t) for t in (query, key, value))
    out = routed_self_attention(query, key, value, state, buckets, bias)
    return shard.to_sequence(out, num_heads)


def ulysses_routed_cross_attention(
    state: SubjectRoutingState, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: Any
) -> torch.Tensor:
    """Routed text cross-attention of this rank's query rows (``(B, l, H, D)``; text keys/values are whole)."""
    if config.ring_degree > 1:
        raise NotImplementedError(RING_UNSUPPORTED)
    shard = SequenceShard.build(config, query.shape[1], sum(state.ref_lengths))
    return routed_cross_attention(query, key, value, state, state.current_buckets, query_range=shard.bounds())


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
