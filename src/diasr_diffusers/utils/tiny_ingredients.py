"""A tiny, randomly initialised Ingredients pipeline built in-process (no downloads): T5, CogVideoX VAE, the
Ingredients transformer and CogVideoX's DPM scheduler at toy width. It shows the mechanics, not image quality."""

from __future__ import annotations

from typing import Any

import torch

TINY_INGREDIENTS_TRANSFORMER = {
    "num_attention_heads": 3,
    "attention_head_dim": 16,
    "in_channels": 8,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 16,
    "num_layers": 4,
    "sample_width": 12,
    "sample_height": 8,
    "sample_frames": 9,
    "patch_size": 2,
    "max_text_seq_length": 16,
    "use_rotary_positional_embeddings": True,
    "use_learned_positional_embeddings": False,
    "cross_attn_interval": 2,
    "cross_attn_dim_head": 8,
    "cross_attn_num_heads": 2,
    "LFE_id_dim": 20,
    "LFE_vit_dim": 16,
    "LFE_depth": 4,
    "LFE_dim_head": 8,
    "LFE_num_heads": 2,
    "LFE_num_id_token": 3,
    "LFE_num_querie": 4,
    "LFE_output_dim": 32,
    "LFE_ff_mult": 2,
    "LFE_num_scale": 2,
    "router_inner_dim": 8,
}
# What the tiny model makes: 64x96 pixels (8x12 latents), 9 frames (3 latent frames), 16 text tokens.
TINY_INGREDIENTS_SIZE = {"height": 64, "width": 96, "num_frames": 9, "max_sequence_length": 16}


def tiny_ingredients_components(seed: int = 0, **transformer_overrides: Any) -> dict[str, Any]:
    """The components of a tiny :class:`~diasr_diffusers.IngredientsPipeline` (random weights)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler
    from transformers import T5Config, T5EncoderModel

    from ..models.transformer_ingredients import IngredientsTransformer3DModel
    from .tiny import tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(max_length=TINY_INGREDIENTS_SIZE["max_sequence_length"])
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).eval()
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    transformer = IngredientsTransformer3DModel(**{**TINY_INGREDIENTS_TRANSFORMER, **transformer_overrides}).eval()
    scheduler = CogVideoXDPMScheduler(
        timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "transformer": transformer,
        "scheduler": scheduler,
    }


def tiny_faces(num_ids: int, batch: int = 1, seed: int = 1, tokens: int = 5, config: dict | None = None):
    """Random per-identity ``id_cond`` / ``id_vit_hidden`` for the tiny transformer (released layout)."""
    cfg = {**TINY_INGREDIENTS_TRANSFORMER, **(config or {})}
    gen = torch.Generator().manual_seed(seed)
    id_cond = [torch.randn(batch, cfg["LFE_id_dim"], generator=gen) for _ in range(num_ids)]
    id_vit = [
        [torch.randn(batch, tokens, cfg["LFE_vit_dim"], generator=gen) for _ in range(cfg["LFE_num_scale"])]
        for _ in range(num_ids)
    ]
    return id_cond, id_vit
