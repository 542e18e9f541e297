"""Model-agnostic routing core shared by every model family's processor.

A processor (one per model family, e.g. :mod:`.wan`) only knows how to turn its attention module's inputs into
``q, k, v`` of shape ``(B, L, H, D)``. Everything about subjects lives here: the per-call
:class:`SubjectRoutingState`, how buckets are obtained (trained router, training-free similarity, user masks,
dense), and how self-/cross-attention is run through :func:`~diasr_diffusers.ops.bucketed_attention`.

Sequence layout assumed for self-attention: ``[video (Lv) | ref_0 (R_0) | ... | ref_{N-1}]`` (Phantom-style
reference frames appended after the video). Cross-attention keys are text tokens; with text routing, the state
holds a per-sample permutation that puts them in ``[general | phrase_0 | ... | phrase_{N-1}]`` order.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops import bucketed_attention
from ..routing.router import buckets_from_logits, chosen_log_prob

if TYPE_CHECKING:
    from ..routing.router import IDRouter

ROUTING_MODES = ("router", "similarity", "masks", "dense")


@dataclass
class TextSegments:
    """Where each subject's phrase sits among one sample's text tokens.

    ``order``: ``(Lt,)`` int64 permutation of text positions into ``[general | phrase_0 | ... | phrase_{N-1}]``;
    ``lengths``: ``N`` phrase token counts.
    """

    order: torch.Tensor
    lengths: list[int]


@dataclass
class SubjectRoutingState:
    """Per-call routing context shared (by reference) by all :class:`SubjectSparseAttnProcessor` of a transformer.

    Diffusers' Wan transformer drops ``attention_kwargs`` before the processors, so whoever runs the transformer
    (our pipeline, a training loop, your own sampler) sets this state around the call, usually with
    :meth:`activate`. With ``ref_lengths`` empty the processors behave exactly like the stock ones.

    Inputs:
        ref_lengths: reference tokens of each subject at the end of the self-attention sequence.
        mode: ``"router"`` (a trained :class:`IDRouter`), ``"similarity"`` (training-free: each video query against
            each subject's mean reference key), ``"masks"`` (``mask_buckets`` given by the user) or ``"dense"``
            (every token sees every subject: the Phantom baseline).
        router: the :class:`IDRouter` for ``mode="router"``.
        phrase_features / phrase_masks: per subject ``(B, T_s, text_dim)`` text-encoder features of its phrase and
            ``(B, T_s)`` validity, the text half of the router's dual-modal anchors.
        mask_buckets: ``(B, Lv)`` int64 routing for ``mode="masks"``.
        text_segments: per sample :class:`TextSegments`; routes the text cross-attention when set.
        similarity_threshold: ``mode="similarity"``: a token whose best mean cosine similarity is below this is
            routed to null.
        video_grid: ``(F, H, W)`` of the video tokens (after patchifying); needed by routers with spatial context
            (``IDRouter(context_kernel > 1)``).
        ref_attends_video: whether reference queries also see video keys (default: only their own subject's
            references, which keeps reference features independent of the video).
        router_gradient: ``"straight_through"`` passes ``logp - logp.detach()`` of the chosen bucket as
            ``segment_bias`` while grad is enabled, so the diffusion loss reaches the router; ``"none"`` does not.
        backend: :func:`bucketed_attention` backend.
        record: keep per-layer buckets and router logits in ``buckets`` / ``logits`` (for maps and losses).

    Outputs (filled during a forward): ``buckets[layer]`` ``(B, Lv)``; with ``record``, ``logits[layer]``
    ``(B, Lv, N + 1)`` and ``anchors[layer]`` = (image anchors, text anchors or None), each ``(B, N, router_dim)``.
    In ``mode="masks"`` with a ``router`` set, the router is scored alongside the given routing (teacher forcing:
    its logits are recorded for losses but do not route).
    """

    ref_lengths: list[int] = field(default_factory=list)
    mode: str = "similarity"
    router: IDRouter | None = None
    phrase_features: list[torch.Tensor | None] | None = None
    phrase_masks: list[torch.Tensor | None] | None = None
    mask_buckets: torch.Tensor | None = None
    text_segments: list[TextSegments] | None = None
    similarity_threshold: float = 0.0
    video_grid: tuple[int, int, int] | None = None
    ref_attends_video: bool = False
    router_gradient: str = "none"
    backend: str = "auto"
    record: bool = False
    buckets: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    anchors: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    current_buckets: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return len(self.ref_lengths) > 0

    @property
    def num_subjects(self) -> int:
        return len(self.ref_lengths)

    def reset(self) -> None:
        """Back to inactive defaults (stock attention everywhere)."""
        for f in fields(self):
            setattr(self, f.name, f.default_factory() if callable(f.default_factory) else f.default)

    def clear_outputs(self) -> None:
        self.buckets, self.logits, self.anchors, self.current_buckets = {}, {}, {}, None

    @contextlib.contextmanager
    def activate(self, **inputs: Any) -> Iterator[SubjectRoutingState]:
        """Set inputs for the duration of a ``with`` block, clearing outputs first; restores the old inputs after."""
        unknown = set(inputs) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown routing state fields {sorted(unknown)}")
        _check_state({f.name: inputs.get(f.name, getattr(self, f.name)) for f in fields(self)})
        saved = {name: getattr(self, name) for name in inputs}
        for name, value in inputs.items():
            setattr(self, name, value)
        self.clear_outputs()
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)


def _is_int(value: Any) -> bool:
    # bool is an int subclass, and a float length would be truncated further down: accept true integers only.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_state(values: dict[str, Any]) -> None:
    """Refuse routing inputs that would otherwise be truncated, ignored or fail deep inside the transformer."""
    lengths = values["ref_lengths"]
    if not isinstance(lengths, (list, tuple)) or not all(_is_int(n) and n >= 1 for n in lengths):
        raise ValueError(
            f"`ref_lengths` must be a list of positive ints (reference tokens per subject), got {lengths!r}"
        )
    n = len(lengths)
    mode = values["mode"]
    if mode not in ROUTING_MODES:
        raise ValueError(f"`mode` must be one of {ROUTING_MODES}, got {mode!r}")
    if mode == "router" and values["router"] is None:
        raise ValueError("`mode='router'` needs `router` (an IDRouter)")
    buckets = values["mask_buckets"]
    if mode == "masks" and buckets is None:
        raise ValueError("`mode='masks'` needs `mask_buckets` of shape (B, Lv)")
    if buckets is not None and (
        not isinstance(buckets, torch.Tensor) or buckets.ndim != 2 or buckets.dtype not in (torch.int64, torch.int32)
    ):
        got = (
            f"{buckets.dtype} {tuple(buckets.shape)}" if isinstance(buckets, torch.Tensor) else type(buckets).__name__
        )
        raise ValueError(f"`mask_buckets` must be an int64 tensor of shape (B, Lv), got {got}")
    threshold = values["similarity_threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise ValueError(f"`similarity_threshold` must be a finite number, got {threshold!r}")
    grid = values["video_grid"]
    if grid is not None and (
        not isinstance(grid, (list, tuple)) or len(grid) != 3 or not all(_is_int(g) and g >= 1 for g in grid)
    ):
        raise ValueError(f"`video_grid` must be None or 3 positive ints (F, H, W), got {grid!r}")
    if values["router_gradient"] not in ("none", "straight_through"):
        raise ValueError(f"`router_gradient` must be 'none' or 'straight_through', got {values['router_gradient']!r}")
    for name in ("record", "ref_attends_video"):
        if not isinstance(values[name], bool):
            raise TypeError(f"`{name}` must be a bool, got {values[name]!r}")
    segments = values["text_segments"]
    if segments is not None:
        if not isinstance(segments, (list, tuple)) or not all(isinstance(t, TextSegments) for t in segments):
            raise ValueError(
                f"`text_segments` must be None or a list of TextSegments (one per sample), got {type(segments).__name__}"
            )
        for b, seg in enumerate(segments):
            if len(seg.lengths) != n or not all(_is_int(k) and k >= 0 for k in seg.lengths):
                raise ValueError(
                    f"`text_segments[{b}].lengths` must hold {n} non-negative ints (one per subject), got {seg.lengths!r}"
                )
    for name in ("phrase_features", "phrase_masks"):
        if values[name] is not None and (not isinstance(values[name], (list, tuple)) or len(values[name]) != n):
            raise ValueError(
                f"`{name}` must be None or a list with one entry per subject ({n}), got {type(values[name]).__name__}"
            )


def subject_of_reference_tokens(ref_lengths: list[int], batch: int, device: torch.device) -> torch.Tensor:
    """``(B, sum R_s)`` bucket of every reference token: its own subject."""
    # Built from Python ints (not `repeat_interleave` over a length tensor): the shape is then static, so
    # `torch.compile(fullgraph=True)` traces it without a data-dependent graph break.
    ids = [torch.full((n,), s, dtype=torch.long, device=device) for s, n in enumerate(ref_lengths)]
    return torch.cat(ids).expand(batch, -1)


class VideoShard(Protocol):
    """This rank's share of the video tokens under context parallelism (see :mod:`.parallel`).

    ``num_video_tokens``: ``Lv`` of the whole sequence; ``gather(t)``: ``(B, l, ...)`` rows of this rank's video
    tokens -> ``(B, Lv, ...)``, the same on every rank (differentiable).
    """

    num_video_tokens: int

    def gather(self, t: torch.Tensor) -> torch.Tensor: ...


def similarity_logits(
    video_query: torch.Tensor,
    ref_key: torch.Tensor,
    ref_lengths: list[int],
    threshold: float,
    heads_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Training-free routing logits ``(B, Lv, N + 1)``: mean over heads of the cosine between each video query and
    each subject's mean reference key; the null column is the constant ``threshold``.

    ``video_query (B, Lv, H, D)`` and ``ref_key (B, sum R_s, H, D)`` are taken before rotary embedding so that
    position does not dominate identity. ``heads_group``: the process group the heads are sharded over (tensor
    parallelism): the per-head sum is all-reduced over it, so every rank routes as one process holding all heads.
    """
    means = torch.stack([k.mean(dim=1) for k in ref_key.split(ref_lengths, dim=1)], dim=1)  # (B, N, H, D)
    q = F.normalize(video_query.float(), dim=-1)
    means = F.normalize(means.float(), dim=-1)
    sim = torch.einsum("blhd,bnhd->bln", q, means)
    heads = q.shape[2]
    if heads_group is not None:
        import torch.distributed._functional_collectives as funcol

        # Routing is hard (argmax): nothing differentiates through the similarity, so a plain all-reduce will do.
        sim = funcol.all_reduce(sim.detach(), "sum", heads_group)
        heads = heads * dist.get_world_size(heads_group)  # Diffusers' tensor parallelism shards heads evenly
    sim = sim / heads
    null = sim.new_full((*sim.shape[:2], 1), threshold)
    return torch.cat([sim, null], dim=-1)


def _router_logits(
    state: SubjectRoutingState,
    layer_idx: int,
    video_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    shard: VideoShard | None = None,
) -> torch.Tensor:
    anchors, image_anchors, text_anchors = state.router.encode_anchors(
        list(ref_hidden.split(state.ref_lengths, dim=1)), state.phrase_features, state.phrase_masks,
        return_modalities=True,
    )  # fmt: skip
    if state.record:
        state.anchors[layer_idx] = (image_anchors, text_anchors)
    if shard is None:
        return state.router(video_hidden, anchors, layer_idx, grid=state.video_grid)
    if state.router.config.context_kernel > 1:
        # The spatial context of a token crosses shard borders: route the gathered tokens (the same on every rank).
        return state.router(shard.gather(video_hidden), anchors, layer_idx, grid=state.video_grid)
    return shard.gather(state.router(video_hidden, anchors, layer_idx, grid=state.video_grid))


def route_video_tokens(
    state: SubjectRoutingState,
    layer_idx: int | None,
    video_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    video_query: torch.Tensor,
    ref_key: torch.Tensor,
    *,
    heads_group: dist.ProcessGroup | None = None,
    shard: VideoShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Buckets ``(B, Lv)`` for this layer and the log-probability carrier for router gradients (or ``None``).

    ``video_hidden``/``ref_hidden``: the attention module's input tokens (router features);
    ``video_query``/``ref_key``: pre-rotary ``(B, L, H, D)`` (similarity features).
    ``heads_group``: heads sharded over this group (tensor parallelism), see :func:`similarity_logits`.
    ``shard``: context parallelism: ``video_hidden``/``video_query`` hold this rank's video tokens only (the
    reference inputs are whole); logits are gathered, so buckets, bias and recorded maps cover all ``Lv`` tokens
    and are the same on every rank.
    """
    logits = None
    gather = shard.gather if shard is not None else (lambda t: t)
    if state.mode == "masks":
        buckets = state.mask_buckets.to(video_hidden.device)
        lv = shard.num_video_tokens if shard is not None else video_hidden.shape[1]
        if tuple(buckets.shape) != (video_hidden.shape[0], lv):
            raise ValueError(
                f"`mask_buckets` has shape {tuple(buckets.shape)} but the transformer has {(video_hidden.shape[0], lv)} "
                "video tokens (B, Lv)"
            )
    elif state.mode == "similarity":
        logits = gather(
            similarity_logits(video_query, ref_key, state.ref_lengths, state.similarity_threshold, heads_group)
        )
        buckets = buckets_from_logits(logits)
    elif state.mode == "router":
        router = state.router
        if layer_idx is None:
            raise ValueError(
                "IDRouter routing needs per-layer processors; install them with "
                "`diasr_diffusers.set_subject_sparse_attn_processor(transformer, state)`"
            )
        source = router.routed_layer_indices[router.head_index(layer_idx)]
        if not router.is_routed(layer_idx) and source in state.buckets:
            return state.buckets[source], None
        logits = _router_logits(state, layer_idx, video_hidden, ref_hidden, shard)
        buckets = buckets_from_logits(logits)
    else:
        raise ValueError(f"no bucket routing in mode {state.mode!r}")
    if (
        state.mode == "masks"
        and state.router is not None
        and layer_idx is not None
        and state.router.is_routed(layer_idx)
    ):
        logits = _router_logits(state, layer_idx, video_hidden, ref_hidden, shard)

    if layer_idx is not None:
        state.buckets[layer_idx] = buckets
        if logits is not None and state.record:
            state.logits[layer_idx] = logits
    bias = None
    if state.mode == "router" and state.router_gradient == "straight_through" and torch.is_grad_enabled():
        logp = chosen_log_prob(logits, buckets)
        bias = logp - logp.detach()
    return buckets, bias


def routed_self_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: SubjectRoutingState,
    buckets: torch.Tensor,
    segment_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention over ``[video | ref_0 | ...]`` with video queries routed by ``buckets (B, Lv)``.

    Video queries see all video keys plus their subject's reference keys; reference queries see their own
    subject's reference keys (and the video keys if ``state.ref_attends_video``). Shapes ``(B, L, H, D)``.
    """
    lv = query.shape[1] - sum(state.ref_lengths)
    video = bucketed_attention(
        query[:, :lv], key, value, buckets, state.ref_lengths, segment_bias=segment_bias, backend=state.backend
    )
    ref_buckets = subject_of_reference_tokens(state.ref_lengths, query.shape[0], query.device)
    if state.ref_attends_video:
        refs = bucketed_attention(query[:, lv:], key, value, ref_buckets, state.ref_lengths, backend=state.backend)
    else:
        refs = bucketed_attention(
            query[:, lv:], key[:, lv:], value[:, lv:], ref_buckets, state.ref_lengths, backend=state.backend
        )
    return torch.cat([video, refs], dim=1)


def routed_cross_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: SubjectRoutingState,
    buckets: torch.Tensor,
    query_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Text cross-attention where a video token routed to subject ``s`` sees the general prompt tokens plus
    ``s``'s phrase only (null: general only) and reference tokens see their own phrase.

    ``query (B, L, H, D)`` over ``[video | refs]``; ``key``/``value`` ``(B, Lt, H, D)`` in prompt order.
    ``query_range``: context parallelism: ``query`` holds rows ``[start, stop)`` of ``[video | refs]`` only, while
    ``buckets`` covers all ``Lv`` video tokens.
    """
    batch = query.shape[0]
    if len(state.text_segments) != batch:
        raise ValueError(f"`text_segments` has {len(state.text_segments)} entries for a batch of {batch}")
    ref_buckets = subject_of_reference_tokens(state.ref_lengths, batch, query.device)
    all_buckets = torch.cat([buckets, ref_buckets], dim=1)
    if query_range is not None:
        all_buckets = all_buckets[:, query_range[0] : query_range[1]]
    outs = []
    # Phrase lengths can differ between prompts, and the op takes one segment layout per call: go per sample.
    for b, seg in enumerate(state.text_segments):
        order = seg.order.to(key.device)
        outs.append(
            bucketed_attention(
                query[b : b + 1],
                key[b : b + 1, order],
                value[b : b + 1, order],
                all_buckets[b : b + 1],
                seg.lengths,
                backend=state.backend,
            )
        )
    return torch.cat(outs, dim=0)
