"""IngredientsTransformer3DModel: ConsisID's CogVideoX transformer plus Ingredients' per-layer multi-ID router.

Ingredients (Fei et al., ``feizc/Ingredients``) is ConsisID (CogVideoX-5B I2V with a face Q-Former, the *local
facial extractor*, and a Perceiver cross-attention after every ``cross_attn_interval``-th block) in which each
cross-attention is run once per identity and an ID router decides, per video token, which identity's feature is
added: ``H += local_face_scale * sum_n w_n * CrossAttn(F_n, H)``.

Everything but the router is Diffusers' :class:`~diffusers.ConsisIDTransformer3DModel` (same classes, same tensor
names); this subclass adds ``router.{i}`` (:class:`~diasr_diffusers.routing.IngredientsIDRouter`) and the routed
forward. The released checkpoint (``feizhengcong/Ingredients``, ``transformer/`` or ``transformer_ema/``) loads
with ``from_pretrained``: its ``config.json`` uses the released class's argument names, which are translated on load
(:func:`translate_released_config`).

Differences from the released forward (all of them generalisations; with 2 identities, batch 1 and soft routing the
output is the released one, tested to 1e-5 against a re-implementation of it):

- any number of identities ``N`` (``1 <= N <= max_identities``), not exactly 2;
- every batch element is routed with its own hidden states (the released code routes batch element 0 and adds that
  feature to every element: under CFG the conditional branch received the unconditional branch's identity feature);
- ``routing="hard"`` (the paper's top-1) besides the released ``"soft"`` mixing;
- the router logits of every routed layer can be returned (routing maps, the routing loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config

# ModelMixin must be a name of this module: when a pipeline is given this model for a component that its
# model_index.json records under this module, Diffusers checks it against the base classes found here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.consisid_transformer_3d import ConsisIDTransformer3DModel
from diffusers.utils import BaseOutput, apply_lora_scale, logging

from ..routing.ingredients_router import ROUTING_STYLES, IngredientsIDRouter, routing_weights

logger = logging.get_logger(__name__)

# Argument names of the released `IngredientsTransformer3DModel` that Diffusers' ConsisID does not have. The
# released class accepts them but builds its face modules with fixed sizes (`LocalFacialExtractor()`,
# `PerceiverCrossAttention(dim_head=128, heads=16, kv_dim=2/3 * inner_dim)`, `MultiIPRouter()`), so their values
# say nothing about the weights (its training script saved `LFE_output_dim: 768` next to 2048-wide tensors).
RELEASED_ONLY_KEYS = ("LFE_num_tokens", "LFE_heads")
# Keys whose meaning differs between the two classes: dropped from a released config for the reason above.
RELEASED_IGNORED_KEYS = ("LFE_output_dim",)
# Defaults of the released class that differ from Diffusers' ConsisID, for keys a released config may omit.
RELEASED_DEFAULTS = {"is_train_face": True, "cross_attn_interval": 1}
# What the released class hard-codes, for a checkpoint whose width is not 3072 (none exists; kept for the record).
RELEASED_ROUTER_INNER_DIM = 2048


def is_released_config(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` was written by the released Ingredients class (rather than by this one)."""
    return any(k in config for k in RELEASED_ONLY_KEYS) and "router_inner_dim" not in config


def translate_released_config(config: dict[str, Any]) -> dict[str, Any]:
    """Map a released Ingredients ``config.json`` onto this class's arguments; other configs are returned as is.

    The released class builds its face modules with Diffusers' ConsisID default sizes whatever its config says, so
    the released-only keys are dropped and the remaining sizes fall back to those defaults; the released defaults of
    ``is_train_face`` (True) and ``cross_attn_interval`` (1) apply when absent.
    """
    if not is_released_config(config):
        return config
    out = {k: v for k, v in config.items() if k not in RELEASED_ONLY_KEYS + RELEASED_IGNORED_KEYS}
    for key, value in RELEASED_DEFAULTS.items():
        out.setdefault(key, value)
    out["router_inner_dim"] = RELEASED_ROUTER_INNER_DIM
    dropped = {k: config[k] for k in RELEASED_ONLY_KEYS + RELEASED_IGNORED_KEYS if k in config}
    logger.info(f"Read a released Ingredients config; ignored {dropped} as the released model does.")
    return out


@dataclass
class IngredientsTransformerOutput(BaseOutput):
    """Output of :class:`IngredientsTransformer3DModel`.

    Args:
        sample: ``(B, F, C, H, W)`` the model prediction.
        routing_logits: with ``return_routing_logits=True``, one ``(B, L, N)`` tensor per routed layer (``L`` video
            tokens in ``(frame, row, column)`` order, ``N`` identities); ``None`` otherwise.
    """

    sample: torch.Tensor
    routing_logits: tuple[torch.Tensor, ...] | None = None


def _identity_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(
            f"`{name}` must be a list with one entry per identity (the released layout), got {type(value).__name__}"
        )
    return list(value)


class IngredientsTransformer3DModel(ConsisIDTransformer3DModel):
    r"""ConsisID (CogVideoX) transformer with Ingredients' multi-identity router.

    Arguments are :class:`~diffusers.ConsisIDTransformer3DModel`'s (same names and meaning; ``is_train_face``
    defaults to True here) plus:

    Args:
        router_inner_dim: width of the router's scoring space (2048 in the released model).
        max_identities: the most identities one call may route. The router has no hard limit, but the released
            weights were trained with 2 and the released first-frame composite holds 2 faces; past this number a
            call is refused instead of silently extrapolating further.

    Example:
        ```py
        >>> import torch
        >>> from diasr_diffusers.models import IngredientsTransformer3DModel

        >>> model = IngredientsTransformer3DModel.from_pretrained("Ingredients", subfolder="transformer")
        >>> out = model(latents, prompt_embeds, timestep, image_rotary_emb=rope,
        ...             id_cond=[id_cond_1, id_cond_2], id_vit_hidden=[vit_1, vit_2],
        ...             routing="hard", return_routing_logits=True)
        >>> out.sample.shape, len(out.routing_logits)  # one (B, L, 2) logits tensor per routed layer
        ```
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 30,
        attention_head_dim: int = 64,
        in_channels: int = 16,
        out_channels: int | None = 16,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embed_dim: int = 512,
        text_embed_dim: int = 4096,
        num_layers: int = 30,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        activation_fn: str = "gelu-approximate",
        timestep_activation_fn: str = "silu",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        spatial_interpolation_scale: float = 1.875,
        temporal_interpolation_scale: float = 1.0,
        use_rotary_positional_embeddings: bool = False,
        use_learned_positional_embeddings: bool = False,
        is_train_face: bool = True,
        is_kps: bool = False,
        cross_attn_interval: int = 2,
        cross_attn_dim_head: int = 128,
        cross_attn_num_heads: int = 16,
        LFE_id_dim: int = 1280,
        LFE_vit_dim: int = 1024,
        LFE_depth: int = 10,
        LFE_dim_head: int = 64,
        LFE_num_heads: int = 16,
        LFE_num_id_token: int = 5,
        LFE_num_querie: int = 32,
        LFE_output_dim: int = 2048,
        LFE_ff_mult: int = 4,
        LFE_num_scale: int = 5,
        local_face_scale: float = 1.0,
        router_inner_dim: int = 2048,
        max_identities: int = 4,
    ):
        if (
            isinstance(cross_attn_interval, bool)
            or not isinstance(cross_attn_interval, int)
            or cross_attn_interval < 1
        ):
            raise ValueError(f"`cross_attn_interval` must be an integer >= 1, got {cross_attn_interval!r}")
        if is_train_face and num_layers % cross_attn_interval:
            # ConsisID builds num_layers // interval cross-attentions but visits ceil(num_layers / interval).
            raise ValueError(
                f"`num_layers` ({num_layers}) must be a multiple of `cross_attn_interval` ({cross_attn_interval})"
            )
        if isinstance(max_identities, bool) or not isinstance(max_identities, int) or max_identities < 1:
            raise ValueError(f"`max_identities` must be an integer >= 1, got {max_identities!r}")
        if is_train_face and LFE_output_dim != int(num_attention_heads * attention_head_dim / 3 * 2):
            # ConsisID's cross-attention reads identity tokens of width 2/3 of the model width, whatever the config.
            raise ValueError(
                f"`LFE_output_dim` ({LFE_output_dim}) must be 2/3 of the model width "
                f"({num_attention_heads} * {attention_head_dim}), as ConsisID's cross-attention expects"
            )
        if is_kps:
            raise NotImplementedError("`is_kps=True` (keypoint-conditioned ConsisID) is not supported by Ingredients")
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            time_embed_dim=time_embed_dim,
            text_embed_dim=text_embed_dim,
            num_layers=num_layers,
            dropout=dropout,
            attention_bias=attention_bias,
            sample_width=sample_width,
            sample_height=sample_height,
            sample_frames=sample_frames,
            patch_size=patch_size,
            temporal_compression_ratio=temporal_compression_ratio,
            max_text_seq_length=max_text_seq_length,
            activation_fn=activation_fn,
            timestep_activation_fn=timestep_activation_fn,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            spatial_interpolation_scale=spatial_interpolation_scale,
            temporal_interpolation_scale=temporal_interpolation_scale,
            use_rotary_positional_embeddings=use_rotary_positional_embeddings,
            use_learned_positional_embeddings=use_learned_positional_embeddings,
            is_train_face=is_train_face,
            is_kps=is_kps,
            cross_attn_interval=cross_attn_interval,
            cross_attn_dim_head=cross_attn_dim_head,
            cross_attn_num_heads=cross_attn_num_heads,
            LFE_id_dim=LFE_id_dim,
            LFE_vit_dim=LFE_vit_dim,
            LFE_depth=LFE_depth,
            LFE_dim_head=LFE_dim_head,
            LFE_num_heads=LFE_num_heads,
            LFE_num_id_token=LFE_num_id_token,
            LFE_num_querie=LFE_num_querie,
            LFE_output_dim=LFE_output_dim,
            LFE_ff_mult=LFE_ff_mult,
            LFE_num_scale=LFE_num_scale,
            local_face_scale=local_face_scale,
        )
        if is_train_face:
            inner_dim = num_attention_heads * attention_head_dim
            self.router = nn.ModuleList(
                [
                    IngredientsIDRouter(
                        dim=inner_dim, id_dim=LFE_output_dim, id_length=LFE_num_querie, inner_dim=router_inner_dim
                    )
                    for _ in range(self.num_cross_attn)
                ]
            )

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """As :meth:`~diffusers.ConfigMixin.load_config`; a released Ingredients config is translated first."""
        out = super().load_config(*args, **kwargs)
        if isinstance(out, tuple):
            return (translate_released_config(out[0]), *out[1:])
        return translate_released_config(out)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> IngredientsTransformer3DModel:
        """As :meth:`~diffusers.ModelMixin.from_pretrained` (a released ``transformer/`` or ``transformer_ema/``
        folder, or one saved by this class), but strict: a checkpoint missing some of the model's tensors (e.g. a
        ConsisID checkpoint without ``router.*``) is refused instead of running with randomly initialised parts.
        Tensors the model does not have are reported with a warning (the released loader skipped them silently)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys", []))
        if missing:
            more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            raise ValueError(
                f"the checkpoint at {pretrained_model_name_or_path} lacks {len(missing)} tensor(s) of "
                f"{cls.__name__}: {', '.join(missing[:6])}{more}. Is it an Ingredients checkpoint (a ConsisID one has "
                "no `router.*`)?"
            )
        if info.get("unexpected_keys"):
            logger.warning(f"Ignored tensors {cls.__name__} does not have: {sorted(info['unexpected_keys'])[:6]}")
        return (model, info) if want_info else model

    @property
    def num_routed_layers(self) -> int:
        """Number of routed layers (one router and one cross-attention each)."""
        return len(self.router) if self.config.is_train_face else 0

    # ------------------------------------------------------------------------------------------------------------

    def encode_faces(self, id_cond: Sequence[torch.Tensor], id_vit_hidden: Sequence[Sequence[torch.Tensor]]):
        """Identity tokens ``(B_f, N, Q, D)`` from per-identity face features (the local facial extractor).

        Args:
            id_cond: one tensor per identity, ``(LFE_id_dim,)`` or ``(B_f, LFE_id_dim)`` (1280 as released: the
                glintr100 embedding and the normalised EVA-CLIP embedding, concatenated).
            id_vit_hidden: one list per identity of ``LFE_num_scale`` tensors ``(B_f, T, LFE_vit_dim)`` (EVA-CLIP
                hidden states, 5 x ``(1, 577, 1024)`` as released).

        ``B_f`` is 1 (the identities are shared by the whole batch) or the batch size (one set per sample).
        """
        cfg = self.config
        if not cfg.is_train_face:
            raise ValueError("this model was built with `is_train_face=False`: it has no face modules to route")
        id_cond = _identity_list(id_cond, "id_cond")
        id_vit_hidden = _identity_list(id_vit_hidden, "id_vit_hidden")
        if len(id_cond) != len(id_vit_hidden):
            raise ValueError(
                f"`id_cond` has {len(id_cond)} identities but `id_vit_hidden` has {len(id_vit_hidden)}: give one "
                "entry per face in both"
            )
        self.check_num_identities(len(id_cond))
        conds, vits = [], []
        for n, (cond, vit) in enumerate(zip(id_cond, id_vit_hidden)):
            if not isinstance(cond, torch.Tensor) or cond.ndim not in (1, 2) or cond.shape[-1] != cfg.LFE_id_dim:
                got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
                raise ValueError(
                    f"`id_cond[{n}]` must be a ({cfg.LFE_id_dim},) or (B, {cfg.LFE_id_dim}) tensor, got {got}"
                )
            conds.append(cond.reshape(-1, cfg.LFE_id_dim))
            vit = _identity_list(vit, f"id_vit_hidden[{n}]")
            if len(vit) != cfg.LFE_num_scale:
                raise ValueError(
                    f"`id_vit_hidden[{n}]` must hold {cfg.LFE_num_scale} hidden states (one per scale), got {len(vit)}"
                )
            for k, h in enumerate(vit):
                if not isinstance(h, torch.Tensor) or h.ndim != 3 or h.shape[-1] != cfg.LFE_vit_dim:
                    got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                    raise ValueError(f"`id_vit_hidden[{n}][{k}]` must be (B, T, {cfg.LFE_vit_dim}), got {got}")
                if h.shape[0] != conds[-1].shape[0]:
                    raise ValueError(
                        f"`id_vit_hidden[{n}][{k}]` has batch {h.shape[0]} but `id_cond[{n}]` has {conds[-1].shape[0]}"
                    )
            vits.append(vit)
        sizes = {c.shape[0] for c in conds}
        if len(sizes) != 1:
            raise ValueError(f"every identity needs the same batch size in `id_cond`, got {sorted(sizes)}")
        batch = sizes.pop()
        ref = self.local_facial_extractor.latents
        # One extractor call for all identities: it treats each row on its own, so batching them changes nothing.
        cond = torch.cat(conds).to(ref.device, ref.dtype)
        hidden = [torch.cat([v[k] for v in vits]).to(ref.device, ref.dtype) for k in range(cfg.LFE_num_scale)]
        tokens = self.local_facial_extractor(cond, hidden)  # (N * B_f, Q, D), identity-major
        return tokens.unflatten(0, (len(conds), batch)).transpose(0, 1)

    def check_num_identities(self, num_identities: int) -> None:
        """Refuse a number of identities outside ``[1, max_identities]`` (one sentence naming the limit)."""
        if num_identities < 1:
            raise ValueError("at least one identity is needed: `id_cond` and `id_vit_hidden` are empty")
        if num_identities > self.config.max_identities:
            raise ValueError(
                f"got {num_identities} identities but this model routes at most {self.config.max_identities} "
                "(`max_identities` in its config; the released weights were trained with 2)"
            )

    def route(
        self, layer: int, face_embeds: torch.Tensor, hidden_states: torch.Tensor, routing: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The identity feature added after routed layer ``layer``: ``(B, L, C)``, and the router logits ``(B, L, N)``.

        Each identity's feature is ``perceiver_cross_attention[layer](F_n, H)``; ``"soft"`` mixes them with the
        softmax of the logits (released), ``"hard"`` takes the argmax identity's (paper).
        """
        batch, length, width = hidden_states.shape
        faces = face_embeds.to(hidden_states.dtype).expand(batch, -1, -1, -1)
        num_ids = faces.shape[1]
        logits = self.router[layer](faces, hidden_states)
        weights = routing_weights(logits, routing)
        feats = self.perceiver_cross_attention[layer](
            faces.flatten(0, 1), hidden_states.repeat_interleave(num_ids, dim=0)
        ).view(batch, num_ids, length, width)
        if routing == "hard":
            # A gather, not a one-hot sum: the other identities' features never touch the result.
            index = weights.argmax(dim=-1)[:, None, :, None].expand(-1, 1, -1, width)
            return feats.gather(1, index).squeeze(1), logits
        return torch.einsum("bln,bnlc->blc", weights, feats), logits

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: int | float | torch.LongTensor,
        timestep_cond: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        id_cond: Sequence[torch.Tensor] | None = None,
        id_vit_hidden: Sequence[Sequence[torch.Tensor]] | None = None,
        face_embeds: torch.Tensor | None = None,
        routing: str = "soft",
        return_routing_logits: bool = False,
        return_dict: bool = True,
    ) -> IngredientsTransformerOutput | tuple:
        """Predict the noise (CogVideoX's v-prediction) with each video token given its routed identity.

        Args:
            hidden_states: ``(B, F, C, H, W)`` noisy latents (I2V: concatenated with the first-frame latents).
            encoder_hidden_states, timestep, timestep_cond, image_rotary_emb, attention_kwargs: as in
                :class:`~diffusers.ConsisIDTransformer3DModel`.
            id_cond, id_vit_hidden: per-identity face features (see :meth:`encode_faces`); or
            face_embeds: ``(1 or B, N, Q, D)`` from :meth:`encode_faces` (compute once, reuse every step).
            routing: ``"soft"`` (released: softmax mixing) or ``"hard"`` (paper: top-1).
            return_routing_logits: also return each routed layer's ``(B, L, N)`` logits.
            return_dict: return an :class:`IngredientsTransformerOutput` (else a tuple ``(sample,)`` or
                ``(sample, routing_logits)``).
        """
        if routing not in ROUTING_STYLES:
            raise ValueError(f"`routing` must be one of {ROUTING_STYLES}, got {routing!r}")
        batch_size, num_frames, channels, height, width = hidden_states.shape
        if self.config.is_train_face:
            if face_embeds is None:
                if id_cond is None or id_vit_hidden is None:
                    raise ValueError(
                        "pass the faces: `id_cond` and `id_vit_hidden` (one entry per identity), or `face_embeds`"
                    )
                face_embeds = self.encode_faces(id_cond, id_vit_hidden)
            elif id_cond is not None or id_vit_hidden is not None:
                raise ValueError("pass either `face_embeds` or `id_cond`/`id_vit_hidden`, not both")
            self._check_face_embeds(face_embeds, batch_size)

        # 1. Time embedding; 2. patch embedding (as ConsisID).
        t_emb = self.time_proj(timestep).to(dtype=hidden_states.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)
        hidden_states = self.embedding_dropout(self.patch_embed(encoder_hidden_states, hidden_states))
        text_seq_length = encoder_hidden_states.shape[1]
        encoder_hidden_states = hidden_states[:, :text_seq_length]
        hidden_states = hidden_states[:, text_seq_length:]

        # 3. Blocks, each interval-th one followed by the routed identity cross-attention.
        all_logits = []
        ca_idx = 0
        for i, block in enumerate(self.transformer_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states, encoder_hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, emb, image_rotary_emb
                )
            else:
                hidden_states, encoder_hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=emb,
                    image_rotary_emb=image_rotary_emb,
                )
            if self.config.is_train_face and i % self.cross_attn_interval == 0:
                feature, logits = self.route(ca_idx, face_embeds, hidden_states, routing)
                hidden_states = hidden_states + self.local_face_scale * feature
                if return_routing_logits:
                    all_logits.append(logits)
                ca_idx += 1

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        hidden_states = self.norm_final(hidden_states)[:, text_seq_length:]

        # 4. Final block; 5. unpatchify (as ConsisID).
        hidden_states = self.proj_out(self.norm_out(hidden_states, temb=emb))
        p = self.config.patch_size
        output = hidden_states.reshape(batch_size, num_frames, height // p, width // p, -1, p, p)
        output = output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)

        routing_logits = tuple(all_logits) if return_routing_logits else None
        if not return_dict:
            return (output, routing_logits) if return_routing_logits else (output,)
        return IngredientsTransformerOutput(sample=output, routing_logits=routing_logits)

    def _check_face_embeds(self, face_embeds: torch.Tensor, batch_size: int) -> None:
        cfg = self.config
        expected = (cfg.LFE_num_querie, cfg.LFE_output_dim)
        if (
            not isinstance(face_embeds, torch.Tensor)
            or face_embeds.ndim != 4
            or tuple(face_embeds.shape[2:]) != expected
        ):
            got = tuple(face_embeds.shape) if isinstance(face_embeds, torch.Tensor) else type(face_embeds).__name__
            raise ValueError(f"`face_embeds` must be (B, N, {expected[0]}, {expected[1]}), got {got}")
        if face_embeds.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`face_embeds` has batch {face_embeds.shape[0]}; expected 1 (shared) or the batch size {batch_size}"
            )
        self.check_num_identities(face_embeds.shape[1])
