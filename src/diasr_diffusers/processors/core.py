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
from ..ops import available_backends, bucketed_attention
from ..routing.router import buckets_from_logits, check_phrase_mask, chosen_log_prob

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

    def __post_init__(self) -> None:
        # Derived from the inputs once, reused by every layer (`_text_positions`, `_text_layout`, `_mask_buckets_on`).
        self._text_cache: tuple[Any, list[_SampleText]] | None = None
        self._layouts: dict[Any, Any] = {}
        self._device_buckets: tuple[torch.Tensor, torch.device, torch.Tensor] | None = None
        self._checked: dict[str, tuple[Any, tuple]] = {}

    def _text_positions(self) -> list[_SampleText] | None:
        """The text positions of ``text_segments``, read and checked once per ``text_segments`` object (by
        :meth:`activate`, or by the first layer when the field was set directly)."""
        segments = self.text_segments
        if segments is None:
            return None
        if (
            self._text_cache is None
            or self._text_cache[0] is not segments
            or self._layouts.get("refs") != tuple(self.ref_lengths)
        ):
            self._set_text_cache(segments, _sample_texts(segments, self.num_subjects))
        return self._text_cache[1]

    def _set_text_cache(self, segments: list[TextSegments] | None, texts: list[_SampleText] | None) -> None:
        if (
            self._text_cache is not None
            and self._text_cache[0] is segments
            and self._layouts.get("refs") == tuple(self.ref_lengths)
        ):
            return
        self._text_cache = None if segments is None else (segments, texts)
        self._layouts = {"refs": tuple(self.ref_lengths)}
        if texts is not None:  # both kinds (the state does not know its family): small, and built once per step
            parts = [(list(t.general), [list(p) for p in t.phrases]) for t in texts]
            for joint in (False, True):
                self._layouts[joint] = _build_text_layout(parts, self.ref_lengths, joint)

    def _check_once(self, name: str, value: Any, num_subjects: int) -> None:
        """The value checks of ``mask_buckets`` (range) and ``phrase_masks`` (a valid token per sample), which read
        the host: run once per tensor (and in-place version), so that no routed layer has to."""
        if value is None or self._is_checked(name, value, num_subjects):
            return
        if name == "mask_buckets":
            _check_bucket_range(value, num_subjects)
        else:
            for s, mask in enumerate(value):
                if mask is not None:
                    check_phrase_mask(mask, f"phrase_masks[{s}]")
        # The value itself is kept: its id cannot then be reused by another object while this entry stands.
        self._checked[name] = (value, _fingerprint(value, num_subjects))

    def _is_checked(self, name: str, value: Any, num_subjects: int) -> bool:
        entry = self._checked.get(name)
        if entry is None or entry[0] is not value:
            return False
        # A traced graph cannot read in-place versions; it is guarded on the objects' identity instead.
        return torch.compiler.is_compiling() or entry[1] == _fingerprint(value, num_subjects)

    def _mask_buckets_on(self, device: torch.device) -> torch.Tensor:
        """``mask_buckets`` on ``device``, copied once per tensor and device rather than in every layer."""
        buckets, cached = self.mask_buckets, self._device_buckets
        if cached is None or cached[0] is not buckets or cached[1] != device:
            self._device_buckets = cached = (buckets, device, buckets.to(device))
        return cached[2]

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
        values = {f.name: inputs.get(f.name, getattr(self, f.name)) for f in fields(self)}
        _check_state(values)
        # Read and checked here, once per call of the transformer (the bucket range once per `mask_buckets` tensor),
        # so that the routed layers run the op's trusted path and read nothing back to the host.
        n = len(values["ref_lengths"])
        texts = None if values["text_segments"] is None else _sample_texts(values["text_segments"], n)
        self._check_once("mask_buckets", values["mask_buckets"], n)
        self._check_once("phrase_masks", values["phrase_masks"], n)
        saved = {name: getattr(self, name) for name in inputs}
        for name, value in inputs.items():
            setattr(self, name, value)
        self._set_text_cache(self.text_segments, texts)
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
    if values["backend"] not in available_backends():
        raise ValueError(f"`backend` must be one of {available_backends()}, got {values['backend']!r}")
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


def _fingerprint(value: Any, num_subjects: int) -> tuple:
    tensors = value if isinstance(value, (list, tuple)) else [value]
    return (num_subjects, *(None if t is None else (id(t), t._version) for t in tensors))


def _check_bucket_range(buckets: torch.Tensor, n: int) -> None:
    if buckets.numel():
        lo, hi = (int(x) for x in torch.stack(torch.aminmax(buckets)).tolist())
        if lo < -1 or hi >= n:
            raise ValueError(
                f"`mask_buckets` must hold subject indices in [-1, {n}) (-1 = no subject), got values in [{lo}, {hi}]"
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
        return_modalities=True, check_masks=not state._is_checked("phrase_masks", state.phrase_masks, state.num_subjects),
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
        state._check_once("mask_buckets", state.mask_buckets, state.num_subjects)  # no-op after `activate`
        buckets = state._mask_buckets_on(video_hidden.device)
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
    video = _attend(query[:, :lv], key, value, buckets, state.ref_lengths, state, segment_bias)
    ref_buckets = subject_of_reference_tokens(state.ref_lengths, query.shape[0], query.device)
    if state.ref_attends_video:
        refs = _attend(query[:, lv:], key, value, ref_buckets, state.ref_lengths, state)
    else:
        refs = _attend(query[:, lv:], key[:, lv:], value[:, lv:], ref_buckets, state.ref_lengths, state)
    return torch.cat([video, refs], dim=1)


def _attend(query, key, value, buckets, lengths, state, segment_bias=None, scale=None) -> torch.Tensor:
    # The op's trusted path: buckets come from an argmax ([-1, N) by construction), from `mask_buckets` checked by
    # `activate`, or from a text layout built here; lengths are the state's checked Python ints. No host read.
    return bucketed_attention(
        query, key, value, buckets, lengths, scale=scale, segment_bias=segment_bias, backend=state.op_backend,
        check_inputs=False,
    )  # fmt: skip


@dataclass(frozen=True)
class _SampleText:
    """One sample's text positions, read once from its :class:`TextSegments` (prompt order within each part)."""

    general: tuple[int, ...]
    phrases: tuple[tuple[int, ...], ...]


def _sample_texts(segments: list[TextSegments], num_subjects: int) -> list[_SampleText]:
    """Check ``text_segments`` and read their positions to the host, once per routing state (not per layer)."""
    out = []
    for b, seg in enumerate(segments):
        order = seg.order
        if not isinstance(order, torch.Tensor) or order.ndim != 1 or order.dtype not in (torch.int64, torch.int32):
            got = f"{order.dtype} {tuple(order.shape)}" if isinstance(order, torch.Tensor) else type(order).__name__
            raise ValueError(f"`text_segments[{b}].order` must be a 1-D int64 tensor of text positions, got {got}")
        positions = order.tolist()
        if len(positions) < sum(seg.lengths):
            raise ValueError(
                f"`text_segments[{b}]` has phrases of {sum(seg.lengths)} tokens but orders only {len(positions)}"
            )
        if any(p < 0 for p in positions) or len(set(positions)) != len(positions):
            raise ValueError(f"`text_segments[{b}].order` must list distinct text positions >= 0, got {positions}")
        general = len(positions) - sum(seg.lengths)
        phrases, start = [], general
        for n in seg.lengths:
            phrases.append(tuple(positions[start : start + n]))
            start += n
        out.append(_SampleText(tuple(positions[:general]), tuple(phrases)))
    if any(len(t.phrases) != num_subjects for t in out):
        raise ValueError(f"every `text_segments` entry must have {num_subjects} phrase lengths")
    return out


@dataclass
class _TextLayout:
    """Keys of a batch gathered into slots of one layout shared by every sample, so that one op call serves samples
    whose phrases (or text padding) differ.

    Each sample's key sets (null: its general text; subject ``s``: general text + phrase ``s`` (+ ``s``'s
    references in joint attention)) go to slots of their length; a slot is shared by samples whose sets have the same
    length (with identical prompt layouts there are ``N + 1`` slots, one per set), and a sample's unused slots hold
    copies of its first source token that no query of that sample is routed to. So each query sees exactly its own
    set, as in a per-sample call, with no host read or data-dependent shape in the layer.

    ``index``: ``(B, sum(slot_lengths))`` positions into the gathered source (cross-attention: the text; joint
    attention: ``[refs | text]``); ``slot_of``: ``(B, N + 1)`` slot of null (column 0) and of each subject;
    ``biased``: ``(B, sum(slot_lengths))`` 1.0 on the keys a segment bias applies to (phrase and reference keys);
    ``max_text``: the largest text position (checked against the attention's text length, on the host).
    """

    slot_lengths: list[int]
    index: torch.Tensor
    slot_of: torch.Tensor
    biased: torch.Tensor
    max_text: int
    _devices: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, slot_of, biased)`` on ``device``, copied once per device (from pinned memory, without blocking)."""
        if device.type == "cpu":
            return self.index, self.slot_of, self.biased
        tensors = self._devices.get(str(device))
        if tensors is None:
            pinned = torch.cuda.is_available() and device.type == "cuda"
            tensors = tuple(
                (t.pin_memory() if pinned else t).to(device, non_blocking=pinned)
                for t in (self.index, self.slot_of, self.biased)
            )
            self._devices[str(device)] = tensors
        return tensors


def _build_text_layout(
    texts: list[tuple[list[int], list[list[int]]]], ref_lengths: list[int], joint: bool
) -> _TextLayout:
    """The layout of ``texts`` (per sample: general positions, each subject's phrase positions), on the CPU."""
    shift = sum(ref_lengths) if joint else 0  # joint attention gathers from [refs | text]
    refs = [list(range(sum(ref_lengths[:s]), sum(ref_lengths[: s + 1]))) for s in range(len(ref_lengths))]
    slot_lengths: list[int] = []
    assigned, owners = [], []
    for general, phrases in texts:
        general = [p + shift for p in general]
        sets = [(general, [0.0] * len(general))]
        for s, phrase in enumerate(phrases):
            mine = [p + shift for p in phrase] + (refs[s] if joint else [])
            sets.append((general + mine, [0.0] * len(general) + [1.0] * len(mine)))
        slots, owner = {}, []
        for positions, flags in sets:
            slot = next((j for j, n in enumerate(slot_lengths) if n == len(positions) and j not in slots), None)
            if slot is None:
                slot = len(slot_lengths)
                slot_lengths.append(len(positions))
            slots[slot] = (positions, flags)
            owner.append(slot)
        assigned.append(slots)
        owners.append(owner)
    index = [[p for j, n in enumerate(slot_lengths) for p in slots.get(j, ([0] * n,))[0]] for slots in assigned]
    biased = [
        [f for j, n in enumerate(slot_lengths) for f in slots.get(j, (None, [0.0] * n))[1]] for slots in assigned
    ]
    max_text = max(
        (p for general, phrases in texts for p in (*general, *(q for ph in phrases for q in ph))), default=-1
    )
    batch = len(texts)
    return _TextLayout(
        slot_lengths=slot_lengths,
        index=torch.tensor(index, dtype=torch.long).view(batch, -1),
        slot_of=torch.tensor(owners, dtype=torch.long).view(batch, -1),
        biased=torch.tensor(biased, dtype=torch.float32).view(batch, -1),
        max_text=max_text,
    )


def _text_layout(
    state: SubjectRoutingState,
    batch: int,
    num_text: int,
    device: torch.device,
    joint: bool,
    text_mask: torch.Tensor | None = None,
) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(slot_lengths, index, slot_of, biased)`` of this call (see :class:`_TextLayout`). Without a ``text_mask`` the
    layout was built by :meth:`SubjectRoutingState.activate` (the layer only checks sizes on the host and takes the
    tensors on its device, copied once); a ``text_mask`` (padding: data) is read once per mask tensor (the transformer
    passes one to all its blocks) and its layout kept for the following layers."""
    texts = state._text_positions()
    if texts is not None and len(texts) != batch:
        raise ValueError(f"`text_segments` has {len(texts)} entries for a batch of {batch}")
    if text_mask is None:
        layout = state._layouts[joint]
    else:
        cached = state._layouts.get("mask")
        if cached is not None and cached[0] is text_mask and cached[1] == (text_mask._version, joint, num_text):
            layout = cached[2]
        else:
            if texts is None:
                texts = [_SampleText(tuple(range(num_text)), ((),) * state.num_subjects)] * batch
            real = text_mask.tolist()  # once per mask tensor, not per layer
            kept = [
                ([p for p in t.general if real[b][p]], [[p for p in ph if real[b][p]] for ph in t.phrases])
                for b, t in enumerate(texts)
            ]
            layout = _build_text_layout(kept, state.ref_lengths, joint)
            state._layouts["mask"] = (text_mask, (text_mask._version, joint, num_text), layout)
    if layout.max_text >= num_text:
        raise ValueError(
            f"`text_segments` list text position {layout.max_text}, the attention has {num_text} text tokens"
        )
    return (layout.slot_lengths, *layout.on(device))


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x (B, L, H, D)`` and ``index (B, M)``: one batched gather, no per-sample loop."""
    return torch.gather(x, 1, index[:, :, None, None].expand(-1, -1, *x.shape[2:]))


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
    ``buckets`` covers all ``Lv`` video tokens. Prompts of different phrase layouts run in one batched call (see
    :class:`_TextLayout`); the layout is built once per state, not per layer.
    """
    batch = query.shape[0]
    slot_lengths, index, slot_of, _ = _text_layout(state, batch, key.shape[1], key.device, joint=False)
    ref_buckets = subject_of_reference_tokens(state.ref_lengths, batch, query.device)
    slots = torch.gather(slot_of, 1, torch.cat([buckets.long(), ref_buckets], dim=1) + 1)
    if query_range is not None:
        slots = slots[:, query_range[0] : query_range[1]]
    keys, values = _gather_tokens(key, index), _gather_tokens(value, index)
    return _attend(query, keys, values, slots, slot_lengths, state)


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
    keys, and their own outputs are zeros (what SDPA gives a fully masked query row). The whole batch runs in one
    call per query kind, whatever each sample's phrases or padding (see :class:`_TextLayout`); a ``text_mask`` is read
    to the host once per mask tensor (the transformer passes one to all its blocks), not per layer.
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
    ref_buckets = subject_of_reference_tokens(lengths, batch, vq.device)
    if state.text_segments is None and text_mask is None:
        key, value = torch.cat([tk, vk, rk], dim=1), torch.cat([tv, vv, rv], dim=1)
        video_out = _attend(vq, key, value, buckets, lengths, state, segment_bias)
        if state.ref_attends_video:
            ref_out = _attend(rq, key, value, ref_buckets, lengths, state)
        else:
            kr, vr = torch.cat([tk, rk], dim=1), torch.cat([tv, rv], dim=1)
            ref_out = _attend(rq, kr, vr, ref_buckets, lengths, state)
        return text_out, video_out, ref_out
    # Keys [video | slots], each slot one sample's [general text | phrase_s | ref_s] (or general text for null).
    slot_lengths, index, slot_of, biased = _text_layout(state, batch, lt, vq.device, joint=True, text_mask=text_mask)
    key = torch.cat([vk, _gather_tokens(torch.cat([rk, tk], dim=1), index)], dim=1)
    value = torch.cat([vv, _gather_tokens(torch.cat([rv, tv], dim=1), index)], dim=1)
    video_slots = torch.gather(slot_of, 1, buckets.long() + 1)
    ref_slots = torch.gather(slot_of, 1, ref_buckets + 1)
    if segment_bias is None:
        video_out = _attend(vq, key, value, video_slots, slot_lengths, state)
    else:
        # The bias goes to the phrase and reference keys of a slot, not to its general text: one extra head channel,
        # q' = [q, bias / scale], k' = [k, 1 on those keys, else 0], v' = [v, 0], gives scale * q'.k' = scale * q.k + bias
        # on exactly those keys (the op's own torch backend folds its bias the same way).
        scale = vq.shape[-1] ** -0.5
        flag = torch.cat([biased.new_zeros(batch, lv), biased], dim=1).to(key.dtype)
        flag = flag[:, :, None, None].expand(-1, -1, key.shape[2], 1)
        q_bias = (segment_bias / scale).to(vq.dtype)[:, :, None, None].expand(-1, -1, vq.shape[2], 1)
        video_out = _attend(
            torch.cat([vq, q_bias], -1), torch.cat([key, flag], -1), torch.cat([value, torch.zeros_like(flag)], -1),
            video_slots, slot_lengths, state, scale=scale,
        )[..., :-1]  # fmt: skip
    if state.ref_attends_video:
        ref_out = _attend(rq, key, value, ref_slots, slot_lengths, state)
    else:
        ref_out = _attend(rq, key[:, lv:], value[:, lv:], ref_slots, slot_lengths, state)
    return text_out, video_out, ref_out


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
