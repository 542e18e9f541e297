"""A tiny, randomly initialised Wan2.1-architecture pipeline built in-process: no downloads.

Used by the test suite and by ``diasr demo``. It has Wan's exact structure (UMT5 text encoder, causal video VAE,
``WanTransformer3DModel``, flow-matching scheduler) at toy width, so every code path runs on a CPU in seconds.
Its weights are random: it shows the mechanics (references, routing, guidance, export), not image quality.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

SPRITES_VAE = "sprites"  # `tiny_wan_components(vae=...)`: the toy VAE trained on synthetic sprites (package asset)

# A small closed vocabulary: what the demo and the tests say. Anything else maps to [UNK].
_WORDS = (
    "a an the and with in on of to is are at by from while near into over under two three four one "
    "man woman girl boy dog cat bottle blue red green yellow orange purple white black striped dotted "
    "checkered solid star circle square triangle ball cup robot bird car tree park kitchen room street "
    "walks runs dances sits plays holds talk talks smiles jumps looks together beside behind next each other "
    "sunny sunlit bright dark video scene camera slowly quickly , ."
).split()


def _vocabulary() -> list[str]:
    # The synthetic sprite generator's words too, so its phrases are real tokens for the toy text encoder.
    from ..data.synthetic import BACKGROUNDS, COLORS, PATTERNS, SHAPES

    extra = " ".join([*SHAPES, *COLORS, *PATTERNS, *BACKGROUNDS.values()]).split()
    extra += "moves move drifts drift across moving turn turns pass front".split()
    return list(dict.fromkeys([*_WORDS, *extra]))


def tiny_tokenizer(max_length: int = 512):
    """A word-level fast tokenizer (with offsets) standing in for UMT5's: ``</s>`` appended, ``<pad>`` = 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in _vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _tiny_t5_kwargs(tokenizer: Any, text_dim: int) -> dict[str, Any]:
    # One toy T5 size for every family (Wan's UMT5, CogVideoX's T5).
    return dict(
        vocab_size=len(tokenizer),
        d_model=text_dim,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
    )


def toy_vae_path(vae: str | os.PathLike) -> str:
    """The folder of a toy VAE: ``"sprites"`` (the package asset) or a saved ``AutoencoderKLWan`` folder."""
    if vae == SPRITES_VAE:
        from importlib import resources

        return str(resources.files("diasr_diffusers") / "assets" / "toy_vae")
    if not (Path(vae).expanduser() / "config.json").is_file():
        raise ValueError(f"`vae` must be None, {SPRITES_VAE!r} or a saved AutoencoderKLWan folder, got {vae!r}")
    return str(Path(vae).expanduser())


def tiny_wan_components(
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 12,
    text_dim: int = 32,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    ffn_dim: int = 32,
    vae: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``tokenizer, text_encoder, vae, scheduler, transformer`` of a toy Wan2.1, deterministic in ``seed``.

    ``vae``:
        - ``None``: a random toy VAE (8x spatial, 4x temporal, like Wan's). Fast, but its latents do not keep
          appearance: a sprite and its reference image get unrelated latents.
        - ``"sprites"``: the toy VAE shipped in ``diasr_diffusers/assets/toy_vae``, trained by
          ``examples/train_toy_vae.py`` to reconstruct synthetic sprite clips (4x spatial, 2x temporal compression,
          latent statistics measured on its training clips). Use it to train routing on ``make-synthetic`` data.
        - a folder with a saved ``AutoencoderKLWan``.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(**_tiny_t5_kwargs(tokenizer, text_dim))).eval()
    if vae is None:
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ).eval()
    else:
        vae = AutoencoderKLWan.from_pretrained(toy_vae_path(vae)).eval()
    transformer = _tiny_wan_transformer(
        seed,
        num_layers,
        num_attention_heads,
        attention_head_dim,
        text_dim,
        patch_size,
        ffn_dim,
        in_channels=vae.config.z_dim,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": scheduler,
        "transformer": transformer,
    }


def _tiny_wan_transformer(
    seed: int,
    num_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    text_dim: int,
    patch_size: tuple[int, int, int],
    ffn_dim: int,
    in_channels: int,
):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=tuple(patch_size),
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


WAN22_KINDS = ("a14b", "ti2v")


def tiny_wan22_components(
    kind: str = "a14b",
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 12,
    text_dim: int = 32,
    ffn_dim: int = 32,
    boundary_ratio: float = 0.875,
) -> dict[str, Any]:
    """The components of a toy Wan2.2, laid out as Diffusers' Wan2.2 pipelines take them (random weights).

    ``kind``:
        - ``"a14b"`` (T2V/I2V-A14B layout): two experts of the same architecture, ``transformer`` (high noise, seeded
          ``seed``) and ``transformer_2`` (low noise, seeded ``seed + 1``), switched at ``boundary_ratio``; Wan2.1's
          16-channel VAE (8x spatial).
        - ``"ti2v"`` (TI2V-5B layout): one transformer with 48 latent channels, ``expand_timesteps=True``
          (per-token timesteps), and a Wan2.2-style VAE: ``z_dim=48``, a 2x2 pixel patchify in the VAE
          (``is_residual``, ``patch_size=2``), 16x spatial and 4x temporal compression, so sizes are multiples of 32.
    """
    if kind not in WAN22_KINDS:
        raise ValueError(f"`kind` must be one of {WAN22_KINDS}, got {kind!r}")
    sizes = dict(num_layers=num_layers, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
                 text_dim=text_dim, ffn_dim=ffn_dim, patch_size=(1, 2, 2))  # fmt: skip
    comps = tiny_wan_components(seed=seed, **sizes)
    if kind == "a14b":
        comps["transformer_2"] = _tiny_wan_transformer(seed + 1, in_channels=16, **sizes)
        comps["boundary_ratio"] = boundary_ratio
        return comps
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    comps["vae"] = AutoencoderKLWan(
        base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
        dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
    ).eval()  # fmt: skip
    comps["transformer"] = _tiny_wan_transformer(seed, in_channels=48, **sizes)
    comps["expand_timesteps"] = True
    return comps


def tiny_ltx_components(
    seed: int = 0, num_layers: int = 2, num_attention_heads: int = 2, attention_head_dim: int = 12, text_dim: int = 32
) -> dict[str, Any]:
    """``scheduler, vae, text_encoder, tokenizer, transformer`` of a toy LTX-Video (random weights, no download).

    The VAE keeps LTX-Video's token geometry: a 4x4 pixel patchify and three 2x down-samplings in space and time, so
    32x spatial and 8x temporal compression (``num_frames = 8k + 1``, sizes multiples of 32); the transformer has
    patch size 1, like LTX-Video's. The text encoder is a one-layer T5 of width ``text_dim`` (LTX's
    ``caption_channels``).
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(**_tiny_t5_kwargs(tokenizer, text_dim))).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=False, patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()  # fmt: skip
    torch.manual_seed(seed)
    inner = num_attention_heads * attention_head_dim
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim, cross_attention_dim=inner, num_layers=num_layers,
        caption_channels=text_dim,
    ).eval()  # fmt: skip
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def tiny_cogvideox_components(
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_dim: int = 32,
    use_rotary_positional_embeddings: bool = True,
) -> dict[str, Any]:
    """``tokenizer, text_encoder, vae, transformer, scheduler`` of a toy CogVideoX, deterministic in ``seed``.

    CogVideoX's exact structure at toy width: T5 encoder, ``AutoencoderKLCogVideoX`` (8x spatial, 4x temporal, like
    the real one), ``CogVideoXTransformer3DModel`` (spatial patch 2, rotary embeddings as CogVideoX-5B, or sincos
    positions as CogVideoX-2B with ``use_rotary_positional_embeddings=False``) and the v-prediction DDIM scheduler
    with CogVideoX's published config. Random weights: mechanics only.
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer(max_length=226)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(**_tiny_t5_kwargs(tokenizer, text_dim))).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()  # fmt: skip
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=text_dim,
        num_layers=num_layers,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,
        use_rotary_positional_embeddings=use_rotary_positional_embeddings,
    ).eval()
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        set_alpha_to_one=True, snr_shift_scale=1.0, timestep_spacing="trailing",
    )  # fmt: skip
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "transformer": transformer,
        "scheduler": scheduler,
    }


_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_tokenizer(max_length: int = 2048):
    """A word-level fast tokenizer (with offsets) standing in for Qwen2.5-VL's: Qwen's chat special tokens and its
    ChatML template, ``<|endoftext|>`` as padding, no special tokens added outside the template."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<unk>": 3}
    for w in [*_vocabulary(), "system", "user", "assistant", '"']:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        model_max_length=max_length, chat_template=_QWEN_CHAT_TEMPLATE, padding_side="right",
    )  # fmt: skip


def tiny_hunyuan_video15_components(
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_dim: int = 16,
    guidance_scale: float = 6.0,
) -> dict[str, Any]:
    """The components of a toy HunyuanVideo-1.5 text-to-video pipeline (``HunyuanVideo15Pipeline`` /
    ``DiasRHunyuanVideo15Pipeline``), deterministic in ``seed``.

    HunyuanVideo-1.5's structure at toy width: a Qwen2.5-VL text model behind a ChatML template
    (:func:`tiny_qwen_tokenizer`), a ByT5 glyph encoder (T5 with the byte-level ``ByT5Tokenizer``),
    ``AutoencoderKLHunyuanVideo15`` (4x spatial, 2x temporal here; 16x / 4x in the real one),
    ``HunyuanVideo15Transformer3DModel`` (patch 1, ``in_channels = 2 * latent channels + 1``: latents, condition
    latents, condition mask), the flow-matching scheduler and classifier-free guidance. Random weights: mechanics only.
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, rope_theta=1e6, bos_token_id=None, eos_token_id=2,
            pad_token_id=0, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        )
    ).eval()  # fmt: skip
    tokenizer_2 = ByT5Tokenizer()
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(T5Config(**{**_tiny_t5_kwargs(tokenizer_2, 8), "vocab_size": len(tokenizer_2)})).eval()  # fmt: skip
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4, block_out_channels=(8, 8), layers_per_block=1, spatial_compression_ratio=4,
        temporal_compression_ratio=2, downsample_match_channel=False, upsample_match_channel=False,
    ).eval()  # fmt: skip
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
        num_layers=num_layers, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=text_dim, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6), target_size=32, task_type="t2v",
    ).eval()  # fmt: skip
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "tokenizer_2": tokenizer_2,
        "text_encoder_2": text_encoder_2,
        "vae": vae,
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
        "guider": ClassifierFreeGuidance(guidance_scale=guidance_scale),
    }


def configure_tiny_hunyuan_video15(pipe: Any) -> Any:
    """Set the toy text lengths on a (stock or DiasR) HunyuanVideo-1.5 pipeline built from
    :func:`tiny_hunyuan_video15_components`; returns it. The stock pipeline keeps them as instance attributes (set
    again after ``from_pretrained``): the chat-template crop at the end of the toy template's system turn (95 tokens
    here; HunyuanVideo-1.5's ``prompt_template_encode_start_idx=108`` is that point for Qwen's tokenizer), 16 ByT5
    tokens (256) and 4 image tokens (729)."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    chat = format_text_input(["X"], pipe.system_message)[0]
    text = pipe.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(text[: text.rfind("X")], add_special_tokens=False).input_ids)  # fmt: skip
    pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 16, 4
    return pipe
