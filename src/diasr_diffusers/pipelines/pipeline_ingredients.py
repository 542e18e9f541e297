"""IngredientsPipeline: multi-identity video generation with Ingredients (CogVideoX-5B I2V + ConsisID + ID router)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline, retrieve_timesteps
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from huggingface_hub import snapshot_download
from transformers import T5EncoderModel, T5Tokenizer

from ..models.transformer_ingredients import IngredientsTransformer3DModel
from ..routing.ingredients_router import ROUTING_STYLES, majority_identity
from .checks import check_finite_tensors, check_int, check_real, frames_the_vae_makes
from .ingredients_faces import IngredientsFaceEncoder

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import export_to_video, load_image
        >>> from diasr_diffusers import IngredientsPipeline

        >>> pipe = IngredientsPipeline.from_pretrained("feizhengcong/Ingredients", torch_dtype=torch.bfloat16).to("cuda")
        >>> pipe.load_face_encoder()  # the weights' face_encoder/ folder; needs diasr-diffusers[ingredients]
        >>> out = pipe(
        ...     prompt="Two men in half bodies, are seated in a dimly lit room, possibly an office or meeting room.",
        ...     face_images=[load_image("0.jpg"), load_image("1.jpg")],
        ...     routing="hard", return_routing_maps=True,
        ...     generator=torch.Generator("cuda").manual_seed(2025),
        ... )
        >>> export_to_video(out.frames[0], "ingredients.mp4", fps=8)
        ```
"""


@dataclass
class IngredientsPipelineOutput(BaseOutput):
    r"""Output of :class:`IngredientsPipeline`.

    Args:
        frames: the videos (a list of lists of PIL images, ``np.ndarray`` ``(B, F, H, W, 3)``, a tensor or latents).
        routing_maps: with ``return_routing_maps=True``, ``(B, F_lat, H_tok, W_tok)`` int64: the identity each video
            token was routed to at the last step (conditional branch), by majority over the routed layers. Every
            token gets an identity (Ingredients has no null route). ``None`` otherwise.
    """

    frames: Any
    routing_maps: torch.Tensor | None = None


class IngredientsPipeline(ConsisIDPipeline):
    r"""Ingredients: a video of several given people, each keeping their identity (CogVideoX-5B image-to-video).

    :class:`~diffusers.ConsisIDPipeline`'s sampler with an :class:`IngredientsTransformer3DModel`, which routes
    each video token to one identity's face features. The first frame is a white 720x480 canvas holding the aligned
    faces; the faces' ``id_cond`` / ``id_vit_hidden`` come from the face models
    (:meth:`load_face_encoder`, optional extra ``[ingredients]``) or are passed precomputed.

    Components:
        tokenizer, text_encoder, vae, scheduler: as in ``ConsisIDPipeline`` (T5, CogVideoX VAE, CogVideoX DPM).
        transformer (:class:`IngredientsTransformer3DModel`).
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: T5Tokenizer,
        text_encoder: T5EncoderModel,
        vae: AutoencoderKLCogVideoX,
        transformer: IngredientsTransformer3DModel,
        scheduler: CogVideoXDPMScheduler,
    ):
        if transformer is not None and not isinstance(transformer, IngredientsTransformer3DModel):
            raise TypeError(
                f"`transformer` must be an IngredientsTransformer3DModel, got {type(transformer).__name__} "
                "(load it with IngredientsTransformer3DModel.from_pretrained)"
            )
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self.face_encoder: IngredientsFaceEncoder | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, transformer_subfolder: str | None = None, **kwargs: Any
    ) -> IngredientsPipeline:
        """Load the released ``feizhengcong/Ingredients`` folder (or Hub id), or one saved by this pipeline.

        The transformer is read from ``transformer_ema/`` when the folder has one (as the released ``infer.py``
        does), else from ``transformer/``; ``transformer_subfolder`` picks one explicitly. Hub ids are fetched with
        ``snapshot_download`` (the whole repository, ``face_encoder/`` included). ``kwargs`` go to
        ``DiffusionPipeline.from_pretrained`` (``torch_dtype``, also a per-component dict, ``variant``, ...); the
        transformer gets the same ``torch_dtype`` (its entry ``"transformer"`` or ``"default"``), ``variant`` and
        ``use_safetensors``.
        """
        from ..utils.checkpoint_paths import check_loader_sources

        needs = "expected the Ingredients weights folder (`hf download feizhengcong/Ingredients`, then its folder)"
        kwargs = check_loader_sources(kwargs, needs, pretrained_model_name_or_path=pretrained_model_name_or_path)
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            hub = ("cache_dir", "revision", "token", "force_download", "local_files_only")
            folder = Path(
                snapshot_download(str(pretrained_model_name_or_path), **{k: kwargs[k] for k in hub if k in kwargs})
            )
        if kwargs.get("transformer") is None:
            if transformer_subfolder is None:
                transformer_subfolder = (
                    "transformer_ema" if (folder / "transformer_ema" / "config.json").is_file() else "transformer"
                )
            if not (folder / transformer_subfolder / "config.json").is_file():
                raise FileNotFoundError(f"no transformer in {folder / transformer_subfolder} (config.json missing)")
            dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
            if isinstance(dtype, dict):  # Diffusers' per-component dtypes: the transformer's, else "default"
                dtype = dtype.get("transformer", dtype.get("default"))
            model_kwargs = {k: kwargs[k] for k in ("variant", "use_safetensors", "low_cpu_mem_usage") if k in kwargs}
            if dtype is not None:
                model_kwargs["torch_dtype"] = dtype
            kwargs["transformer"] = IngredientsTransformer3DModel.from_pretrained(
                folder, subfolder=transformer_subfolder, **model_kwargs
            )
        pipe = super().from_pretrained(folder, **kwargs)
        pipe._weights_folder = folder
        return pipe

    def load_face_encoder(
        self,
        face_encoder_dir: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> IngredientsFaceEncoder:
        """Load Ingredients' face models (facexlib, glintr100, EVA02-CLIP-L-14-336) for ``face_images=...`` calls.

        Args:
            face_encoder_dir: the weights' ``face_encoder/`` folder (default: the one next to the folder this
                pipeline was loaded from).
            device, dtype: where the face models run (default: the pipeline's execution device, the transformer's
                dtype).

        Raises:
            ImportError / FileNotFoundError naming the missing packages or files
            (see :class:`~diasr_diffusers.pipelines.ingredients_faces.IngredientsFaceEncoder`).
        """
        if face_encoder_dir is None:
            weights = getattr(self, "_weights_folder", None)
            if weights is None:
                raise ValueError(
                    "`face_encoder_dir` is needed: this pipeline was not loaded from an Ingredients folder (give the "
                    "path of its `face_encoder/`)"
                )
            face_encoder_dir = Path(weights) / "face_encoder"
        self.face_encoder = IngredientsFaceEncoder.from_pretrained(
            face_encoder_dir, device=device or self._execution_device, dtype=dtype or self.transformer.dtype
        )
        return self.face_encoder

    # ------------------------------------------------------------------------------------------------------------

    def check_face_inputs(self, image: Any, id_cond: Any, id_vit_hidden: Any, face_images: Any, routing: str) -> None:
        """Before any work: the faces come either as images (with the face encoder loaded) or precomputed."""
        if routing not in ROUTING_STYLES:
            raise ValueError(f"`routing` must be one of {ROUTING_STYLES}, got {routing!r}")
        precomputed = id_cond is not None or id_vit_hidden is not None
        if face_images is not None and precomputed:
            raise ValueError("pass either `face_images` or precomputed `id_cond` + `id_vit_hidden`, not both")
        if face_images is None and not precomputed:
            raise ValueError(
                "Ingredients needs the faces: `face_images` (one image per identity) or precomputed `id_cond` and "
                "`id_vit_hidden` (one entry per identity)"
            )
        if precomputed and (id_cond is None or id_vit_hidden is None):
            raise ValueError("precomputed faces need both `id_cond` and `id_vit_hidden` (one entry per identity)")
        if face_images is not None:
            if not isinstance(face_images, (list, tuple)) or not face_images:
                raise ValueError("`face_images` must be a non-empty list with one image per identity")
            self.transformer.check_num_identities(len(face_images))
            if self.face_encoder is None:
                raise ValueError(
                    "`face_images` needs the face models: call `pipe.load_face_encoder()` first (optional extra "
                    '`pip install "diasr-diffusers[ingredients]"`), or pass precomputed `id_cond` / `id_vit_hidden`'
                )
        elif image is None:
            raise ValueError(
                "with precomputed `id_cond` / `id_vit_hidden`, pass the first frame as `image` (Ingredients: the "
                "aligned faces on a white 720x480 canvas, `ingredients_faces.compose_first_frame(aligned_faces)`)"
            )

    def check_numbers(
        self,
        num_frames: Any,
        num_inference_steps: Any,
        guidance_scale: Any,
        num_videos_per_prompt: Any,
        eta: Any = 0.0,
        max_sequence_length: Any = 226,
    ) -> int:
        """The numeric arguments, through the checks every pipeline shares (:mod:`~diasr_diffusers.pipelines.checks`).
        Returns the frame count the VAE makes for ``num_frames``, with a warning naming it when it differs."""
        for name, value in (
            ("num_frames", num_frames),
            ("num_inference_steps", num_inference_steps),
            ("num_videos_per_prompt", num_videos_per_prompt),
            ("max_sequence_length", max_sequence_length),
        ):
            check_int(name, value, 1)
        check_real("guidance_scale", guidance_scale, 0.0)
        check_real("eta", eta, 0.0)
        temporal = self.vae_scale_factor_temporal
        used = frames_the_vae_makes(num_frames, temporal)
        if used != num_frames:
            logger.warning(
                f"`num_frames - 1` has to be divisible by {temporal}: got num_frames={num_frames}, generating {used} "
                "frames."
            )
        return used

    def latents_shape(self, num_videos: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """The shape the ``latents`` argument must have: ``(videos, latent frames, channels, height / s, width / s)``
        (CogVideoX's layout; the channels are the noise's, half the transformer's input)."""
        s = self.vae_scale_factor_spatial
        frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        return (num_videos, frames, self.transformer.config.in_channels // 2, height // s, width // s)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PIL.Image.Image | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 720,
        num_frames: int = 49,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
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
        id_vit_hidden: list[list[torch.Tensor]] | None = None,
        id_cond: list[torch.Tensor] | None = None,
        kps_cond: list[torch.Tensor] | None = None,
        *,
        face_images: list[Any] | None = None,
        routing: str = "soft",
        return_routing_maps: bool = False,
    ) -> IngredientsPipelineOutput | tuple:
        r"""Generate a video of the given identities.

        ``ConsisIDPipeline``'s arguments come first, in its order (``image`` first) and with its defaults (``image``
        may be left out with ``face_images``); ``face_images``, ``routing`` and ``return_routing_maps`` are
        keyword-only.

        Args:
            image: the first frame. Default with ``face_images``: Ingredients' composite of the aligned faces.
            prompt: the text.
            face_images: one image per identity (needs :meth:`load_face_encoder`).
            id_cond, id_vit_hidden: precomputed face features instead, one entry per identity (released layout:
                ``id_cond[n]`` ``(1, 1280)``, ``id_vit_hidden[n]`` a list of 5 ``(1, 577, 1024)``); a leading batch
                dimension equal to the number of videos gives each video its own faces.
            kps_cond: ConsisID's facial keypoints; Ingredients takes none (must be ``None``).
            routing: ``"soft"`` (released: softmax mixing of the identities' features) or ``"hard"`` (paper: top-1).
            return_routing_maps: also return ``routing_maps`` (see :class:`IngredientsPipelineOutput`).
            negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale, use_dynamic_cfg, eta,
            generator, latents, prompt_embeds, negative_prompt_embeds, output_type, return_dict, attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length: as in
                ``ConsisIDPipeline`` (defaults are Ingredients': 480x720, 49 frames, 50 steps, guidance 6.0). Unlike
                ``ConsisIDPipeline``, ``num_videos_per_prompt`` is honoured.

        Every video in the batch, and both classifier-free-guidance branches, are routed with their own hidden
        states (the released code routes only batch element 0). Both branches see the faces, as released: the
        guidance is on the text.

        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if kps_cond is not None:
            raise ValueError("`kps_cond`: Ingredients' transformer takes no facial keypoints (ConsisID's `is_kps`)")
        self.check_face_inputs(image, id_cond, id_vit_hidden, face_images, routing)
        num_frames = self.check_numbers(
            num_frames, num_inference_steps, guidance_scale, num_videos_per_prompt, eta, max_sequence_length
        )
        if not isinstance(return_routing_maps, bool):
            raise TypeError(f"`return_routing_maps` must be a bool, got {return_routing_maps!r}")
        for name, value in (("id_cond", id_cond), ("id_vit_hidden", id_vit_hidden)):
            check_finite_tensors(name, value)
        if latents is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else None
            if batch is None and isinstance(prompt_embeds, torch.Tensor):
                batch = prompt_embeds.shape[0]
            if batch is not None and isinstance(latents, torch.Tensor):
                expected = self.latents_shape(batch * num_videos_per_prompt, num_frames, height, width)
                if tuple(latents.shape) != expected:
                    raise ValueError(
                        f"`latents` must have shape (videos, latent frames, channels, height / "
                        f"{self.vae_scale_factor_spatial}, width / {self.vae_scale_factor_spatial}) = {expected}, got "
                        f"{tuple(latents.shape)}"
                    )
            check_finite_tensors("latents", latents)
        if face_images is None:
            # Checked now (shapes, number of identities), before the text encoder runs.
            face_embeds = self.transformer.encode_faces(id_cond, id_vit_hidden)
        self.check_inputs(
            image=image if image is not None else PIL.Image.new("RGB", (width, height)),
            prompt=prompt,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        if face_images is not None:
            faces = self.face_encoder(face_images)
            face_embeds = self.transformer.encode_faces(faces.id_cond, faces.id_vit_hidden)
            image = faces.first_frame if image is None else image
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False

        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        num_videos = batch_size * num_videos_per_prompt
        if face_embeds.shape[0] not in (1, num_videos):
            raise ValueError(
                f"the faces have a batch of {face_embeds.shape[0]}: use 1 (shared) or one set per video ({num_videos})"
            )
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1.0

        # Text.
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        if do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        self._num_timesteps = len(timesteps)

        # Latents: the first frame, encoded once per video.
        image = self.video_processor.preprocess(image, height=height, width=width).to(
            device, dtype=prompt_embeds.dtype
        )
        if image.shape[0] == 1:
            image = image.expand(num_videos, -1, -1, -1)
        elif image.shape[0] != num_videos:
            raise ValueError(f"`image` holds {image.shape[0]} frames; give 1 or one per video ({num_videos})")
        latent_channels = self.transformer.config.in_channels // 2
        latents, image_latents = self.prepare_latents(
            image,
            num_videos,
            latent_channels,
            num_frames,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        face_embeds = face_embeds.to(device, prompt_embeds.dtype)
        if do_classifier_free_guidance and face_embeds.shape[0] > 1:  # per-video faces: the same for both branches
            face_embeds = torch.cat([face_embeds, face_embeds])
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        image_rotary_emb = (
            self._prepare_rotary_positional_embeddings(height, width, latents.size(1), device)
            if self.transformer.config.use_rotary_positional_embeddings
            else None
        )

        # Denoise (ConsisIDPipeline's loop; the transformer routes every sample of the batch).
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        routing_maps = None
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            old_pred_original_sample = None
            timesteps_cpu = timesteps.cpu()
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                latent_image_input = torch.cat([image_latents] * 2) if do_classifier_free_guidance else image_latents
                latent_model_input = torch.cat([latent_model_input, latent_image_input], dim=2)
                timestep = t.expand(latent_model_input.shape[0])
                record = return_routing_maps and i == len(timesteps) - 1
                out = self.transformer(
                    hidden_states=latent_model_input,
                    encoder_hidden_states=prompt_embeds,
                    timestep=timestep,
                    image_rotary_emb=image_rotary_emb,
                    attention_kwargs=attention_kwargs,
                    face_embeds=face_embeds,
                    routing=routing,
                    return_routing_logits=record,
                    return_dict=True,
                )
                noise_pred = out.sample.float()
                if record:
                    cond = [lg[-num_videos:] for lg in out.routing_logits]  # the conditional branch
                    grid = (latents.shape[1], *(s // self.transformer.config.patch_size for s in latents.shape[-2:]))
                    routing_maps = majority_identity(cond).view(num_videos, *grid).cpu()

                if use_dynamic_cfg:
                    progress = (num_inference_steps - timesteps_cpu[i].item()) / num_inference_steps
                    self._guidance_scale = 1 + guidance_scale * ((1 - math.cos(math.pi * progress**5.0)) / 2)
                if do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                if not isinstance(self.scheduler, CogVideoXDPMScheduler):
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                else:
                    latents, old_pred_original_sample = self.scheduler.step(
                        noise_pred,
                        old_pred_original_sample,
                        t,
                        timesteps[i - 1] if i > 0 else None,
                        latents,
                        **extra_step_kwargs,
                        return_dict=False,
                    )
                latents = latents.to(prompt_embeds.dtype)

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:  # not a comprehension: it has its own locals()
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        if output_type != "latent":
            video = self.decode_latents(latents)
            video = self.video_processor.postprocess_video(video=video, output_type=output_type)
        else:
            video = latents
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video, routing_maps)
        return IngredientsPipelineOutput(frames=video, routing_maps=routing_maps)
