"""DiasRPipeline: multi-subject video generation on Wan2.1 with subject-sparse routed attention."""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKLWan, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_module_execution_device
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5EncoderModel

from ..processors import SubjectRoutingState
from ..routing import IDRouter
from ..utils.images import letterbox
from ..utils.latents import encode_latents
from .reference_styles import REFERENCE_STYLES, ReferenceStyle, get_reference_style
from .subjects import (
    DenoiseCall,
    DiasRPipelineOutput,
    SubjectPipelineMixin,
    _check_real,
    _sigma_array,
)

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import export_to_video, load_image
        >>> from diasr_diffusers import DiasRPipeline

        >>> pipe = DiasRPipeline.from_wan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dtype=torch.bfloat16).to("cuda")
        >>> out = pipe(
        ...     prompt="The man and the woman dance in a sunlit kitchen.",
        ...     subject_images=[load_image("man.png"), load_image("woman.png")],
        ...     subject_phrases=["the man", "the woman"],
        ...     height=480, width=832, num_frames=81,
        ...     return_routing_maps=True,
        ... )
        >>> export_to_video(out.frames[0], "dance.mp4", fps=16)
        ```
"""


def _check_experts(transformer: Any, transformer_2: Any, boundary_ratio: Any, expand_timesteps: Any) -> None:
    """Wan2.2's expert set-up: a ``transformer_2`` that would never run (or a boundary with nothing to switch to)
    is a mistake, refused here rather than silently sampling with one expert (or failing at the switch)."""
    if not isinstance(expand_timesteps, bool):
        raise TypeError(f"`expand_timesteps` must be a bool, got {expand_timesteps!r}")
    if transformer is None and transformer_2 is None:
        raise ValueError("a Wan pipeline needs `transformer`, `transformer_2` (Wan2.2's low-noise expert) or both")
    if boundary_ratio is not None:
        if (
            isinstance(boundary_ratio, bool)
            or not isinstance(boundary_ratio, numbers.Real)
            or not 0.0 < boundary_ratio <= 1.0
        ):
            raise ValueError(f"`boundary_ratio` must be None or a number in (0, 1], got {boundary_ratio!r}")
        if transformer_2 is None:
            raise ValueError(
                f"`boundary_ratio={boundary_ratio}` switches to a low-noise expert, but `transformer_2` is None"
            )
    elif transformer is None:
        raise ValueError("`transformer_2` alone (no `transformer`) needs `boundary_ratio` (1.0: it denoises every step)")
    elif transformer_2 is not None:
        raise ValueError(
            "`transformer_2` (the Wan2.2 low-noise expert) needs `boundary_ratio` (e.g. 0.875 for Wan2.2-T2V-A14B); "
            "without it it would never run"
        )
    if transformer_2 is not None and transformer is not None:
        for key in ("in_channels", "out_channels", "patch_size", "num_layers"):
            a, b = transformer.config.get(key), transformer_2.config.get(key)
            if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
                raise ValueError(f"`transformer` and `transformer_2` differ in {key} ({a} vs {b}): not a Wan2.2 pair")


class DiasRPipeline(SubjectPipelineMixin, WanPipeline):
    r"""Multi-subject video generation with Wan2.1 and DiasR subject-sparse routed attention.

    Reference images are VAE-encoded to one clean latent frame each and appended after the video latents
    (Phantom-style). In every self-attention layer, each video token is routed to one subject (or to none) and
    attends to the video plus that subject's reference tokens only; text cross-attention is routed the same way over
    the subjects' phrases. Without subjects it is exactly :class:`~diffusers.WanPipeline`.

    Components:
        tokenizer, text_encoder, vae, scheduler, transformer: as in ``WanPipeline``.
        id_router (:class:`~diasr_diffusers.IDRouter`, optional): the trained router; without it, the training-free
            similarity router is used. With two Wan2.2 experts, this one router serves both (see below).
        transformer_2 (optional, Wan2.2 A14B): the low-noise expert, run for timesteps below
            ``boundary_ratio * num_train_timesteps`` (as :class:`~diffusers.WanPipeline`).

    Config:
        reference_style: ``"diasr"`` (default), ``"phantom"`` or ``"skyreels_v3"``: the conventions of the weights
            (see :mod:`~diasr_diffusers.pipelines.reference_styles`, :meth:`from_phantom`, :meth:`from_skyreels_v3`).
        boundary_ratio (Wan2.2 A14B): where ``transformer`` (high noise) hands over to ``transformer_2``.
        expand_timesteps (Wan2.2 TI2V-5B): per-token timesteps. Reference tokens get timestep 0: they are clean
            latents, and 0 is what Wan2.2 itself gives clean conditioning tokens (the first frame in TI2V's
            image-to-video mode), so the model reads them as "already denoised" rather than as noise at level ``t``.

    Wan2.2's two experts share one ``id_router`` and one routing state: the processors of both experts are
    installed on the same :class:`SubjectRoutingState`, the references are appended for whichever expert runs, and
    the router is trained on timesteps of both noise ranges (the trainer sends each sample to the expert its
    timestep selects). One router keeps a token's subject stable across the hand-over and halves the router weights;
    the experts have the same architecture, so one router fits both (checked at construction).
    """

    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->vae"
    # The router runs inside the transformer's forward; it is small, so it stays on the execution device.
    _exclude_from_cpu_offload = ["id_router"]
    _optional_components = ["transformer", "id_router", "transformer_2"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _transformer_class = WanTransformer3DModel
    _transformer_folders = ("transformer", "transformer_2")

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: WanTransformer3DModel,
        id_router: IDRouter | None = None,
        reference_style: str | ReferenceStyle = "diasr",
        transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
    ):
        # WanPipeline's own __init__ registers its components itself (and allows a missing `transformer`): skip it.
        super(WanPipeline, self).__init__()
        _check_experts(transformer, transformer_2, boundary_ratio, expand_timesteps)
        if id_router is not None:
            for expert in (transformer, transformer_2):
                if expert is not None:
                    id_router.check_compatible(expert)  # one sentence now, not a matmul error mid-denoising
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            id_router=id_router,
            transformer_2=transformer_2,
        )
        # Recorded by name in model_index.json, so a saved Phantom/SkyReels pipeline reloads with its conventions.
        self.register_to_config(reference_style=get_reference_style(reference_style).name)
        self.register_to_config(boundary_ratio=boundary_ratio, expand_timesteps=expand_timesteps)
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self.routing_state = SubjectRoutingState()
        self._install_processors()

    @property
    def experts(self) -> list[WanTransformer3DModel]:
        """The transformers this pipeline runs: ``[transformer]``, or Wan2.2 A14B's ``[transformer, transformer_2]``."""
        return [t for t in (self.transformer, getattr(self, "transformer_2", None)) if t is not None]

    def expert_for(self, t: torch.Tensor) -> tuple[WanTransformer3DModel, bool]:
        """The expert that denoises timestep ``t`` (as :class:`~diffusers.WanPipeline`), and whether it is the
        low-noise one (``transformer_2``, guided by ``guidance_scale_2``). Without ``transformer`` (Wan2.2 with only
        the low-noise expert) ``transformer_2`` denoises every step."""
        if self.config.get("boundary_ratio") is None:
            return self.transformer, False
        boundary = self.config.boundary_ratio * self.scheduler.config.num_train_timesteps
        if self.transformer is not None and t >= boundary:
            return self.transformer, False
        return self.transformer_2, True

    def rotary_limits(self) -> tuple[int, int, int]:
        """Wan's rotary table has ``rope_max_seq_len`` positions on each axis."""
        n = self.denoiser.config.rope_max_seq_len
        return n, n, n

    # The denoising loop's hooks (SubjectPipelineMixin.denoise): references appended on the frame axis.

    def transformer_inputs(self, call, latents, t, text, references):
        hidden = latents.to(call.inputs["dtype"])
        num_ref_frames = 0
        if references is not None:
            hidden, num_ref_frames = torch.cat([hidden, references], dim=2), references.shape[2]
        timestep = self.transformer_timesteps(t, latents.shape[0], latents.shape, num_ref_frames)
        return {"hidden_states": hidden, "timestep": timestep, **text}

    def video_output(self, call, pred, latents):
        return pred[:, :, : latents.shape[2]]

    def transformer_timesteps(
        self, t: torch.Tensor, batch: int, latent_shape: tuple[int, ...], num_ref_frames: int = 0
    ):
        """The transformer's ``timestep`` for a ``[video | refs]`` input: ``t`` per sample, or with
        ``expand_timesteps`` (Wan2.2 TI2V) one per token, ``t`` on the video tokens and 0 on the reference tokens
        (clean latents, as Wan2.2 marks its clean conditioning frames)."""
        if not self.config.get("expand_timesteps"):
            return t.expand(batch)
        f, h, w = latent_shape[-3:]
        pt, ph, pw = self.denoiser.config.patch_size
        # The same arithmetic as WanPipeline (a float32 mask of ones times t), so subject-free calls match it bit for bit.
        video = torch.ones(f // pt, h // ph, w // pw, dtype=torch.float32, device=t.device) * t
        refs = torch.zeros(num_ref_frames // pt, h // ph, w // pw, dtype=torch.float32, device=t.device)
        return torch.cat([video, refs]).flatten().unsqueeze(0).expand(batch, -1)

    # The model-specific steps of training (used by DiasRTrainer; every pipeline family provides these four).

    def encode_video_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, C, F, h, w)`` latents of ``(B, 3, F, H, W)`` pixels in [-1, 1] (posterior mean)."""
        return encode_latents(self.vae, pixels)

    def encode_training_prompt(
        self, caption: str, max_sequence_length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds, attention mask or None)`` of one caption, as the denoiser reads them."""
        embeds, _ = self.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device
        )
        return embeds, None

    def denoiser_inputs(
        self, noisy: torch.Tensor, refs: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: Any
    ) -> dict[str, Any]:
        """The transformer's keyword inputs for ``[video | refs]`` (``(B, C, F, h, w)`` and ``(B, C, K, h, w)``) at
        timestep ``t`` (a 0-d tensor; per-token with ``expand_timesteps``)."""
        timestep = self.transformer_timesteps(t, noisy.shape[0], noisy.shape, refs.shape[2]).to(noisy.dtype)
        hidden = torch.cat([noisy, refs], dim=2)
        return {"hidden_states": hidden, "timestep": timestep, "encoder_hidden_states": prompt_embeds}

    def video_prediction(self, pred: torch.Tensor, video_shape: torch.Size) -> torch.Tensor:
        """The video part ``(B, C, F, h, w)`` of the transformer's output for :meth:`denoiser_inputs`."""
        return pred[:, :, : video_shape[2]]

    # ------------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_wan(
        cls, wan_pipeline_or_path: WanPipeline | str | os.PathLike, id_router: IDRouter | str | None = None, **kwargs
    ) -> DiasRPipeline:
        """Build from a stock Wan Diffusers pipeline (object, local folder or Hub id) plus an optional router
        (object, local folder or Hub id). ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``).

        Wan2.1 and Wan2.2 checkpoints are accepted: a Wan2.2-A14B folder's ``transformer_2`` and ``boundary_ratio``
        and a TI2V-5B folder's ``expand_timesteps`` (from its ``model_index.json``) are carried over. One router
        serves both A14B experts."""
        wan = wan_pipeline_or_path
        if not isinstance(wan, (WanPipeline, str, os.PathLike)):
            raise TypeError(
                f"`wan_pipeline_or_path` must be a WanPipeline, a local folder or a Hub id, got {type(wan).__name__}"
            )
        id_router = cls.load_id_router(id_router, **kwargs)  # its type checked before the base loads
        if not isinstance(wan, WanPipeline):
            cls.check_transformer_folders(wan, **kwargs)
            wan = WanPipeline.from_pretrained(wan_pipeline_or_path, **kwargs)
        return cls(
            tokenizer=wan.tokenizer,
            text_encoder=wan.text_encoder,
            vae=wan.vae,
            scheduler=wan.scheduler,
            transformer=wan.transformer,
            id_router=id_router,
            transformer_2=getattr(wan, "transformer_2", None),
            boundary_ratio=wan.config.get("boundary_ratio"),
            expand_timesteps=bool(wan.config.get("expand_timesteps", False)),
        )

    @classmethod
    def from_phantom(
        cls,
        checkpoint: str | os.PathLike | list[str | os.PathLike] = "bytedance-research/Phantom",
        base: WanPipeline | str | os.PathLike = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        size: str = "1.3B",
        weight_name: str | None = None,
        transformer_config: dict[str, Any] | str | os.PathLike | None = None,
        id_router: IDRouter | str | None = None,
        **kwargs: Any,
    ) -> DiasRPipeline:
        r"""Phantom-Wan (1.3B or 14B) as a DiasR pipeline with ``reference_style="phantom"``.

        Args:
            checkpoint: the Phantom transformer in the original Wan key format: a Hub repo id (default
                ``bytedance-research/Phantom``; the file for ``size`` is downloaded), a local ``Phantom-Wan-1.3B.pth``
                (read with ``torch.load(weights_only=True)``), the 14B ``*.safetensors.index.json`` or its shards (a
                list, or one shard: its siblings are found), or a folder holding one of these.
            base: the Wan2.1 Diffusers pipeline (object, folder or Hub id) giving the VAE, text encoder and
                tokenizer; its transformer is not loaded. Phantom 1.3B and 14B share Wan2.1's VAE and T5.
            size: ``"1.3B"`` or ``"14B"``: which file to take from a Hub repo.
            weight_name: another file name in the repo or folder.
            transformer_config: the ``WanTransformer3DModel`` config (dict, ``config.json`` or folder); default:
                Wan2.1's published 1.3B/14B config matching the weights' shapes (nothing is fetched for it).
            id_router: an optional trained :class:`IDRouter` (object, folder or Hub id).
            kwargs: to ``from_pretrained`` of ``base`` (e.g. ``dtype``, ``cache_dir``), and ``dtype`` also to the
                transformer.
        """
        from ..utils.checkpoint_paths import check_loader_sources
        from .public_weights import load_original_wan_state_dict, wan_transformer_from_original

        kwargs = check_loader_sources(kwargs, checkpoint=checkpoint, base=base, id_router=id_router)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        # The checkpoint first: a missing shard or a non-Wan file fails before the base is downloaded.
        state_dict = load_original_wan_state_dict(checkpoint, size=size, weight_name=weight_name, **kwargs)
        # A size outside Wan2.1's published two falls back on a local base's transformer config (toy models).
        if isinstance(base, WanPipeline):
            fallback = dict(base.transformer.config) if base.transformer is not None else None
        else:
            fallback = Path(base, "transformer", "config.json")
            fallback = fallback if fallback.is_file() else None
        transformer = wan_transformer_from_original(state_dict, transformer_config, dtype, fallback)
        del state_dict
        if isinstance(base, WanPipeline):
            base.transformer = transformer
        else:
            base = WanPipeline.from_pretrained(base, transformer=transformer, **kwargs)
        pipe = cls.from_wan(base, id_router=id_router, **kwargs)
        pipe.set_reference_style("phantom")
        return pipe

    @classmethod
    def from_skyreels_v3(
        cls,
        pretrained_model_name_or_path: str | os.PathLike = "Skywork/SkyReels-V3-R2V-14B",
        id_router: IDRouter | str | None = None,
        **kwargs: Any,
    ) -> DiasRPipeline:
        r"""SkyReels-V3 R2V (a Diffusers folder or Hub id) as a DiasR pipeline with ``reference_style="skyreels_v3"``.

        A separate entry point because ``from_pretrained`` cannot read that folder as is: its
        ``transformer/config.json`` names the class ``SkyReelsA2WanI2v3DModel`` (from the ``skyreels_v3`` package),
        a copy of an older ``WanTransformer3DModel`` with the same parameter names, which is loaded here as a stock
        ``WanTransformer3DModel``. The VAE is kept in float32 (as SkyReels runs it), the scheduler is the one
        SkyReels installs (UniPC, flow sigmas, shift 5). ``kwargs``: ``dtype`` and Hub options (``cache_dir``,
        ``token``, ``revision``, ``local_files_only``, ``force_download``).
        """
        from diffusers import AutoencoderKLWan

        from ..utils.checkpoint_paths import check_loader_sources
        from .public_weights import skyreels_v3_transformer

        kwargs = check_loader_sources(kwargs, pretrained_model_name_or_path=pretrained_model_name_or_path, id_router=id_router)  # fmt: skip
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        path = pretrained_model_name_or_path
        folder = str(path) if os.path.isdir(path) else cls.download(str(path), **kwargs)
        transformer = skyreels_v3_transformer(folder, dtype=dtype)
        dtype_kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        id_router = cls.load_id_router(id_router, **kwargs)
        return cls(
            tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder", **dtype_kwargs).eval(),
            vae=AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).eval(),
            scheduler=REFERENCE_STYLES["skyreels_v3"].make_scheduler(),
            transformer=transformer,
            id_router=id_router,
            reference_style="skyreels_v3",
        )

    # ------------------------------------------------------------------------------------------------------------
    # Inputs

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        callback_on_step_end_tensor_inputs=None,
        *,
        guidance_scale_2: float | None = None,
        **kwargs: Any,
    ) -> None:
        """:meth:`SubjectPipelineMixin.check_inputs <diasr_diffusers.pipelines.subjects.SubjectPipelineMixin.check_inputs>`
        plus Wan2.2's ``guidance_scale_2`` (the low-noise expert's guidance: only with two experts)."""
        if guidance_scale_2 is not None:
            if self.config.get("boundary_ratio") is None:
                raise ValueError(
                    "`guidance_scale_2` is the low-noise expert's guidance (Wan2.2 A14B); this pipeline has one "
                    "transformer (`boundary_ratio` is None)"
                )
            _check_real("guidance_scale_2", guidance_scale_2, 0.0)
        super().check_inputs(
            prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
            callback_on_step_end_tensor_inputs, **kwargs,
        )  # fmt: skip

    def encode_references(
        self,
        subjects: list[list[PIL.Image.Image]],
        height: int,
        width: int,
        device: torch.device,
        dtype: torch.dtype,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """One clean latent frame per reference image: ``(1, C, K, h, w)``, subjects in order, normalised like the
        video latents. Images are letterboxed onto white at the video size and encoded as the :attr:`reference_style`
        says (posterior mean, or a sample drawn with ``generator``, one image at a time)."""
        style = self.reference_style
        frames = [
            letterbox(img, height, width, resample=style.resample, floor_size=style.floor_size)
            for images in subjects
            for img in images
        ]
        pixels = self.video_processor.preprocess(frames, height=height, width=width)  # (K, 3, H, W) in [-1, 1]
        if style.sample_references:
            # One image at a time, as SkyReels does, so the posterior samples draw from the generator in its order.
            latents = torch.cat([encode_latents(self.vae, p[None, :, None], generator, sample=True) for p in pixels])
        else:
            latents = encode_latents(self.vae, pixels.unsqueeze(2))  # each image its own 1-frame clip: (K, C, 1, h, w)
        return latents[:, :, 0].transpose(0, 1)[None].to(device, dtype)

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 512,
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

        The stock ``WanPipeline`` arguments come first, in its order (``pipe(prompt, negative_prompt, height, width,
        num_frames, ...)``); the subject arguments are keyword-only.

        Args:
            prompt: the text; each subject's phrase should occur in it.
            subject_images: one entry per subject: a PIL image, numpy array or tensor, or a list of several images of
                the same subject. Any size/mode; fitted to the video size without distortion (white padding).
            subject_phrases: the words in ``prompt`` naming each subject (``"the man"``); they tie each image to
                its text anchor and route the text cross-attention.
            negative_prompt, height, width, num_frames, num_inference_steps, generator, latents, prompt_embeds,
            negative_prompt_embeds, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs, max_sequence_length: as in ``WanPipeline``. ``None`` (for
                ``negative_prompt``, ``num_frames``, ``num_inference_steps``) takes the :attr:`reference_style`
                default (``"diasr"``: none, 81, 50).
            guidance_scale: text guidance (``None``: the style's, 5.0 for ``"diasr"``). With ``guidance_scale_ref``
                it is the text term of three-way guidance ``neg + g_ref (pos_ref - neg) + g_text (pos_ref_text -
                pos_ref)``.
            guidance_scale_ref: reference guidance; ``None`` = the style's (``"diasr"``: plain two-way CFG,
                references always on in the conditional branch; ``"phantom"``: 5.0 with ``guidance_scale=7.5``).
            routing: ``"auto"`` (router if loaded, masks if given, else similarity), ``"router"``, ``"similarity"``,
                ``"masks"`` (layout control from ``subject_masks``) or ``"dense"`` (every token sees every subject:
                the Phantom baseline).
            route_text: also route text cross-attention over the subject phrases (needs ``subject_phrases``).
            subject_masks: ``(N, num_frames, height, width)`` or ``(N, height, width)`` pixel masks, for
                ``routing="masks"``: bool, 0/1 or 0..255 integers, or floats in ``[0, 1]`` (see
                :func:`~diasr_diffusers.routing.normalize_masks`).
            similarity_threshold: null threshold of the training-free similarity router (mean cosine).
            return_routing_maps: also return ``routing_maps`` (see :class:`DiasRPipelineOutput`).
            sigmas: the noise level of each step, strictly decreasing in ``(0, 1]`` (the final 0 is appended);
                ``num_inference_steps`` is taken from its length when unset (else they must agree). These are the
                levels the denoising loop *uses*: the first step denoises ``latents`` as if they were
                ``(1 - sigmas[0]) * x0 + sigmas[0] * noise``, which is how to start from a partially noised video
                (SDEdit / img2img style). Unlike the sigmas that Diffusers pipelines forward to
                ``scheduler.set_timesteps`` (which the scheduler then shifts by its ``shift`` / ``flow_shift``), the
                pipeline undoes the scheduler's static shift first, so ``scheduler.sigmas[:-1]`` equals ``sigmas``
                (to float32 rounding); a scheduler that cannot reproduce them (dynamic shifting, Karras sigmas, no
                flow sigmas) is refused. They override the :attr:`reference_style`'s schedule.
            guidance_scale_2: Wan2.2 A14B: the text guidance of the low-noise expert (``transformer_2``), as in
                ``WanPipeline``; ``None`` = ``guidance_scale``. ``guidance_scale_ref`` applies to both experts.

        Examples:
        """
        given_guidance_scale_ref = guidance_scale_ref  # only an argument the user gave can be "ignored"
        if sigmas is not None and num_inference_steps is None:
            num_inference_steps = len(_sigma_array(sigmas))  # before the style's default could disagree with it
        defaults = self._style_defaults(
            negative_prompt, negative_prompt_embeds, num_frames, num_inference_steps, guidance_scale, guidance_scale_ref
        )  # fmt: skip
        negative_prompt, num_frames, num_inference_steps, guidance_scale, guidance_scale_ref = defaults

        # 1. Check everything before any expensive work. The style's defaults are valid: what the user gave is
        # checked, and only an argument the user gave can be "ignored".
        style = self.reference_style
        num_frames, prompts, subjects, routing = self.prepare_subject_call(
            prompt=prompt, subject_images=subject_images, subject_phrases=subject_phrases,
            negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guidance_scale_ref=given_guidance_scale_ref, routing=routing, route_text=route_text,
            subject_masks=subject_masks, similarity_threshold=similarity_threshold,
            num_videos_per_prompt=num_videos_per_prompt, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            return_routing_maps=return_routing_maps, attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, sigmas=sigmas, always_guide=style.always_guide,
            guidance_scale_2=guidance_scale_2,
        )  # fmt: skip
        self.check_reference_style_inputs(subjects, height, width, num_frames, routing)

        self._guidance_scale = guidance_scale
        self._guidance_scale_2 = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        num_videos = batch_size * num_videos_per_prompt
        # Phantom runs its guidance passes whatever the scales are; Diffusers (and SkyReels) only when g > 1.
        guide = self.do_classifier_free_guidance or (style.always_guide and bool(subjects))

        # 2. Text.
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=guide,
            num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length, device=device,
        )  # fmt: skip
        dtype = self.denoiser.dtype
        call = DenoiseCall(
            prompt={"encoder_hidden_states": prompt_embeds.to(dtype)},
            negative={"encoder_hidden_states": negative_prompt_embeds.to(dtype)} if guide else None,
            attention_kwargs=attention_kwargs, inputs={"dtype": dtype},
        )  # fmt: skip

        # 3. Latents and references.
        self.set_reference_style_timesteps(num_inference_steps, device, sigmas=sigmas)
        timesteps = self.scheduler.timesteps
        # Phantom draws the noise for video and reference frames in one tensor: keep its video part, so a seed
        # gives the original's noise.
        extra = sum(len(s) for s in subjects) if style.noise_covers_references and latents is None else 0
        latents = self.prepare_latents(
            num_videos, self.denoiser.config.in_channels, height, width,
            num_frames + extra * self.vae_scale_factor_temporal, torch.float32, device, generator, latents,
        )  # fmt: skip
        if extra:
            latents = latents[:, :, :-extra].contiguous()
        if subjects:
            call.references, call.num_ref_frames, call.routing_inputs = self.prepare_references(
                subjects, subject_phrases=subject_phrases, prompts=prompts, prompt=call.prompt, video_latents=latents,
                routing=routing, route_text=route_text, subject_masks=subject_masks,
                similarity_threshold=similarity_threshold, num_videos_per_prompt=num_videos_per_prompt,
                num_frames=num_frames, max_sequence_length=max_sequence_length, height=height, width=width,
                device=device, dtype=dtype, generator=generator,
            )  # fmt: skip
            call.references = self._pad_reference_latents(call.references, routing)  # SkyReels, dense only
            call.num_ref_frames = call.references.shape[2]
            call.guidance_scale_ref = guidance_scale_ref
            call.return_routing_maps = return_routing_maps
            call.zero_negative_references = style.zero_negative_references
        self.check_context_parallel_lengths(latents, call.num_ref_frames)

        # 4. Denoise.
        self.scheduler.set_begin_index(0)
        latents, routing_maps = self.denoise(
            latents, timesteps, num_inference_steps, call, callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 5. Decode (as WanPipeline).
        if output_type != "latent":
            latents = latents.to(get_module_execution_device(self.vae), dtype=self.vae.dtype)
            # Same arithmetic as WanPipeline, so subject-free calls are bit-identical to it.
            mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
            inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
            video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        else:
            video = latents
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video, routing_maps)
        return DiasRPipelineOutput(frames=video, routing_maps=routing_maps)

    # ------------------------------------------------------------------------------------------------------------
    # Reference styles: the conventions of public reference-trained weights (see `reference_styles.py`).

    @property
    def reference_style(self) -> ReferenceStyle:
        """The :class:`ReferenceStyle` preset this pipeline samples with (``config.reference_style``)."""
        return REFERENCE_STYLES[self.config.reference_style]

    def set_reference_style(self, reference_style: str | ReferenceStyle, scheduler: bool = True) -> None:
        """Switch to another preset (recorded in the config, so ``save_pretrained`` keeps it). With ``scheduler``,
        also install the scheduler the preset samples with (when it fixes one)."""
        style = get_reference_style(reference_style)
        self.register_to_config(reference_style=style.name)
        new_scheduler = style.make_scheduler() if scheduler else None
        if new_scheduler is not None:
            self.scheduler = new_scheduler

    def _style_defaults(
        self, negative_prompt, negative_prompt_embeds, num_frames, num_inference_steps, guidance_scale, guidance_scale_ref,
    ) -> tuple:  # fmt: skip
        style = self.reference_style
        if negative_prompt is None and negative_prompt_embeds is None:
            negative_prompt = style.negative_prompt
        return (
            negative_prompt,
            style.num_frames if num_frames is None else num_frames,
            style.num_inference_steps if num_inference_steps is None else num_inference_steps,
            style.guidance_scale if guidance_scale is None else guidance_scale,
            style.guidance_scale_ref if guidance_scale_ref is None else guidance_scale_ref,
        )

    def check_reference_style_inputs(
        self, subjects: list[list[PIL.Image.Image]], height: int, width: int, num_frames: int, routing: str
    ) -> None:
        """Errors for what the style cannot run, warnings for what its weights never saw (before any work)."""
        style = self.reference_style
        total = sum(len(images) for images in subjects)
        if style.pad_references_to is not None and total > style.pad_references_to:
            raise ValueError(
                f"`subject_images`: reference_style={style.name!r} takes at most {style.pad_references_to} reference "
                f"images in all (its reference set is padded to that many frames), got {total}"
            )
        rope_frames = self.rotary_limits()[0]
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        if subjects and routing == "dense" and style.pad_references_to and latent_frames + style.pad_references_to > rope_frames:  # fmt: skip
            raise ValueError(
                f"{latent_frames} latent frames + {style.pad_references_to} reference frames (padded) exceed the "
                f"transformer's rope_max_seq_len={rope_frames}"
            )
        if style.max_references is not None and total > style.max_references:
            logger.warning(
                f"{total} reference images: the {style.name!r} weights were trained with at most "
                f"{style.max_references}; expect weaker identities"
            )
        if subjects and style.trained_sizes is not None and (height, width) not in style.trained_sizes:
            sizes = ", ".join(f"{w}x{h}" for h, w in style.trained_sizes)
            logger.warning(
                f"{width}x{height} (width x height) is not a size the {style.name!r} weights were trained at ({sizes})"
            )
        if not style.scheduler_matches(self.scheduler):
            logger.warning(
                f"reference_style={style.name!r} samples with UniPCMultistepScheduler(use_flow_sigmas=True, "
                f"flow_shift={style.flow_shift}); this pipeline has {type(self.scheduler).__name__} "
                f"(flow_shift={self.scheduler.config.get('flow_shift')}), so it will not reproduce the original "
                "sampler; `pipe.set_reference_style(...)` installs the right one"
            )

    def set_reference_style_timesteps(
        self, num_inference_steps: int, device: torch.device, sigmas: list[float] | np.ndarray | None = None
    ) -> None:
        """``scheduler.set_timesteps`` with the style's explicit sigmas (Phantom's schedule starts at 0.999, where
        Diffusers' flow-sigma UniPC starts at 1.0) when the scheduler takes them.

        ``sigmas`` (the call's): the noise levels to use, which win over the style's; see :meth:`set_exact_sigmas`.
        """
        if sigmas is not None:
            self.set_exact_sigmas(sigmas, device)
            return
        sigmas = self.reference_style.sigmas(num_inference_steps)
        if sigmas is not None and self.scheduler.config.get("use_flow_sigmas"):
            self.scheduler.set_timesteps(device=device, sigmas=sigmas)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)

    def _pad_reference_latents(self, ref_latents: torch.Tensor, routing: str) -> torch.Tensor:
        """SkyReels' zero padding of the reference set to a fixed number of frames (dense routing only).

        Routed modes drop the padding: a padding frame belongs to no subject, and a routed video token sees only
        its own subject's references, so the sequence keeps just the real reference frames.
        """
        pad = self.reference_style.pad_references_to
        if pad is None or routing != "dense" or ref_latents.shape[2] >= pad:
            return ref_latents
        b, c, k, h, w = ref_latents.shape
        return torch.cat([ref_latents, ref_latents.new_zeros(b, c, pad - k, h, w)], dim=2)
