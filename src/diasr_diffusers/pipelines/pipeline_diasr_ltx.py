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

from ..processors import LTXSubjectSparseAttnProcessor, SubjectRoutingState, TextSegments
from ..routing import IDRouter
from ..utils.images import letterbox
from .subjects import DiasRPipelineOutput, SubjectPipelineMixin

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
    _processor_class = LTXSubjectSparseAttnProcessor
    _transformer_class = LTXVideoTransformer3DModel

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
        if not isinstance(ltx, LTXPipeline):
            ltx = LTXPipeline.from_pretrained(ltx, **kwargs)
        if isinstance(id_router, (str, os.PathLike)):
            id_router = IDRouter.from_pretrained(id_router)
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
        **kwargs: Any,
    ) -> None:
        """The shared checks of every DiasR call, LTX's frame count (``8k + 1``: LTX's VAE needs it and
        ``LTXPipeline`` does not round) and ``LTXPipeline``'s own (masks given with embeddings). ``LTXPipeline.__call__``
        (the subject-free path) calls this too, with its keywords."""
        super().check_inputs(
            prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
            callback_on_step_end_tensor_inputs, num_frames=num_frames, **kwargs,
        )  # fmt: skip
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

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        subject_images: list[Any] | None = None,
        subject_phrases: list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 704,
        num_frames: int = 161,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        guidance_scale_ref: float | None = None,
        routing: str = "auto",
        route_text: bool = True,
        subject_masks: torch.Tensor | np.ndarray | None = None,
        similarity_threshold: float = 0.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        return_routing_maps: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 128,
        sigmas: list[float] | None = None,
        frame_rate: int = 25,
        decode_timestep: float | list[float] = 0.0,
        decode_noise_scale: float | list[float] | None = None,
    ) -> DiasRPipelineOutput | tuple:
        r"""Generate a video in which each reference subject keeps its identity.

        Arguments as :meth:`DiasRPipeline.__call__ <diasr_diffusers.DiasRPipeline.__call__>`, with LTX-Video's
        defaults (512x704, 161 frames, 50 steps, guidance 3.0, 128 text tokens) and its own ``frame_rate``,
        ``decode_timestep`` and ``decode_noise_scale`` (as ``LTXPipeline``). ``num_frames`` must be ``8k + 1`` and
        ``height``/``width`` multiples of 32 (VAE 32x, patch 1). ``sigmas`` must be ``None``: ``LTXPipeline`` always
        steps through ``linspace(1, 1 / steps)`` shifted by resolution, and parity with it comes first.

        Returns :class:`~diasr_diffusers.DiasRPipelineOutput` (``frames``, ``routing_maps``).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if sigmas is not None:
            raise ValueError(
                "`sigmas`: DiasRLTXPipeline samples LTXPipeline's schedule (linspace(1, 1/steps), shifted by "
                "resolution); explicit sigmas are not supported"
            )
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
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
        self._install_processors()
        if not subjects:  # exactly LTXPipeline (its processors are ours, running the stock code path)
            out = super().__call__(
                prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                frame_rate=frame_rate, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, num_videos_per_prompt=num_videos_per_prompt, generator=generator,
                latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                decode_timestep=decode_timestep, decode_noise_scale=decode_noise_scale, output_type=output_type,
                attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                max_sequence_length=max_sequence_length,
            )  # fmt: skip
            return DiasRPipelineOutput(frames=out.frames) if return_dict else (out.frames, None)
        if prompt_embeds is not None:
            raise ValueError("`prompt_embeds` with `subject_images`: give `prompt` (its phrases are located in it)")

        self._guidance_scale = guidance_scale
        self._guidance_rescale = 0.0
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        self._current_timestep = None
        device = self._execution_device
        num_videos = len(prompts) * num_videos_per_prompt
        guide = self.do_classifier_free_guidance

        # 1. Text (the negative prompt's tokens keep their own padding mask).
        prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=guide,
            num_videos_per_prompt=num_videos_per_prompt, negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length, device=device,
        )  # fmt: skip
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(dtype)
        if guide:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype)

        # 2. Latents (packed tokens) and references.
        latents = self.prepare_latents(
            num_videos, self.transformer.config.in_channels, height, width, num_frames, torch.float32, device,
            generator, latents,
        )  # fmt: skip
        f = (num_frames - 1) // self.vae_temporal_compression_ratio + 1
        h, w = height // self.vae_spatial_compression_ratio, width // self.vae_spatial_compression_ratio
        p, pt = self.transformer_spatial_patch_size, self.transformer_temporal_patch_size
        video_5d = self._unpack_latents(latents, f // pt, h // p, w // p, p, pt)
        routing_inputs = self.prepare_routing(
            [len(images) for images in subjects], subject_phrases, prompts, prompt_embeds, subject_masks, routing,
            route_text, similarity_threshold, num_videos_per_prompt, num_frames, video_5d, max_sequence_length,
        )  # fmt: skip
        if routing_inputs["text_segments"] is not None:
            routing_inputs["text_segments"] = self.drop_padding_tokens(routing_inputs["text_segments"], prompt_mask)
        ref_latents = self.encode_references(subjects, height, width, device, dtype)
        num_refs = ref_latents.shape[2]
        refs = self._pack_latents(ref_latents, p, pt).expand(num_videos, -1, -1)
        lv, lr = latents.shape[1], refs.shape[1]
        three_way = guidance_scale_ref is not None and guide

        # 3. Timesteps, as LTXPipeline (the shift depends on the video's sequence length, not the references').
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(
            lv,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)  # fmt: skip
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        rope_scale = (self.vae_temporal_compression_ratio / frame_rate, self.vae_spatial_compression_ratio,
                      self.vae_spatial_compression_ratio)  # fmt: skip
        video_kwargs = dict(num_frames=f, height=h, width=w, rope_interpolation_scale=rope_scale,
                            attention_kwargs=attention_kwargs, return_dict=False)  # fmt: skip
        # References continue the frame axis of the rotary positions, as Wan's appended reference frames do.
        joint_kwargs = {**video_kwargs, "num_frames": f + num_refs}
        state = self.routing_state

        # 4. Denoise.
        routing_maps = None
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                video = latents.to(dtype)
                joint = torch.cat([video, refs], dim=1)
                # Clean references: timestep 0 on their tokens (LTX's convention for clean conditioning tokens).
                t_joint = torch.cat([t.expand(num_videos, lv), t.new_zeros(num_videos, lr)], dim=1)
                record = return_routing_maps and i == len(timesteps) - 1
                with state.activate(**routing_inputs, record=record), self.transformer.cache_context("cond"):
                    noise_pred = self.transformer(joint, prompt_embeds, t_joint, prompt_mask, **joint_kwargs)[0]
                    if record:
                        routing_maps = self._routing_maps(state)
                noise_pred = noise_pred[:, :lv].float()
                if guide:
                    # No references in the negative branch: every video token would be routed to null anyway.
                    with self.transformer.cache_context("uncond"):
                        noise_uncond = self.transformer(
                            video, negative_prompt_embeds, t.expand(num_videos), negative_mask, **video_kwargs
                        )[0].float()
                    if three_way:
                        ref_only = {**routing_inputs, "text_segments": None, "phrase_features": None, "phrase_masks": None}  # fmt: skip
                        with state.activate(**ref_only), self.transformer.cache_context("ref"):
                            noise_ref = self.transformer(
                                joint, negative_prompt_embeds, t_joint, negative_mask, **joint_kwargs
                            )[0][:, :lv].float()
                        noise_pred = (
                            noise_uncond
                            + guidance_scale_ref * (noise_ref - noise_uncond)
                            + guidance_scale * (noise_pred - noise_ref)
                        )
                    else:
                        noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = self.step_callback(
                        callback_on_step_end, i, t, callback_on_step_end_tensor_inputs,
                        {"latents": latents, "prompt_embeds": prompt_embeds},
                    )  # fmt: skip
                    latents, prompt_embeds = tensors["latents"], tensors["prompt_embeds"]
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None

        # 5. Decode (as LTXPipeline).
        if output_type == "latent":
            video = latents
        else:
            video = self._decode(latents, f, h, w, generator, decode_timestep, decode_noise_scale, num_videos, dtype)
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
