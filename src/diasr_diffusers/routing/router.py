"""The ID router: dual-modal identity anchors and per-layer similarity routing.

Per subject ``s``, learnable identity queries cross-attend to the subject's reference-image tokens and, separately,
to its phrase's text features; each result is pooled to one vector (Ingredients' ``W_aggr``) and the two are summed
into the subject's *anchor* (DiasR's dual-modal identity anchor). Learnable *null* anchors absorb background.
At a routed layer, every video token ``h_i`` is scored against every anchor:
``S[i, s] = <f(LN(h_i)), g(a_s)> / sqrt(d)``, null last. Hard routing is the argmax (null -> bucket ``-1``).

Gradients when the forward routing is hard: the router is trained by its own losses on ``S``
(:func:`routing_cross_entropy`, :func:`mask_loss`), and optionally through the attention itself by passing
``segment_bias = logp - logp.detach()`` (the log-probability of the chosen bucket, straight-through) to
:func:`~diasr_diffusers.ops.bucketed_attention`: the forward is unchanged and the attention's gradient reaches ``S``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from .._diffusers_compat import add_variant, get_model_file
from ..utils.checkpoints import describe_mismatch, safetensors_shapes

# Sanity bounds for configs read from untrusted files: far above any real router (Wan2.1-14B's is ~0.1 B parameters),
# low enough that a hostile `num_layers: 2000000` fails at once instead of allocating for minutes.
MAX_ROUTER_LAYERS = 4096
MAX_ROUTER_PARAMETERS = 2**30
MAX_CONTEXT_KERNEL = 63


def _check_size(value: Any, name: str, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper is not None and value > upper):
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"IDRouter `{name}` must be an integer >= 1{bound}, got {value!r}")
    return value


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def buckets_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Hard routing from ``(B, L, N + 1)`` logits (null last): ``(B, L)`` int64, null -> ``-1``.

    A row with a NaN logit goes to null (``-1``): argmax would hand it to whichever subject holds the NaN, and a
    NaN token must not claim a subject (its NaN still shows in the output). No device sync, so no check is raised.
    """
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"`logits` must be (..., N + 1) with the null logit last, got shape {tuple(logits.shape)}")
    idx = logits.argmax(dim=-1)
    null = (idx == logits.shape[-1] - 1) | logits.isnan().any(dim=-1)
    return torch.where(null, torch.full_like(idx, -1), idx)


def check_phrase_mask(mask: torch.Tensor, name: str) -> None:
    """Refuse a ``(B, T)`` phrase mask with a sample that has no valid token: its text anchor would be NaN. Reads one
    value back to the host."""
    if not bool(mask.any(dim=1).all()):
        raise ValueError(
            f"`{name}` has a sample with no valid phrase token (its text anchor would be NaN); "
            "pass `text_tokens[s]=None` for an image-only anchor"
        )


def chosen_log_prob(logits: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """Log-probability ``(B, L)`` of the chosen bucket (null included): the carrier of router gradients."""
    idx = torch.where(buckets < 0, torch.full_like(buckets, logits.shape[-1] - 1), buckets)
    return F.log_softmax(logits.float(), dim=-1).gather(-1, idx[..., None]).squeeze(-1)


def resolve_routed_layers(routed_layers: str | int | Sequence[int], num_layers: int) -> list[int]:
    """``"all"`` -> every layer; ``k`` (int) -> every k-th layer from 0; a list -> those layers (sorted, unique)."""
    if routed_layers == "all":
        return list(range(num_layers))
    if isinstance(routed_layers, int) and not isinstance(routed_layers, bool):
        if routed_layers < 1:
            raise ValueError(f"`routed_layers` as an int is a stride and must be >= 1, got {routed_layers}")
        return list(range(0, num_layers, routed_layers))
    if isinstance(routed_layers, Sequence) and not isinstance(routed_layers, str):
        # int(1.5) == 1 and int(True) == 1 would pick a layer nobody asked for.
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in routed_layers):
            raise ValueError(f"`routed_layers` must hold integer layer indices, got {list(routed_layers)}")
        layers = sorted(set(routed_layers))
        if not layers or layers[0] < 0 or layers[-1] >= num_layers:
            raise ValueError(
                f"`routed_layers` must be non-empty indices in [0, {num_layers}), got {list(routed_layers)}"
            )
        return layers
    raise ValueError(
        f"`routed_layers` must be 'all', a stride (int) or a list of layer indices, got {routed_layers!r}"
    )


def _mlp(in_dim: int, out_dim: int, out_bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim, bias=out_bias))


class _AnchorPooler(nn.Module):
    """Identity queries cross-attend to one modality's tokens; a learned weighting pools them into one vector."""

    def __init__(self, in_dim: int, dim: int, num_queries: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        # Ingredients' W_aggr / id_merge. No bias: the anchor LayerNorm would remove it (zero gradient).
        self.pool = nn.Linear(num_queries, 1, bias=False)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # queries (Q, dim); tokens (M, T, in_dim); mask (M, T) True = valid -> (M, dim)
        kv = self.proj(self.norm(tokens))
        q = queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        pad = None if mask is None else ~mask
        out, _ = self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)
        return self.pool(out.transpose(1, 2)).squeeze(-1)


class IDRouter(ModelMixin, ConfigMixin):
    r"""Routes each video token to one subject (or to none) by similarity to dual-modal identity anchors.

    Args:
        hidden_dim: width of the video transformer's tokens (Wan2.1-1.3B: 1536).
        text_dim: width of the text encoder's features used for phrase anchors (UMT5-XXL: 4096).
        num_layers: transformer blocks in the host model.
        routed_layers: ``"all"``, a stride ``k`` (every k-th layer from 0), or a list of layer indices. Other
            layers reuse the routing of the nearest routed layer before them (the first routed layer before it).
        router_dim: width of the similarity space.
        num_identity_queries: learnable identity queries per modality.
        num_heads: heads of the anchor cross-attention.
        num_null_anchors: learnable null anchors (their best score is the null logit).
        max_subjects: the most subjects one call may route.
        context_kernel: ``k > 1`` also feeds each video token's ``k x k`` neighbourhood mean (within its latent frame)
            to ``f``: spatial context for shallow transformers, whose tokens carry little of it. Needs the token grid
            (``forward(..., grid=(F, H, W))``; the processors pass ``SubjectRoutingState.video_grid``). ``1``: off.

    Example:
        ```py
        >>> from diasr_diffusers import IDRouter
        >>> router = IDRouter.from_transformer(pipe.transformer, routed_layers=2)
        >>> router.save_pretrained("my-router")  # safetensors + config.json
        >>> router = IDRouter.from_pretrained("my-router")
        ```
    """

    config_name = "config.json"
    # nn.MultiheadAttention reads its out_proj weight directly, not through out_proj's forward, so layerwise casting
    # would never upcast it: keep the anchor poolers' attention out of FP8 storage (it is a small part of the router).
    _skip_layerwise_casting_patterns = ["attn"]

    @register_to_config
    def __init__(
        self,
        hidden_dim: int = 1536,
        text_dim: int = 4096,
        num_layers: int = 30,
        routed_layers: str | int | list[int] = "all",
        router_dim: int = 256,
        num_identity_queries: int = 8,
        num_heads: int = 4,
        num_null_anchors: int = 1,
        max_subjects: int = 4,
        context_kernel: int = 1,
    ):
        super().__init__()
        if (
            isinstance(context_kernel, bool)
            or not isinstance(context_kernel, int)
            or context_kernel < 1
            or context_kernel % 2 == 0
            or context_kernel > MAX_CONTEXT_KERNEL  # the pooling costs k^2 per token: a huge k hangs the forward
        ):
            raise ValueError(
                f"`context_kernel` must be an odd integer in [1, {MAX_CONTEXT_KERNEL}], got {context_kernel}"
            )
        for name, value in (("hidden_dim", hidden_dim), ("text_dim", text_dim), ("router_dim", router_dim)):
            _check_size(value, name)
        _check_size(num_layers, "num_layers", MAX_ROUTER_LAYERS)
        for name, value in (("num_identity_queries", num_identity_queries), ("num_null_anchors", num_null_anchors)):
            _check_size(value, name)
        _check_size(max_subjects, "max_subjects")
        if _check_size(num_heads, "num_heads") > router_dim or router_dim % num_heads:
            raise ValueError(f"IDRouter `num_heads` ({num_heads}) must divide `router_dim` ({router_dim})")
        self.routed_layer_indices = resolve_routed_layers(routed_layers, num_layers)
        token_dim = hidden_dim * (2 if context_kernel > 1 else 1)
        self._check_parameter_budget(hidden_dim, text_dim, token_dim, router_dim, num_identity_queries,
                                     num_heads, num_null_anchors)  # fmt: skip
        self.identity_queries = nn.Parameter(torch.randn(num_identity_queries, router_dim) * router_dim**-0.5)
        self.image_pooler = _AnchorPooler(hidden_dim, router_dim, num_identity_queries, num_heads)
        self.text_pooler = _AnchorPooler(text_dim, router_dim, num_identity_queries, num_heads)
        self.anchor_norm = nn.LayerNorm(router_dim)
        self.null_anchors = nn.Parameter(torch.randn(num_null_anchors, router_dim) * router_dim**-0.5)
        # f (video tokens) and g (anchors), two-layer MLPs as in Ingredients, one pair per routed layer.
        self.token_norm = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.to_token = nn.ModuleList(_mlp(token_dim, router_dim) for _ in self.routed_layer_indices)
        # A bias on g(a) shifts every class's logit of a token equally (softmax-invariant): none.
        self.to_anchor = nn.ModuleList(_mlp(router_dim, router_dim, out_bias=False) for _ in self.routed_layer_indices)

    def _check_parameter_budget(
        self, hidden_dim, text_dim, token_dim, router_dim, num_queries, num_heads, num_null
    ) -> None:  # fmt: skip
        # Counted on the meta device with the same builders, one routed head standing for all: no allocation.
        with torch.device("meta"):
            shared = _numel(_AnchorPooler(hidden_dim, router_dim, num_queries, num_heads))
            shared += _numel(_AnchorPooler(text_dim, router_dim, num_queries, num_heads))
            head = _numel(_mlp(token_dim, router_dim)) + _numel(_mlp(router_dim, router_dim, out_bias=False))
        total = shared + (num_queries + num_null + 2) * router_dim + head * len(self.routed_layer_indices)
        if total > MAX_ROUTER_PARAMETERS:
            raise ValueError(
                f"this IDRouter config would allocate {total:,} parameters (more than {MAX_ROUTER_PARAMETERS:,}): "
                "check hidden_dim, text_dim, router_dim, num_layers and routed_layers"
            )

    @staticmethod
    def host_sizes(transformer: Any) -> dict[str, int]:
        """``hidden_dim``, ``text_dim`` and ``num_layers`` of a Diffusers video transformer, as a router needs them."""
        from ..families import UnsupportedFamilyError, family_for_transformer

        cfg = transformer.config
        # The text width's config key is a family fact (Wan: text_dim, LTX: caption_channels, CogVideoX: ...).
        try:
            text_dim = family_for_transformer(transformer).text_dim(cfg)
        except UnsupportedFamilyError as err:
            raise ValueError(
                f"cannot read the sizes (text_dim) of a {type(transformer).__name__}: {err}; build the router with "
                "`IDRouter(hidden_dim=..., text_dim=..., num_layers=...)`"
            ) from None
        return {
            "hidden_dim": cfg.num_attention_heads * cfg.attention_head_dim,
            "text_dim": text_dim,
            "num_layers": cfg.num_layers,
        }

    @classmethod
    def from_transformer(cls, transformer: Any, **kwargs: Any) -> IDRouter:
        """A router sized for a Diffusers video transformer (hidden size, text width and depth read off it)."""
        return cls(**{**cls.host_sizes(transformer), **kwargs})

    def check_compatible(self, transformer: Any) -> None:
        """Raise a ``ValueError`` (one sentence) if this router was not built for ``transformer``'s sizes."""
        host = self.host_sizes(transformer)
        wrong = [f"{k} {self.config[k]} (the transformer has {v})" for k, v in host.items() if self.config[k] != v]
        if wrong:
            raise ValueError(
                f"the IDRouter does not fit this {type(transformer).__name__}: it has {', '.join(wrong)}; "
                "train or load a router for this model (`IDRouter.from_transformer`)"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> IDRouter:
        """Load a router saved with ``save_pretrained`` (a local folder or a Hub id), as ``ModelMixin`` does, after
        checking the untrusted files before any weights are allocated: the config's sizes are bounded, and the
        safetensors file must hold exactly the tensors that config builds, with the same shapes. Only safetensors
        weights are read (never pickle)."""
        from ..utils.checkpoint_paths import check_loader_sources

        kwargs = check_loader_sources(kwargs, id_router=pretrained_model_name_or_path)
        if kwargs.get("use_safetensors") is False:
            raise ValueError("IDRouter weights are loaded from safetensors only (`use_safetensors=False` is refused)")
        kwargs["use_safetensors"] = True
        hub_keys = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
        hub = {k: kwargs.get(k) for k in hub_keys}
        hub["force_download"] = bool(hub["force_download"])
        config = cls.load_config(pretrained_model_name_or_path, **hub)
        weights = get_model_file(
            pretrained_model_name_or_path,
            weights_name=add_variant(SAFETENSORS_WEIGHTS_NAME, kwargs.get("variant")),
            user_agent=None,
            commit_hash=None,
            **hub,
        )
        cls._check_checkpoint(config, weights)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _check_checkpoint(cls, config: dict[str, Any], weights: str | os.PathLike) -> None:
        where = os.fspath(weights)
        with torch.device("meta"):
            try:
                expected = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f"the IDRouter config next to {where} is invalid: {e}") from e
        found = safetensors_shapes([Path(where)])
        problems = describe_mismatch(expected, found)
        if problems:
            raise ValueError(f"the IDRouter weights {where} do not match their config.json: {'; '.join(problems)}")

    # -- anchors ----------------------------------------------------------------------------------------------

    def head_index(self, layer_idx: int) -> int:
        """Index of the routing head serving ``layer_idx``: its own if routed, else the last routed one before it
        (the first one for layers before any routed layer)."""
        if (
            isinstance(layer_idx, bool)
            or not isinstance(layer_idx, int)
            or not 0 <= layer_idx < self.config.num_layers
        ):
            raise ValueError(f"`layer_idx` must be an integer in [0, {self.config.num_layers}), got {layer_idx!r}")
        heads = [i for i, layer in enumerate(self.routed_layer_indices) if layer <= layer_idx]
        return heads[-1] if heads else 0

    def is_routed(self, layer_idx: int) -> bool:
        return layer_idx in self.routed_layer_indices or layer_idx < self.routed_layer_indices[0]

    def encode_anchors(
        self,
        image_tokens: Sequence[torch.Tensor],
        text_tokens: Sequence[torch.Tensor | None] | None = None,
        text_masks: Sequence[torch.Tensor | None] | None = None,
        return_modalities: bool = False,
        check_masks: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Dual-modal anchors, one per subject.

        Args:
            image_tokens: per subject, ``(B, R_s, hidden_dim)`` reference-image tokens.
            text_tokens: per subject, ``(B, T_s, text_dim)`` phrase features, or ``None`` (image-only anchor).
            text_masks: per subject, ``(B, T_s)`` bool (True = valid) for padded phrase features.
            return_modalities: also return the image-only and text-only anchors (for the alignment loss).
            check_masks: refuse a ``text_masks`` row with no valid token (its anchor would be NaN). The check reads a
                value back to the host (a device sync on a GPU); the routing processors, which call this in every
                routed layer, pass ``False`` because ``SubjectRoutingState.activate`` checked the masks once.

        Returns:
            ``(B, N, router_dim)`` anchors (and ``(B, N, router_dim)`` image, ``(B, N, router_dim)`` or ``None``
            text anchors when ``return_modalities``).
        """
        n = len(image_tokens)
        if n == 0:
            raise ValueError("`image_tokens` must hold at least one subject")
        if n > self.config.max_subjects:
            raise ValueError(f"{n} subjects given but this router supports at most {self.config.max_subjects}")
        text_tokens = list(text_tokens) if text_tokens is not None else [None] * n
        text_masks = list(text_masks) if text_masks is not None else [None] * n
        if len(text_tokens) != n or len(text_masks) != n:
            raise ValueError(f"`text_tokens`/`text_masks` need one entry per subject ({n})")
        self._check_anchor_inputs(image_tokens, text_tokens, text_masks, check_masks)
        # The host transformer may run in another dtype (bf16) than the router (float32, or its layerwise-casting
        # compute dtype): compute in the router's, as `forward` does.
        image_tokens = [t.to(self.dtype) for t in image_tokens]
        text_tokens = [t.to(self.dtype) if t is not None else None for t in text_tokens]
        img = torch.stack([self.image_pooler(self.identity_queries, t, None) for t in image_tokens], dim=1)
        txt = None
        if any(t is not None for t in text_tokens):
            txt = torch.stack(
                [
                    self.text_pooler(self.identity_queries, t, m) if t is not None else torch.zeros_like(img[:, 0])
                    for t, m in zip(text_tokens, text_masks)
                ],
                dim=1,
            )
        anchors = self.anchor_norm(img if txt is None else img + txt)
        return (anchors, img, txt) if return_modalities else anchors

    def _check_anchor_inputs(self, image_tokens, text_tokens, text_masks, check_masks: bool = True) -> None:
        # Shapes torch would reject deep inside MultiheadAttention, or (an all-padding phrase) turn into NaN anchors.
        cfg = self.config
        batch = None
        for s, (img, txt, mask) in enumerate(zip(image_tokens, text_tokens, text_masks)):
            if (
                not isinstance(img, torch.Tensor)
                or img.ndim != 3
                or img.shape[1] == 0
                or img.shape[2] != cfg.hidden_dim
            ):
                got = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
                raise ValueError(f"`image_tokens[{s}]` must be (B, R >= 1, {cfg.hidden_dim}), got {got}")
            batch = img.shape[0] if batch is None else batch
            if img.shape[0] != batch:
                raise ValueError(f"`image_tokens[{s}]` has batch {img.shape[0]}, subject 0 has {batch}")
            if txt is None:
                continue
            if not isinstance(txt, torch.Tensor) or txt.ndim != 3 or txt.shape[0] != batch or txt.shape[1] == 0:
                got = tuple(txt.shape) if isinstance(txt, torch.Tensor) else type(txt).__name__
                raise ValueError(f"`text_tokens[{s}]` must be ({batch}, T >= 1, {cfg.text_dim}), got {got}")
            if txt.shape[2] != cfg.text_dim:
                raise ValueError(f"`text_tokens[{s}]` must be ({batch}, T, {cfg.text_dim}), got {tuple(txt.shape)}")
            if mask is not None:
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != txt.shape[:2]:
                    got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__
                    raise ValueError(f"`text_masks[{s}]` must be bool {tuple(txt.shape[:2])}, got {got}")
                if check_masks:
                    check_phrase_mask(mask, f"text_masks[{s}]")

    # -- routing ----------------------------------------------------------------------------------------------

    def forward(
        self,
        video_tokens: torch.Tensor,
        anchors: torch.Tensor,
        layer_idx: int = 0,
        grid: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """Routing logits ``(B, Lv, N + 1)`` (null last) for ``video_tokens (B, Lv, hidden_dim)`` and
        ``anchors (B, N, router_dim)`` at transformer layer ``layer_idx``. ``grid``: the ``(F, H, W)`` token grid
        (``F * H * W = Lv``, tokens in that order), needed when ``context_kernel > 1``."""
        head = self.head_index(layer_idx)
        cfg = self.config
        if (
            not isinstance(video_tokens, torch.Tensor)
            or video_tokens.ndim != 3
            or video_tokens.shape[-1] != cfg.hidden_dim
        ):
            got = tuple(video_tokens.shape) if isinstance(video_tokens, torch.Tensor) else type(video_tokens).__name__
            raise ValueError(f"`video_tokens` must be (B, Lv, {cfg.hidden_dim}), got {got}")
        batch = video_tokens.shape[0]
        if (
            not isinstance(anchors, torch.Tensor)
            or anchors.ndim != 3
            or anchors.shape[0] != batch
            or anchors.shape[2] != cfg.router_dim
        ):
            got = tuple(anchors.shape) if isinstance(anchors, torch.Tensor) else type(anchors).__name__
            raise ValueError(f"`anchors` must be ({batch}, N, {cfg.router_dim}) for these video tokens, got {got}")
        tokens = self.token_norm(video_tokens.to(self.dtype))
        if self.config.context_kernel > 1:
            tokens = torch.cat([tokens, self._local_mean(tokens, grid)], dim=-1)
        tokens = self.to_token[head](tokens)
        keys = self.to_anchor[head](
            torch.cat([anchors.to(self.dtype), self.null_anchors.expand(anchors.shape[0], -1, -1)], 1)
        )
        sim = torch.einsum("bld,bnd->bln", tokens, keys) * tokens.shape[-1] ** -0.5
        n = anchors.shape[1]
        null = sim[..., n:].logsumexp(dim=-1, keepdim=True)
        return torch.cat([sim[..., :n], null], dim=-1)

    def _local_mean(self, tokens: torch.Tensor, grid: tuple[int, int, int] | None) -> torch.Tensor:
        """``(B, Lv, D)`` mean of each token's ``k x k`` neighbourhood in its frame (border windows are smaller)."""
        k = self.config.context_kernel
        valid = isinstance(grid, (tuple, list)) and len(grid) == 3
        valid = valid and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
        if not valid or math.prod(grid) != tokens.shape[1]:
            raise ValueError(
                f"this router has `context_kernel={k}` and needs `grid=(F, H, W)` with F*H*W = {tokens.shape[1]} "
                f"video tokens, got {grid} (through the processors: `state.activate(..., video_grid=(F, H, W))`)"
            )
        b, (f, h, w), d = tokens.shape[0], grid, tokens.shape[-1]
        frames = tokens.view(b * f, h, w, d).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(frames, k, stride=1, padding=k // 2, count_include_pad=False)
        return pooled.permute(0, 2, 3, 1).reshape(b, f * h * w, d)

    buckets = staticmethod(buckets_from_logits)
    chosen_log_prob = staticmethod(chosen_log_prob)
