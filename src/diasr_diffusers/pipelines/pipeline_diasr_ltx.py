"""DiasRLTXPipeline: multi-subject video generation on LTX-Video with subject-sparse routed attention."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline, calculate_shift, retrieve_timesteps
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import T5EncoderModel, T5TokenizerFast

from ..processors import SubjectRoutingState, TextSegments
from ..routing import IDRouter
from ..utils.images import letterbox
from .subjects import DenoiseCall, DiasRPipelineOutput, SubjectPipelineMixin, _check_real

logger = logging.get_logger(__name__)


class DiasRLTXPipeline(SubjectPipelineMixin, LTXPipeline):
    r"""Multi-subject video generation with LTX-Video and DiasR subject-sparse routed attention.

    The same call signature and outputs as :class:`~diasr_diffusers.DiasRPipeline` (with LTX's defaults and its
    ``frame_rate``, ``decode_timestep``, ``decode_noise_scale``). Each reference image is letterboxed onto white at
    the video size, VAE-encoded to one clean latent frame, packed, and appended after the video tokens; the reference
    tokens get timestep 0 (clean, as LTX's own conditioning tokens). Without subjects it is exactly
    :class:`~diffusers.LTXPipeline` (the call is handed to it; the installed processors then run the stock code).

    Components:
        scheduler, vae, text_encoder, tokenizer, transformer: as in ``LTXPipeline``.
        id_router (:class:`~diasr_diffusers.IDRouter`, optional): sized with ``IDRouter.from_transformer`` (hidden
            width, T5 width ``caption_channels``, ``num_layers``).

    Example:
        ```py
        >>> from diasr_diffusers.pipelines import DiasRLTXPipeline
        >>> pipe = DiasRLTXPipeline.from_ltx("Lightricks/LTX-Video", dtype=torch.bfloat16).to("cuda")
        >>> out = pipe("The man and the woman dance.", subject_images=[man, woman],
        ...            subject_phrases=["the man", "the woman"], return_routing_maps=True)
        ```
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _exclude_from_cpu_offload = ["id_router"]
    _optional_components = ["id_router"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _transformer_class = LTXVideoTransformer3DModel
    _batch_guidance = True  # LTXPipeline runs [negative | positive] as one batch

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLLTXVideo,
        text_encoder: T5EncoderModel,
        tokenizer: T5TokenizerFast,
        transformer: LTXVideoTransformer3DModel,
        id_router: IDRouter | None = None,
    ):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)  # fmt: skip
        if id_router is not None and transformer is not None:
            id_router.check_compatible(transformer)
        self.register_modules(id_router=id_router)
        # The names the shared subject checks read.
        self.vae_scale_factor_temporal = self.vae_temporal_compression_ratio
        self.vae_scale_factor_spatial = self.vae_spatial_compression_ratio
        self.routing_state = SubjectRoutingState()
        self._install_processors()

    @classmethod
    def from_ltx(
        cls, ltx_pipeline_or_path: LTXPipeline | str | os.PathLike, id_router: IDRouter | str | None = None, **kwargs
    ) -> DiasRLTXPipeline:
        """Build from a stock ``LTXPipeline`` (object, folder or Hub id) plus an optional router (object or folder)."""
        ltx = ltx_pipeline_or_path
        if not isinstance(ltx, (LTXPipeline, str, os.PathLike)):
            raise TypeError(
                f"`ltx_pipeline_or_path` must be an LTXPipeline, a local folder or a Hub id, got {type(ltx).__name__}"
            )
        id_router = cls.load_id_router(id_router, **kwargs)
        if not isinstance(ltx, LTXPipeline):
            cls.check_transformer_folders(ltx, **kwargs)
            ltx = LTXPipeline.from_pretrained(ltx, **kwargs)
        return cls(ltx.scheduler, ltx.vae, ltx.text_encoder, ltx.tokenizer, ltx.transformer, id_router=id_router)

    # Training hooks (DiasRTrainer): the same four as DiasRPipeline's.

    def encode_video_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, C, F, h, w)`` latents (posterior mean) of ``(B, 3, F, H, W)`` pixels in [-1, 1]."""
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode().float()
        return self._normalize_latents(
            latents, self.vae.latents_mean, self.vae.latents_std, self.vae.config.scaling_factor
        )

    def encode_training_prompt(
        self, caption: str, max_sequence_length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask, _, _ = self.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device
        )
        return embeds, mask

    def denoiser_inputs(
        self, noisy: torch.Tensor, refs: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: Any,
        frame_rate: int = 25,
    ) -> dict[str, Any]:  # fmt: skip
        """Packed ``[video | refs]`` tokens; video tokens at ``t``, reference tokens at 0 (as at inference). Without
        references (``K = 0``, the trainer's reference dropout) the negative branch's call: one timestep per video."""
        p, pt = self.transformer_spatial_patch_size, self.transformer_temporal_patch_size
        b, _, f, h, w = noisy.shape
        num_refs = refs.shape[2]
        video = self._pack_latents(noisy, p, pt)
        if num_refs:
            refs = self._pack_latents(refs, p, pt)
            timestep = torch.cat([t.expand(b, video.shape[1]), t.new_zeros(b, refs.shape[1])], dim=1).to(noisy.dtype)
        else:
            refs, timestep = video[:, :0], t.expand(b).to(noisy.dtype)
        scale = (self.vae_temporal_compression_ratio / frame_rate, self.vae_spatial_compression_ratio,
                 self.vae_spatial_compression_ratio)  # fmt: skip
        return {
            "hidden_states": torch.cat([video, refs], dim=1), "encoder_hidden_states": prompt_embeds,
            "timestep": timestep, "encoder_attention_mask": prompt_mask, "num_frames": (f + num_refs) // pt,
            "height": h // p, "width": w // p, "rope_interpolation_scale": scale,
        }  # fmt: skip

    def video_prediction(self, pred: torch.Tensor, video_shape: torch.Size) -> torch.Tensor:
        p, pt = self.transformer_spatial_patch_size, self.transformer_temporal_patch_size
        _, _, f, h, w = video_shape
        lv = (f // pt) * (h // p) * (w // p)
        return self._unpack_latents(pred[:, :lv], f // pt, h // p, w // p, p, pt)

    # ------------------------------------------------------------------------------------------------------------

    def latents_shape(self, num_videos: int, num_frames: int, height: int, width: int) -> tuple[tuple[int, ...], str]:
        """LTX's ``latents`` argument is packed: ``(videos, tokens, channels)``."""
        p, pt = self.transformer_spatial_patch_size, self.transformer_temporal_patch_size
        f = (num_frames - 1) // self.vae_temporal_compression_ratio + 1
        h, w = height // self.vae_spatial_compression_ratio, width // self.vae_spatial_compression_ratio
        shape = (num_videos, (f // pt) * (h // p) * (w // p), self.transformer.config.in_channels * pt * p * p)
        return shape, "(videos, latent tokens, channels) (packed, as LTXPipeline)"

    def check_inputs(
        self,
        prompt,
        negative_prompt=None,
        height=512,
        width=704,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        callback_on_step_end_tensor_inputs=None,
        *,
        num_frames: int = 161,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        frame_rate: float = 25,
        guidance_rescale: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """The shared checks of every DiasR call, LTX's frame count (``8k + 1``: LTX's VAE needs it and
        ``LTXPipeline`` does not round) and ``LTXPipeline``'s own (masks given with embeddings). ``LTXPipeline.__call__``
        (the subject-free path) calls this too, with its keywords."""
        super().check_inputs(
            prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
            callback_on_step_end_tensor_inputs, num_frames=num_frames, **kwargs,
        )  # fmt: skip
        _check_real("frame_rate", frame_rate)
        if frame_rate <= 0:
            raise ValueError(f"`frame_rate` must be > 0 (frames per second: it scales the rotary time axis), got {frame_rate}")
        _check_real("guidance_rescale", guidance_rescale, 0.0)
        if (num_frames - 1) % self.vae_temporal_compression_ratio:
            raise ValueError(f"`num_frames` must be 1 + {self.vae_temporal_compression_ratio} * k, got {num_frames}")
        LTXPipeline.check_inputs(
            self, prompt, height, width, callback_on_step_end_tensor_inputs, prompt_embeds, negative_prompt_embeds,
            prompt_attention_mask, negative_prompt_attention_mask,
        )  # fmt: skip

    def encode_references(
        self, subjects: list[list[PIL.Image.Image]], height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """One clean latent frame per reference image, normalised like LTX's latents: ``(1, C, K, h, w)``."""
        frames = [letterbox(img, height, width) for images in subjects for img in images]
        pixels = self.video_processor.preprocess(frames, height=height, width=width)[:, :, None]  # (K, 3, 1, H, W)
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()  # each image its own 1-frame clip
        latents = self._normalize_latents(
            latents.float(), self.vae.latents_mean, self.vae.latents_std, self.vae.config.scaling_factor
        )
        return latents[:, :, 0].transpose(0, 1)[None].to(device, dtype)

    def drop_padding_tokens(self, segments: list[TextSegments], mask: torch.Tensor) -> list[TextSegments]:
        """LTX masks padded prompt tokens: routed cross-attention must not see them either (Wan attends to them)."""
        kept = []
        for b, seg in enumerate(segments):
            valid = mask[b].bool().cpu()[seg.order]
            kept.append(TextSegments(order=seg.order[valid], lengths=seg.lengths))
        return kept

    # The denoising loop's hooks (SubjectPipelineMixin.denoise): packed tokens, the references' tokens appended
    # (clean: timestep 0, LTX's convention for conditioning tokens) and continuing the rotary frame axis.

    def transformer_inputs(self, call, latents, t, text, references):
        hidden = latents.to(text["encoder_hidden_states"].dtype)
        b, frames = hidden.shape[0], call.inputs["frames"]
        timestep = t.expand(b)
        if references is not None:
            p, pt = self.transformer_spatial_patch_size, self.transformer_temporal_patch_size
            refs = self._pack_latents(references, p, pt).to(hidden.dtype)
            timestep = torch.cat([t.expand(b, hidden.shape[1]), t.new_zeros(b, refs.shape[1])], dim=1)
            hidden, frames = torch.cat([hidden, refs], dim=1), frames + references.shape[2] // pt
        return {
            "hidden_states": hidden, "timestep": timestep, "num_frames": frames, "height": call.inputs["height"],
            "width": call.inputs["width"], "rope_interpolation_scale": call.inputs["rope_interpolation_scale"], **text,
        }  # fmt: skip

    def video_output(self, call, pred, latents):
        return pred[:, : latents.shape[1]].float()

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 704,
        num_frames: int = 161,
        frame_rate: int = 25,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 3,
        guidance_rescale: float = 0.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        decode_timestep: float | list[float] = 0.0,
        decode_noise_scale: float | list[float] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 128,
        *,
        subject_images: list[Any] | None = None,
        subject_phrases: list[str] | None = None,
        guidance_scale_ref: float | None = None,
        routing: str = "auto",
        route_text: bool = True,
        subject_masks: torch.Tensor | np.ndarray | None = None,
        similarity_threshold: float = 0.0,
        return_routing_maps: bool = False,
        sigmas: list[float] | None = None,
    ) -> DiasRPipelineOutput | tuple:
        r"""Generate a video in which each reference subject keeps its identity.

        The stock ``LTXPipeline`` arguments come first, in its order and with its defaults (512x704, 161 frames,
        25 fps, 50 steps, guidance 3.0, 128 text tokens, ``output_type="pil"``); the subject arguments are
        keyword-only and mean what they mean in :meth:`DiasRPipeline.__call__ <diasr_diffusers.DiasRPipeline.__call__>`.
        ``num_frames`` must be ``8k + 1`` and ``height``/``width`` multiples of 32 (VAE 32x, patch 1). ``timesteps``:
        custom timesteps, shifted by resolution like the default schedule (``LTXPipeline`` itself refuses them,
        passing both them and its sigmas to the scheduler). ``sigmas`` must be ``None``: ``LTXPipeline`` always steps
        through ``linspace(1, 1 / steps)`` shifted by resolution, and parity with it comes first.

        Returns :class:`~diasr_diffusers.DiasRPipelineOutput` (``frames``, ``routing_maps``).
        """
        if sigmas is not None:
            raise ValueError(
                "`sigmas`: DiasRLTXPipeline samples LTXPipeline's schedule (linspace(1, 1/steps), shifted by "
                "resolution); explicit sigmas are not supported (`timesteps` are)"
            )
        if timesteps is not None:
            num_inference_steps = len(timesteps)
        num_frames, prompts, subjects, routing = self.prepare_subject_call(
            prompt=prompt, subject_images=subject_images, subject_phrases=subject_phrases,
            negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guidance_scale_ref=guidance_scale_ref, routing=routing, route_text=route_text, subject_masks=subject_masks,
            similarity_threshold=similarity_threshold, num_videos_per_prompt=num_videos_per_prompt,
            generator=generator, latents=latents, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            return_routing_maps=return_routing_maps, attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask, frame_rate=frame_rate,
            guidance_rescale=guidance_rescale,
        )  # fmt: skip

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        self._current_timestep = None
        device = self._execution_device
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        num_videos = batch_size * num_videos_per_prompt
        guide = self.do_classifier_free_guidance

        # 1. Text (each branch keeps its own padding mask).
        prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=guide,
            num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask, max_sequence_length=max_sequence_length,
            device=device,
        )  # fmt: skip

        # 2. Latents (packed tokens), timesteps as LTXPipeline (the shift depends on the video's sequence length,
        # not the references').
        latents = self.prepare_latents(
            num_videos, self.transformer.config.in_channels, height, width, num_frames, torch.float32, device,
            generator, latents,
        )  # fmt: skip
        f = (num_frames - 1) // self.vae_temporal_compression_ratio + 1
        h, w = height // self.vae_spatial_compression_ratio, width // self.vae_spatial_compression_ratio
        mu = calculate_shift(
            f * h * w,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        schedule = None if timesteps is not None else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas=schedule, mu=mu
        )
        p, pt = self.transformer_spatial_patch_size, self.transformer_temporal_patch_size
        rope_scale = (self.vae_temporal_compression_ratio / frame_rate, self.vae_spatial_compression_ratio,
                      self.vae_spatial_compression_ratio)  # fmt: skip
        call = DenoiseCall(
            prompt={"encoder_hidden_states": prompt_embeds, "encoder_attention_mask": prompt_mask},
            negative={"encoder_hidden_states": negative_prompt_embeds, "encoder_attention_mask": negative_mask}
            if guide else None,
            attention_kwargs=attention_kwargs,
            inputs={"frames": f // pt, "height": h // p, "width": w // p, "rope_interpolation_scale": rope_scale},
        )  # fmt: skip
        if subjects:
            call.references, call.num_ref_frames, call.routing_inputs = self.prepare_references(
                subjects, subject_phrases=subject_phrases, prompts=prompts, prompt=call.prompt,
                video_latents=self._unpack_latents(latents, f // pt, h // p, w // p, p, pt), routing=routing,
                route_text=route_text, subject_masks=subject_masks, similarity_threshold=similarity_threshold,
                num_videos_per_prompt=num_videos_per_prompt, num_frames=num_frames,
                max_sequence_length=max_sequence_length, height=height, width=width, device=device,
                dtype=self.transformer.dtype, text=prompt_mask,
            )  # fmt: skip
            call.guidance_scale_ref, call.return_routing_maps = guidance_scale_ref, return_routing_maps

        # 3. Denoise.
        latents, routing_maps = self.denoise(
            latents, timesteps, num_inference_steps, call, callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 4. Decode (as LTXPipeline).
        if output_type == "latent":
            video = latents
        else:
            video = self._decode(
                latents, f, h, w, generator, decode_timestep, decode_noise_scale, num_videos, prompt_embeds.dtype
            )
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video, routing_maps)
        return DiasRPipelineOutput(frames=video, routing_maps=routing_maps)

    def _decode(self, latents, f, h, w, generator, decode_timestep, decode_noise_scale, batch_size, dtype):
        p, pt = self.transformer_spatial_patch_size, self.transformer_temporal_patch_size
        latents = self._unpack_latents(latents, f // pt, h // p, w // p, p, pt)
        latents = self._denormalize_latents(
            latents, self.vae.latents_mean, self.vae.latents_std, self.vae.config.scaling_factor
        ).to(dtype)
        timestep = None
        if self.vae.config.timestep_conditioning:
            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            decode_timestep = decode_timestep if isinstance(decode_timestep, list) else [decode_timestep] * batch_size
            if decode_noise_scale is None:
                decode_noise_scale = decode_timestep
            elif not isinstance(decode_noise_scale, list):
                decode_noise_scale = [decode_noise_scale] * batch_size
            timestep = torch.tensor(decode_timestep, device=latents.device, dtype=latents.dtype)
            scale = torch.tensor(decode_noise_scale, device=latents.device, dtype=latents.dtype)[
                :, None, None, None, None
            ]
            latents = (1 - scale) * latents + scale * noise
        return self.vae.decode(latents.to(self.vae.dtype), timestep, return_dict=False)[0]
