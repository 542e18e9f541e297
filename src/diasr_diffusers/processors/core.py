"""Model-agnostic routing core shared by every model family's processor.

A processor (one per model family, e.g. :mod:`.wan`) only knows how to turn its attention module's inputs into
``q, k, v`` of shape ``(B, L, H, D)``. Everything about subjects lives here: the per-call
:class:`SubjectRoutingState`, how buckets are obtained (trained router, training-free similarity, user masks,
dense), and how self-/cross-attention is run through :func:`~diasr_diffusers.ops.bucketed_attention`.

Two kinds of families are served:

* separate self-/cross-attention (Wan, LTX): self-attention over ``[video (Lv) | ref_0 (R_0) | ... | ref_{N-1}]``
  (Phantom-style reference frames appended after the video) with :func:`routed_self_attention`, and text
  cross-attention with :func:`routed_cross_attention`;
* one joint attention over text, video and references (CogVideoX, HunyuanVideo): :func:`routed_joint_attention`,
  which takes the three parts as separate ``(q, k, v)`` triples, so an adapter only splits its own sequence order
  (``[text | video | refs]``, ``[video | refs | text]``, ...) and concatenates the outputs back.

With text routing, the state holds a per-sample permutation that puts the text tokens in
``[general | phrase_0 | ... | phrase_{N-1}]`` order. Adapters install their processors with
:func:`install_subject_processors` (one processor per attention module, each knowing its block index).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from .._diffusers_compat import context_parallel_config, functional_collectives, parallel_config_of
from ..ops import bucketed_attention
from ..routing.router import buckets_from_logits, chosen_log_prob

if TYPE_CHECKING:
    from ..routing.router import IDRouter

ROUTING_MODES = ("router", "similarity", "masks", "dense")
# The per-forward outputs of SubjectRoutingState (everything else is an input of the forward).
_RECORDED = ("buckets", "logits", "anchors")


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

    @property
    def op_backend(self) -> str:
        """The :func:`bucketed_attention` backend of the routed call in progress: ``backend``, except that ``"auto"``
        is ``"xformers"`` under a processor whose Diffusers attention backend is xFormers
        (``pipe.enable_xformers_memory_efficient_attention()``, ``transformer.set_attention_backend("xformers")``)."""
        return "xformers" if self.backend == "auto" and getattr(self, "_xformers_caller", False) else self.backend

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

    def gradient_checkpointing_func(self) -> Callable[..., Any]:
        """A ``gradient_checkpointing_func`` for ``transformer.enable_gradient_checkpointing(...)`` under which the
        backward pass recomputes each block with the routing inputs its forward had.

        Diffusers' default recomputes a checkpointed block during ``backward()``, usually after :meth:`activate`
        has ended: the recompute then runs stock attention, saves other tensors than the routed forward did, and
        torch raises ``CheckpointError`` (or, were the shapes to agree, the gradients would be those of another
        computation). This one snapshots the inputs (and ``current_buckets``, which a block's cross-attention reads
        from its self-attention) when the block runs forward and restores them around its recompute; the recompute's
        recorded outputs are discarded, so the forward's ``buckets`` / ``logits`` / ``anchors`` stay.

        Example:
            ```py
            transformer.enable_gradient_checkpointing(pipe.routing_state.gradient_checkpointing_func())
            with pipe.routing_state.activate(**routing_inputs, record=True):
                pred = transformer(...)[0]
            loss(pred).backward()  # outside the `with` block: recomputed blocks are still routed
            ```
        """

        def checkpoint(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            snapshot = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _RECORDED}
            contexts = lambda: (contextlib.nullcontext(), self._replay(snapshot))  # noqa: E731 (forward, recompute)
            return torch.utils.checkpoint.checkpoint(
                module.__call__, *args, use_reentrant=False, context_fn=contexts, **kwargs
            )

        return checkpoint

    @contextlib.contextmanager
    def _replay(self, snapshot: dict[str, Any]) -> Iterator[None]:
        saved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in snapshot.items():
            setattr(self, name, value)
        self.buckets, self.logits, self.anchors = {}, {}, {}
        try:
            yield
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
        # Routing is hard (argmax): nothing differentiates through the similarity, so a plain all-reduce will do.
        sim = functional_collectives().all_reduce(sim.detach(), "sum", heads_group)
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
        query[:, :lv], key, value, buckets, state.ref_lengths, segment_bias=segment_bias, backend=state.op_backend
    )
    ref_buckets = subject_of_reference_tokens(state.ref_lengths, query.shape[0], query.device)
    if state.ref_attends_video:
        refs = bucketed_attention(query[:, lv:], key, value, ref_buckets, state.ref_lengths, backend=state.op_backend)
    else:
        refs = bucketed_attention(
            query[:, lv:], key[:, lv:], value[:, lv:], ref_buckets, state.ref_lengths, backend=state.op_backend
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
                backend=state.op_backend,
            )
        )
    return torch.cat(outs, dim=0)


def _text_parts(seg: TextSegments, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One sample's general text positions and each subject's phrase positions (prompt order within each)."""
    order = seg.order.to(device)
    general = len(order) - sum(seg.lengths)
    phrases = list(order[general:].split(seg.lengths))
    return order[:general], phrases


def routed_joint_attention(
    state: SubjectRoutingState,
    buckets: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    video: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    refs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    segment_bias: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint attention over text, video and reference tokens (one attention, as in CogVideoX / HunyuanVideo), with
    video queries routed by ``buckets (B, Lv)``. Each part is a ``(query, key, value)`` triple of ``(B, L, H, D)``
    tensors (rotary embedding applied); returns the three outputs ``(text, video, refs)``.

    Who sees what (keys), with ``state.text_segments`` (text routing) / without:

    * a video token routed to subject ``s``: the general text + ``s``'s phrase / all text, all video, ``s``'s
      references; routed to null: the general text / all text, and all video;
    * a reference token of subject ``s``: the general text + ``s``'s phrase / all text, ``s``'s references (and
      all video if ``state.ref_attends_video``);
    * a text token: all text and all video, never a reference, so the text stream (which every video token reads)
      carries no subject's identity into the tokens not routed to it.

    ``segment_bias`` (router gradients) is added to the logits of the routed subject's keys (its phrase tokens too).
    ``text_mask`` ``(B, Lt)`` bool (True = a real token; HunyuanVideo pads its text): padding tokens are nobody's
    keys, and their own outputs are zeros (what SDPA gives a fully masked query row).
    """
    tq, tk, tv = text
    vq, vk, vv = video
    rq, rk, rv = refs
    batch, lt, lv = vq.shape[0], tk.shape[1], vk.shape[1]
    lengths = state.ref_lengths
    if rk.shape[1] != sum(lengths):
        raise ValueError(f"{rk.shape[1]} reference tokens given but the state declares {sum(lengths)}")
    if text_mask is not None and (text_mask.dtype != torch.bool or tuple(text_mask.shape) != (batch, lt)):
        raise ValueError(f"`text_mask` must be a bool tensor of shape (B, Lt) = {(batch, lt)}, got {text_mask.dtype} {tuple(text_mask.shape)}")  # fmt: skip
    visible = None if text_mask is None else F.pad(text_mask, (0, lv), value=True)[:, None, None]
    text_out = F.scaled_dot_product_attention(
        tq.transpose(1, 2), torch.cat([tk, vk], 1).transpose(1, 2), torch.cat([tv, vv], 1).transpose(1, 2), visible
    ).transpose(1, 2)
    if text_mask is not None:
        text_out = text_out * text_mask[:, :, None, None]
    key, value = torch.cat([tk, vk, rk], dim=1), torch.cat([tv, vv, rv], dim=1)
    ref_buckets = subject_of_reference_tokens(lengths, batch, vq.device)
    if state.text_segments is None and text_mask is None:
        video_out = bucketed_attention(
            vq, key, value, buckets, lengths, segment_bias=segment_bias, backend=state.op_backend
        )
        if state.ref_attends_video:
            ref_out = bucketed_attention(rq, key, value, ref_buckets, lengths, backend=state.op_backend)
        else:
            kr, vr = torch.cat([tk, rk], dim=1), torch.cat([tv, rv], dim=1)
            ref_out = bucketed_attention(rq, kr, vr, ref_buckets, lengths, backend=state.op_backend)
        return text_out, video_out, ref_out
    if state.text_segments is not None and len(state.text_segments) != batch:
        raise ValueError(f"`text_segments` has {len(state.text_segments)} entries for a batch of {batch}")
    device = vq.device
    video_pos = torch.arange(lt, lt + lv, device=device)
    ref_pos = list(torch.arange(lt + lv, lt + lv + sum(lengths), device=device).split(lengths))
    video_outs, ref_outs = [], []
    no_phrase = torch.zeros(0, dtype=torch.long, device=device)
    # Phrase lengths (and text padding) differ between samples and the op takes one segment layout per call: one call
    # per sample, keys gathered as [shared | phrase_0 + ref_0 | ... | phrase_{N-1} + ref_{N-1}].
    for b in range(batch):
        if state.text_segments is None:
            general, phrases = torch.arange(lt, device=device), [no_phrase] * len(lengths)
        else:
            seg = state.text_segments[b]
            if len(seg.order) != lt:
                raise ValueError(f"`text_segments[{b}]` orders {len(seg.order)} text tokens, the attention has {lt}")
            general, phrases = _text_parts(seg, device)
        if text_mask is not None:
            real = text_mask[b].to(device)
            general, phrases = general[real[general]], [p[real[p]] for p in phrases]
        subject_keys = [torch.cat([p, r]) for p, r in zip(phrases, ref_pos)]
        seg_lengths = [len(k) for k in subject_keys]
        idx = torch.cat([general, video_pos, *subject_keys])
        bias = None if segment_bias is None else segment_bias[b : b + 1]
        video_outs.append(
            bucketed_attention(vq[b : b + 1], key[b : b + 1, idx], value[b : b + 1, idx], buckets[b : b + 1],
                               seg_lengths, segment_bias=bias, backend=state.op_backend)
        )  # fmt: skip
        if not state.ref_attends_video:
            idx = torch.cat([general, *subject_keys])
        ref_outs.append(
            bucketed_attention(rq[b : b + 1], key[b : b + 1, idx], value[b : b + 1, idx], ref_buckets[b : b + 1],
                               seg_lengths, backend=state.op_backend)
        )  # fmt: skip
    return text_out, torch.cat(video_outs), torch.cat(ref_outs)


def heads_group(attn: torch.nn.Module) -> dist.ProcessGroup | None:
    """The process group an attention module's heads are sharded over (tensor parallelism: ``to_q`` is a DTensor
    sharded along its output features), or ``None``."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    from torch.distributed.tensor import DTensor

    weight = getattr(getattr(attn, "to_q", None), "weight", None)
    if isinstance(weight, DTensor) and any(p.is_shard(0) for p in weight.placements):
        return weight.device_mesh.get_group()
    return None


def local_heads(attn: Any, projected: torch.Tensor) -> int:
    """The heads a ``(B, L, heads * head_dim)`` projection of ``attn`` holds on this rank: all of ``attn.heads``, or
    this rank's share under tensor parallelism (the projection is then narrower than ``attn.inner_dim``)."""
    return projected.shape[-1] * attn.heads // attn.inner_dim


def video_token_count(state: SubjectRoutingState, num_tokens: int) -> int:
    """``Lv``: the video tokens of a ``[video | refs]`` sequence of ``num_tokens``; a sequence with no video token
    left after the state's references is refused (a state set for another call, or references not appended)."""
    lv = num_tokens - sum(state.ref_lengths)
    if lv <= 0:
        raise ValueError(
            f"the sequence has {num_tokens} video + reference tokens but the state declares "
            f"{sum(state.ref_lengths)} reference tokens (were the reference frames appended after the video?)"
        )
    return lv


class RoutedAttnProcessorBase:
    """What every family's ``SubjectSparseAttnProcessor`` shares: the routing ``state`` (``None`` = always stock),
    its block index ``layer_idx`` (for per-layer ``IDRouter`` heads), Diffusers' context-parallel hooks and the
    routing of the video tokens (:meth:`route`).

    An adapter also inherits from its family's stock processor (``class LTXSubjectSparseAttnProcessor(
    RoutedAttnProcessorBase, LTXVideoAttnProcessor)``), so its stock code path is ``super().__call__(...)``.
    """

    # Context parallelism (diffusers' rules): these class attributes are set by `enable_parallelism()`.
    _attention_backend = None
    _parallel_config = None
    # A family whose processor runs routed attention on its rank's rows (Wan: `processors/parallel.py`) says so;
    # the others refuse context parallelism with subjects active rather than attend within each rank's rows.
    supports_context_parallel = False

    def __init__(self, state: SubjectRoutingState | None = None, layer_idx: int | None = None):
        super().__init__()  # the stock processor's checks (PyTorch 2.0's SDPA)
        if state is not None and not isinstance(state, SubjectRoutingState):
            raise TypeError(f"`state` must be a SubjectRoutingState or None, got {type(state).__name__}")
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0):
            raise ValueError(f"`layer_idx` must be a block index >= 0 or None, got {layer_idx!r}")
        self.state = state
        self.layer_idx = layer_idx

    def routes(self, attention_mask: torch.Tensor | None = None) -> SubjectRoutingState | None:
        """The state when this call is routed (subjects active, not ``"dense"``, no attention mask), else ``None``
        (run the stock processor). Refuses context parallelism unless the family supports it."""
        state = self.state
        if state is None or not state.active or state.mode == "dense" or attention_mask is not None:
            return None
        state._xformers_caller = _is_xformers(self._attention_backend)  # read by `state.op_backend`
        if self._parallel_config is not None and not self.supports_context_parallel:
            raise NotImplementedError(
                f"{type(self).__name__} does not support context parallelism with subjects active yet (only Wan "
                "does); use `routing='dense'` or run without `enable_parallelism`"
            )
        return state

    def route(
        self,
        attn: Any,
        state: SubjectRoutingState,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Route this layer's video tokens: ``(buckets (B, Lv), segment bias or None)``, also kept as
        ``state.current_buckets`` for the block's text cross-attention.

        ``hidden_states``: ``(B, Lv + R, C)`` the attention's ``[video | refs]`` input (router features);
        ``query``/``key``: ``(B, Lv + R, H, D)`` their projections before rotary embedding (similarity features),
        ``H`` this rank's heads.
        """
        lv = video_token_count(state, hidden_states.shape[1])
        buckets, bias = route_video_tokens(
            state, self.layer_idx, hidden_states[:, :lv], hidden_states[:, lv:], query[:, :lv], key[:, lv:],
            heads_group=heads_group(attn),
        )  # fmt: skip
        state.current_buckets = buckets
        return buckets, bias


def _is_xformers(backend: Any) -> bool:
    """Whether a Diffusers attention backend (an ``AttentionBackendName`` or its string) is xFormers."""
    return getattr(backend, "value", backend) == "xformers"


def block_indices(names: list[str]) -> dict[str, int | None]:
    """The transformer block index of each attention processor name: blocks are numbered in the order their
    ``<list>.<i>`` prefix first appears (``blocks.3.attn1.processor`` -> 3 for Wan; double-stream then
    single-stream blocks of HunyuanVideo-style models get one running index). ``None`` outside any block list."""
    index: dict[str, int] = {}
    out: dict[str, int | None] = {}
    for name in names:
        parts = name.split(".")
        digit = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
        if digit is None:
            out[name] = None
            continue
        block = ".".join(parts[: digit + 1])
        out[name] = index.setdefault(block, len(index))
    return out


def check_processors_before_parallelism(transformer: Any) -> None:
    """Refuse to install processors on a transformer that already has context parallelism: Diffusers hands its
    config to the processors present when ``enable_parallelism`` runs, so later ones would attend within each rank's
    rows only (silently wrong)."""
    if context_parallel_config(parallel_config_of(transformer)) is not None:
        raise RuntimeError(
            "this transformer already has context parallelism: install the subject-sparse processors first "
            "(`set_subject_sparse_attn_processor(transformer)`, or build the DiasRPipeline), then call "
            "`transformer.enable_parallelism(...)`"
        )


def install_subject_processors(
    transformer: Any,
    state: SubjectRoutingState | None,
    processor_class: type[RoutedAttnProcessorBase],
    only: str | None = None,
) -> SubjectRoutingState:
    """Install one ``processor_class(state, layer_idx)`` per attention module of ``transformer``, all sharing
    ``state`` (a new one if ``None``), each knowing its block index (:func:`block_indices`). Returns the state.

    The low-level step under :func:`set_subject_sparse_attn_processor` (which picks ``processor_class`` and ``only``
    from the transformer's family): it does not check that ``processor_class`` fits the transformer.

    ``only``: a module-name prefix (e.g. ``"transformer_blocks."``); attention modules outside it (a text refiner's)
    keep their processors and are not counted as blocks. An attention backend set with
    ``transformer.set_attention_backend(...)`` is kept on the new processors (it applies to their stock code paths);
    so is xFormers when ``enable_xformers_memory_efficient_attention()`` replaced a legacy ``Attention``'s processor
    with Diffusers' ``XFormersAttnProcessor``. Under an xFormers backend, routed attention with
    ``SubjectRoutingState.backend="auto"`` runs ``bucketed_attention(..., backend="xformers")``.
    Install before ``transformer.enable_parallelism(...)``: afterwards this raises
    (:func:`check_processors_before_parallelism`).
    """
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.attention_processor import XFormersAttnProcessor

    if state is not None and not isinstance(state, SubjectRoutingState):
        raise TypeError(f"`state` must be a SubjectRoutingState or None, got {type(state).__name__}")
    if not hasattr(transformer, "attn_processors") or not hasattr(transformer, "set_attn_processor"):
        raise TypeError(
            f"`transformer` must be a Diffusers transformer (e.g. `pipe.transformer`), got {type(transformer).__name__}"
        )
    check_processors_before_parallelism(transformer)
    state = state if state is not None else SubjectRoutingState()
    old = transformer.attn_processors
    layers = block_indices([name for name in old if only is None or name.startswith(only)])
    processors = {}
    for name, previous in old.items():
        if name not in layers:
            processors[name] = previous
            continue
        processor = processor_class(state, layers[name])
        # `set_attention_backend` stores the backend on each processor: keep it, or a backend chosen on the stock
        # transformer (e.g. before `DiasRPipeline.from_wan`) would silently be dropped for the stock code paths.
        backend = getattr(previous, "_attention_backend", None)
        if isinstance(previous, XFormersAttnProcessor):  # what `enable_xformers_...()` puts on a legacy `Attention`
            backend = AttentionBackendName.XFORMERS
        if backend is not None:
            processor._attention_backend = backend
        processors[name] = processor
    transformer.set_attn_processor(processors)
    return state


def set_subject_sparse_attn_processor(
    transformer: Any, state: SubjectRoutingState | None = None, *, family: str | None = None
) -> SubjectRoutingState:
    """Install subject-sparse attention on any supported Diffusers video transformer: one processor per attention
    module (its family's adapter, :data:`~diasr_diffusers.families.FAMILIES`), all sharing ``state`` (a new one if
    ``None``), each knowing its block index. Returns the state. With no subjects active the transformer computes
    exactly what it did with its stock processors.

    Supported: ``WanTransformer3DModel`` (Wan2.1 / Wan2.2), ``LTXVideoTransformer3DModel``,
    ``CogVideoXTransformer3DModel`` and ``HunyuanVideo15Transformer3DModel`` (and their subclasses). Any other class,
    and the Ingredients transformer (which routes identities with its own routers), is refused here, naming the
    supported classes, instead of failing in the first forward.

    Install before ``transformer.enable_parallelism(...)`` (Diffusers' rule for custom processors). An attention
    backend set with ``transformer.set_attention_backend(...)`` is kept for the stock code paths (no subjects,
    ``routing="dense"``, unrouted cross-attention); routed attention runs
    :func:`~diasr_diffusers.ops.bucketed_attention` (backend: ``SubjectRoutingState.backend``).

    Args:
        transformer: e.g. ``pipe.transformer``.
        state: the routing state to share (e.g. a pipeline's ``routing_state``).
        family: the family this call expects (a key of ``FAMILIES``); a transformer of another family is refused.
            The per-family installers (``set_ltx_subject_sparse_attn_processor``...) pass theirs.

    Example:
        ```py
        >>> from diasr_diffusers import set_subject_sparse_attn_processor
        >>> state = set_subject_sparse_attn_processor(pipe.transformer)  # Wan, LTX, CogVideoX or HunyuanVideo-1.5
        >>> with state.activate(ref_lengths=[1560, 1560], mode="similarity"):
        ...     noise_pred = pipe.transformer(torch.cat([latents, ref_latents], dim=2), t, prompt_embeds)[0]
        ```
    """
    from ..families import FAMILIES, UnsupportedFamilyError, family_for_transformer, supported_transformer_classes

    if state is not None and not isinstance(state, SubjectRoutingState):
        raise TypeError(f"`state` must be a SubjectRoutingState or None, got {type(state).__name__}")
    name = type(transformer).__name__
    supported = f"supported: {', '.join(supported_transformer_classes(with_processor=True))}"
    try:
        spec = family_for_transformer(transformer)
    except UnsupportedFamilyError:
        raise UnsupportedFamilyError(
            f"`transformer` must be a Diffusers video transformer of a supported family, got a {name}; {supported}"
        ) from None
    if spec.processor is None:
        raise UnsupportedFamilyError(
            f"subject-sparse attention is not installed on a {name}: {spec.title} {spec.no_processor_reason}. {supported}"
        )
    if family is not None and spec.name != family:
        raise UnsupportedFamilyError(
            f"this installer is for {FAMILIES[family].title} transformers, got a {name} ({spec.title}): use "
            "`set_subject_sparse_attn_processor(transformer)`, which picks the family's processor"
        )
    return install_subject_processors(transformer, state, spec.processor_class(), only=spec.processor_prefix)
