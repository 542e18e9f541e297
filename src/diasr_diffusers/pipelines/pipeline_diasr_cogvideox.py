"""DiasRCogVideoXPipeline: multi-subject video generation on CogVideoX with subject-sparse routed joint attention."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline, retrieve_timesteps
from diffusers.schedulers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from diffusers.utils import logging
from transformers import T5EncoderModel, T5Tokenizer

from ..processors import SubjectRoutingState
from ..routing import IDRouter
from ..routing.phrases import clean_prompt
from ..utils.images import letterbox
from ..utils.latents import encode_latents
from .subjects import DenoiseCall, DiasRPipelineOutput, SubjectPipelineMixin

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import export_to_video, load_image
        >>> from diasr_diffusers import DiasRCogVideoXPipeline

        >>> pipe = DiasRCogVideoXPipeline.from_cogvideox("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
        >>> out = pipe(
        ...     prompt="The man and the woman dance in a sunlit kitchen.",
        ...     subject_images=[load_image("man.png"), load_image("woman.png")],
        ...     subject_phrases=["the man", "the woman"],
        ...     return_routing_maps=True,
        ... )
        >>> export_to_video(out.frames[0], "dance.mp4", fps=8)
        ```
"""


class DiasRCogVideoXPipeline(SubjectPipelineMixin, CogVideoXPipeline):
    r"""Multi-subject text-to-video with CogVideoX (1.0: 2B / 5B) and DiasR subject-sparse routed attention.

    Reference images are VAE-encoded to one clean latent frame each and appended after the video latents, so each
    CogVideoX block attends over ``[text | video | ref_0 | ... | ref_{N-1}]``. Every video token is routed to one
    subject (or to none) and sees the text, the video and that subject's references only; with text routing it sees
    the general prompt plus that subject's phrase (see :class:`~diasr_diffusers.processors.CogVideoXSubjectSparseAttnProcessor`).
    Without subjects it is exactly :class:`~diffusers.CogVideoXPipeline` (same frames for the same weights and seed).

    Same call signature and outputs as :class:`~diasr_diffusers.DiasRPipeline`, with CogVideoX's defaults (480x720,
    49 frames, 50 steps, guidance 6, 226 text tokens) and its schedulers (DDIM / DPM, v-prediction), so ``sigmas``
    (flow-matching noise levels) is refused.

    Components:
        tokenizer, text_encoder, vae, transformer, scheduler: as in ``CogVideoXPipeline``.
        id_router (:class:`~diasr_diffusers.IDRouter`, optional): the trained router
            (``IDRouter.from_transformer(pipe.transformer)``); without it the training-free similarity router is used.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _exclude_from_cpu_offload = ["id_router"]
    _optional_components = ["id_router"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _transformer_class = CogVideoXTransformer3DModel
    _batch_guidance = True  # CogVideoXPipeline runs [negative | positive] as one batch
    _reference_frame_dim = 1

    def __init__(
        self,
        tokenizer: T5Tokenizer,
        text_encoder: T5EncoderModel,
        vae: AutoencoderKLCogVideoX,
        transformer: CogVideoXTransformer3DModel,
        scheduler: CogVideoXDDIMScheduler | CogVideoXDPMScheduler,
        id_router: IDRouter | None = None,
    ):
        if transformer is not None:
            cfg = transformer.config
            if cfg.patch_size_t is not None or cfg.ofs_embed_dim:
                raise ValueError(
                    "DiasRCogVideoXPipeline supports CogVideoX 1.0 transformers (patch_size_t=None: CogVideoX-2B/5B); "
                    f"this one has patch_size_t={cfg.patch_size_t} (CogVideoX 1.5), whose temporal patches would "
                    "pair a reference frame with another frame"
                )
            if cfg.use_rotary_positional_embeddings and cfg.attention_head_dim % 16:
                raise ValueError(
                    f"the transformer's attention_head_dim={cfg.attention_head_dim} must be a multiple of 16 with "
                    "rotary embeddings (CogVideoX splits each head into 1/4 temporal and 3/8 + 3/8 spatial halves)"
                )
            if cfg.in_channels != cfg.out_channels:
                raise ValueError(
                    f"DiasRCogVideoXPipeline is text-to-video: the transformer takes {cfg.in_channels} input channels "
                    f"for {cfg.out_channels} output channels (an image-to-video checkpoint)"
                )
        if id_router is not None and transformer is not None:
            id_router.check_compatible(transformer)
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)  # fmt: skip
        self.register_modules(id_router=id_router)
        self.routing_state = SubjectRoutingState()
        self._install_processors()

    @classmethod
    def from_cogvideox(
        cls,
        pipeline_or_path: CogVideoXPipeline | str | os.PathLike,
        id_router: IDRouter | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> DiasRCogVideoXPipeline:
        """Build from a stock CogVideoX text-to-video Diffusers pipeline (object, local folder or Hub id, e.g.
        ``THUDM/CogVideoX-5b``) plus an optional router (object, folder or Hub id). ``kwargs`` go to
        ``from_pretrained`` (e.g. ``torch_dtype``)."""
        base = pipeline_or_path
        if not isinstance(base, (CogVideoXPipeline, str, os.PathLike)):
            raise TypeError(
                f"`pipeline_or_path` must be a CogVideoXPipeline, a local folder or a Hub id, got {type(base).__name__}"
            )
        id_router = cls.load_id_router(id_router, **kwargs)
        if not isinstance(base, CogVideoXPipeline):
            cls.check_transformer_folders(base, **kwargs)
            base = CogVideoXPipeline.from_pretrained(pipeline_or_path, **kwargs)
        return cls(
            tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, transformer=base.transformer,
            scheduler=base.scheduler, id_router=id_router,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    # CogVideoX's layout: latents (B, F, C, h, w), references appended along the frame axis. The shared subject
    # code (routing inputs, token grid) and the trainer read latents in the VAE's (B, C, F, h, w) layout.

    def latents_shape(self, num_videos: int, num_frames: int, height: int, width: int) -> tuple[tuple[int, ...], str]:
        s = self.vae_scale_factor_spatial
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        shape = (num_videos, latent_frames, self.transformer.config.in_channels, height // s, width // s)
        return shape, f"(videos, latent frames, channels, height / {s}, width / {s})"

    def encode_references(
        self, subjects: list[list[PIL.Image.Image]], height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """One clean latent frame per reference image: ``(1, K, C, h, w)``, subjects in order, scaled like CogVideoX's
        latents (posterior mean times ``scaling_factor``). Images are letterboxed onto white at the video size."""
        frames = [letterbox(img, height, width) for images in subjects for img in images]
        pixels = self.video_processor.preprocess(frames, height=height, width=width)  # (K, 3, H, W) in [-1, 1]
        latents = encode_latents(self.vae, pixels.unsqueeze(2))  # each image its own 1-frame clip: (K, C, 1, h, w)
        return latents[:, :, 0][None].to(device, dtype)

    def rotary_embeddings(
        self, height: int, width: int, frames: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The transformer's ``image_rotary_emb`` for ``frames`` latent frames (video + references) of a
        ``height x width`` video, or ``None`` for a transformer with sincos positions."""
        if not self.transformer.config.use_rotary_positional_embeddings:
            return None  # sincos positions (CogVideoX-2B) are computed by the patch embedding for any frame count
        return self._prepare_rotary_positional_embeddings(height, width, frames, device)

    # The denoising loop's hooks (SubjectPipelineMixin.denoise): (B, F, C, h, w) latents, references appended on the
    # frame axis, the rotary table of all frames; CogVideoXPipeline's scheduler step and dynamic guidance.

    def transformer_inputs(self, call, latents, t, text, references):
        hidden = self.scheduler.scale_model_input(latents, t)
        if references is not None:
            hidden = torch.cat([hidden, references], dim=1)
        frames = hidden.shape[1]
        tables = call.inputs.setdefault("rotary", {})
        if frames not in tables:
            tables[frames] = self.rotary_embeddings(call.inputs["height"], call.inputs["width"], frames, hidden.device)
        return {"hidden_states": hidden, "timestep": t.expand(hidden.shape[0]), "image_rotary_emb": tables[frames], **text}

    def video_output(self, call, pred, latents):
        return pred[:, : latents.shape[1]].float()

    def step_guidance(self, call, i, t, low_noise):
        if call.inputs["use_dynamic_cfg"]:  # as CogVideoXPipeline
            n, g = call.inputs["num_inference_steps"], call.inputs["guidance_scale"]
            self._guidance_scale = 1 + g * ((1 - math.cos(math.pi * ((n - t.item()) / n) ** 5.0)) / 2)
        return super().step_guidance(call, i, t, low_noise)

    def scheduler_step(self, call, noise_pred, t, i, latents):
        # As CogVideoXPipeline: the DPM scheduler also carries the previous x0 prediction.
        extra = call.inputs["extra_step_kwargs"]
        if not isinstance(self.scheduler, CogVideoXDPMScheduler):
            latents = self.scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        else:
            timesteps = call.inputs["timesteps"]
            latents, call.inputs["old_pred"] = self.scheduler.step(
                noise_pred, call.inputs.get("old_pred"), t, timesteps[i - 1] if i > 0 else None, latents, **extra,
                return_dict=False,
            )  # fmt: skip
        return latents.to(call.inputs["dtype"])

    # ------------------------------------------------------------------------------------------------------------
    # Training hooks (DiasRTrainer; latents in the VAE's (B, C, F, h, w) layout, as every family's).

    def encode_video_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled ``(B, C, F, h, w)`` latents (posterior mean) of ``(B, 3, F, H, W)`` pixels in [-1, 1]."""
        return encode_latents(self.vae, pixels)

    def encode_training_prompt(
        self, caption: str, max_sequence_length: int, device: torch.device
    ) -> tuple[torch.Tensor, None]:
        """``(prompt_embeds, None)`` of one caption, cleaned as the phrase matcher reads it (as ``__call__`` does
        when phrases are routed); CogVideoX attends to its padding tokens, so there is no mask."""
        embeds, _ = self.encode_prompt(
            clean_prompt(caption), do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
            device=device,
        )  # fmt: skip
        return embeds, None

    def denoiser_inputs(
        self, noisy: torch.Tensor, refs: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: Any
    ) -> dict[str, Any]:
        """The transformer's keyword inputs for ``[video | refs]`` (``(B, C, F, h, w)`` and ``(B, C, K, h, w)``) at
        the discrete timestep ``t``: CogVideoX's ``(B, F + K, C, h, w)`` layout and the rotary table of all frames."""
        hidden = torch.cat([noisy, refs], dim=2).transpose(1, 2)
        s = self.vae_scale_factor_spatial
        rotary = self.rotary_embeddings(hidden.shape[-2] * s, hidden.shape[-1] * s, hidden.shape[1], hidden.device)
        return {
            "hidden_states": hidden, "encoder_hidden_states": prompt_embeds,
            "timestep": t.reshape(()).expand(noisy.shape[0]), "image_rotary_emb": rotary,
        }  # fmt: skip

    def video_prediction(self, pred: torch.Tensor, video_shape: torch.Size) -> torch.Tensor:
        """The video part of the transformer's output for :meth:`denoiser_inputs`, as ``(B, C, F, h, w)``."""
        return pred[:, : video_shape[2]].transpose(1, 2)

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 6,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 226,
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

        The stock ``CogVideoXPipeline`` arguments come first, in its order and with its defaults (``height``,
        ``width``, ``num_frames``: the transformer's ``sample_*`` config); the subject arguments are keyword-only and
        mean what they mean in :meth:`DiasRPipeline.__call__ <diasr_diffusers.DiasRPipeline.__call__>`. Unlike the
        stock pipeline, ``num_videos_per_prompt`` is honoured. ``latents`` are ``(videos, latent frames, channels,
        h, w)`` as in CogVideoX. ``sigmas`` must be ``None``: CogVideoX samples with its DDIM / DPM v-prediction
        schedulers, which take no flow-matching noise levels. With ``subject_phrases`` the prompt is encoded as the
        phrase matcher reads it (``routing.phrases.clean_prompt``: HTML entities and repeated spaces cleaned), so
        that phrase tokens are found where the text encoder sees them. ``callback_on_step_end`` receives
        ``prompt_embeds`` with both guidance rows ``[negative | positive]``, as from the stock pipeline.

        Examples:
        """
        if sigmas is not None:
            raise ValueError(
                "`sigmas` must be None with DiasRCogVideoXPipeline: CogVideoX's DDIM/DPM v-prediction schedulers take "
                "no flow-matching noise levels (use `num_inference_steps` or `timesteps`)"
            )
        cfg = self.transformer.config
        height = height or cfg.sample_height * self.vae_scale_factor_spatial
        width = width or cfg.sample_width * self.vae_scale_factor_spatial
        num_frames = num_frames or cfg.sample_frames
        if timesteps is not None:
            num_inference_steps = len(timesteps)

        # 1. Check everything before any expensive work.
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

        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        num_videos = batch_size * num_videos_per_prompt
        guide = guidance_scale > 1.0

        # 2. Text (cleaned as the phrase matcher reads it when phrases are routed).
        if subjects and subject_phrases is not None:
            prompt = [clean_prompt(p) for p in prompts]
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, guide, num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length, device=device,
        )  # fmt: skip

        # 3. Timesteps, latents and references.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps)
        latents = self.prepare_latents(
            num_videos, cfg.in_channels, num_frames, height, width, prompt_embeds.dtype, device, generator, latents,
        )  # fmt: skip
        call = DenoiseCall(
            prompt={"encoder_hidden_states": prompt_embeds},
            negative={"encoder_hidden_states": negative_prompt_embeds} if guide else None,
            attention_kwargs=attention_kwargs,
            inputs={
                "height": height, "width": width, "dtype": prompt_embeds.dtype, "timesteps": timesteps,
                "extra_step_kwargs": self.prepare_extra_step_kwargs(generator, eta), "use_dynamic_cfg": use_dynamic_cfg,
                "guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps,
            },
        )  # fmt: skip
        if subjects:
            call.references, call.num_ref_frames, call.routing_inputs = self.prepare_references(
                subjects, subject_phrases=subject_phrases, prompts=prompts, prompt=call.prompt,
                video_latents=latents.transpose(1, 2), routing=routing, route_text=route_text,
                subject_masks=subject_masks, similarity_threshold=similarity_threshold,
                num_videos_per_prompt=num_videos_per_prompt, num_frames=num_frames,
                max_sequence_length=max_sequence_length, height=height, width=width, device=device,
                dtype=prompt_embeds.dtype,
            )  # fmt: skip
            call.guidance_scale_ref, call.return_routing_maps = guidance_scale_ref, return_routing_maps

        # 4. Denoise.
        latents, routing_maps = self.denoise(
            latents, timesteps, num_inference_steps, call, callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 5. Decode (as CogVideoXPipeline).
        if output_type != "latent":
            video = self.decode_latents(latents)
            video = self.video_processor.postprocess_video(video=video, output_type=output_type)
        else:
            video = latents
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video, routing_maps)
        return DiasRPipelineOutput(frames=video, routing_maps=routing_maps)
