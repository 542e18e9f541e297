"""Subject handling shared by every DiasR pipeline (Wan, CogVideoX, ...): argument checks, routing resolution,
text routing over the subject phrases, the routing-state inputs of a call, routing maps, loading with a router.

:class:`SubjectPipelineMixin` goes first in a pipeline's bases (``class DiasRPipeline(SubjectPipelineMixin,
WanPipeline)``). A family's pipeline sets :attr:`~SubjectPipelineMixin._processor_class` and
:attr:`~SubjectPipelineMixin._transformer_class`, and overrides :meth:`~SubjectPipelineMixin.latents_shape` if the
``latents`` argument of its ``__call__`` is not laid out ``(B, C, F, h, w)``. The shared code itself (routing inputs,
token grid, the trainer) reads latents in the VAE's ``(B, C, F, h, w)`` layout: CogVideoX hands them over
transposed, LTX unpacked. A pipeline with
several denoisers (Wan2.2 A14B's two experts) overrides :attr:`~SubjectPipelineMixin.experts` /
:meth:`~SubjectPipelineMixin.expert_for` and lists their folders in ``_transformer_folders``; processors are
installed on every expert, all sharing one routing state (and one ``id_router``).
"""

from __future__ import annotations

import inspect
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput, logging
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download

from ..processors import ROUTING_MODES, RoutedAttnProcessorBase, SubjectRoutingState, TextSegments
from ..processors.core import install_subject_processors
from ..processors.parallel import check_context_parallel_inputs
from ..routing import (
    IDRouter,
    check_layout_masks,
    layout_labels,
    masks_to_token_grid,
    normalize_masks,
    phrase_token_owners,
    token_grid_factors,
)
from ..utils.checkpoints import check_block_model_folder
from ..utils.images import normalize_subject_images
from .checks import check_int, check_real

logger = logging.get_logger(__name__)
_CPU = torch.device("cpu")


@dataclass
class DiasRPipelineOutput(BaseOutput):
    r"""Output of :class:`DiasRPipeline` and :class:`DiasRCogVideoXPipeline`.

    Args:
        frames: the videos: ``np.ndarray`` ``(B, F, H, W, 3)``, a list of lists of PIL images, a tensor, or latents.
        routing_maps: when ``return_routing_maps=True`` and subjects were given, ``(B, F_lat, H_tok, W_tok)`` int64:
            the subject index (or ``-1``, null) each video token was routed to at the last step, by majority over
            the routed layers. ``None`` otherwise.
    """

    frames: Any
    routing_maps: torch.Tensor | None = None


OUTPUT_TYPES = ("np", "pil", "pt", "latent")


_check_int, _check_real = check_int, check_real  # the shared checks (pipelines/checks.py), under their old names


def _sigma_array(sigmas: Any) -> np.ndarray:
    """``sigmas`` as a 1-D float64 array; ``TypeError``/``ValueError`` naming it for anything else."""
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.detach().cpu().double().numpy()
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, (list, tuple, np.ndarray)):
        raise TypeError(f"`sigmas` must be a list of floats (or a 1-D array), got {type(sigmas).__name__}")
    values = list(sigmas.tolist() if isinstance(sigmas, np.ndarray) else sigmas)
    if isinstance(sigmas, np.ndarray) and sigmas.ndim != 1:
        raise ValueError(f"`sigmas` must be one-dimensional, got shape {sigmas.shape}")
    if not values:
        raise ValueError("`sigmas` must hold at least one noise level")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"`sigmas[{i}]` must be a number, got {v!r} ({type(v).__name__})")
    return np.asarray(values, dtype=np.float64)


def _check_sigmas(sigmas: Any, num_inference_steps: int | None) -> np.ndarray:
    """Validate explicit ``sigmas``: finite, strictly decreasing, in ``(0, 1]``, one per inference step."""
    values = _sigma_array(sigmas)
    if not np.isfinite(values).all():
        raise ValueError(f"`sigmas` must be finite, got {values.tolist()}")
    if values.min() <= 0.0 or values.max() > 1.0:
        raise ValueError(
            f"`sigmas` must lie in (0, 1] (the noise level of each step; the final 0 is appended), got "
            f"{values.tolist()}"
        )
    if len(values) > 1 and not (np.diff(values) < 0).all():
        raise ValueError(f"`sigmas` must be strictly decreasing, got {values.tolist()}")
    if num_inference_steps is not None and len(values) != num_inference_steps:
        raise ValueError(
            f"`sigmas` has {len(values)} entries but `num_inference_steps` is {num_inference_steps}: give one sigma "
            "per step (or leave `num_inference_steps` unset to take it from `sigmas`)"
        )
    return values


def _scheduler_shift(scheduler: Any) -> float:
    """The static flow shift a scheduler applies to sigmas given to ``set_timesteps`` (1.0: none).

    ``FlowMatchEulerDiscreteScheduler`` maps every given sigma through ``shift * s / (1 + (shift - 1) * s)``, and so
    do the multistep schedulers with ``use_flow_sigmas`` (``flow_shift``); a scheduler that shifts by resolution
    (``use_dynamic_shifting``, which needs ``mu``) or takes no sigmas cannot be given exact noise levels.
    """
    cfg = scheduler.config
    name = type(scheduler).__name__
    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"`sigmas`: the pipeline's scheduler {name} does not take explicit sigmas")
    if cfg.get("use_dynamic_shifting"):
        raise ValueError(
            f"`sigmas`: the pipeline's scheduler {name} shifts sigmas by resolution (use_dynamic_shifting), so "
            "explicit noise levels cannot be reproduced"
        )
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return float(scheduler.shift)
    if cfg.get("use_flow_sigmas"):
        return float(cfg.get("flow_shift", 1.0))
    raise ValueError(
        f"`sigmas`: the pipeline's scheduler {name} is not a flow-matching scheduler (FlowMatchEulerDiscreteScheduler, "
        "or a multistep scheduler with use_flow_sigmas=True)"
    )


class SubjectPipelineMixin:
    r"""Subject handling for a DiasR pipeline; see the module docstring. Expects ``self.transformer``,
    ``self.tokenizer``, ``self.vae``, ``self.scheduler``, ``self.id_router``, ``self.routing_state`` and
    ``self.vae_scale_factor_spatial`` / ``vae_scale_factor_temporal``."""

    _processor_class: type[RoutedAttnProcessorBase]
    _transformer_class: type
    # The folders of a saved pipeline holding a `_transformer_class` (checked against their weights on loading).
    _transformer_folders: tuple[str, ...] = ("transformer",)
    # Module-name prefix of the attention modules to route (``install_subject_processors(only=...)``); ``None``: all.
    _processor_prefix: str | None = None

    @property
    def max_subjects(self) -> int | None:
        """The most subjects per call: the router's limit, or ``None`` (no limit) with the similarity router."""
        return self.id_router.config.max_subjects if self.id_router is not None else None

    @property
    def experts(self) -> list[Any]:
        """The transformers this pipeline runs (``[transformer]``; Wan2.2 A14B: both experts)."""
        return [self.transformer] if self.transformer is not None else []

    def expert_for(self, t: torch.Tensor) -> tuple[Any, bool]:
        """The transformer that denoises timestep ``t``, and whether it is a low-noise second expert."""
        return self.transformer, False

    def _install_processors(self) -> None:
        prefix = self._processor_prefix
        for expert in self.experts:
            procs = [p for name, p in expert.attn_processors.items() if prefix is None or name.startswith(prefix)]
            if not all(isinstance(p, self._processor_class) and p.state is self.routing_state for p in procs):
                install_subject_processors(expert, self.routing_state, self._processor_class, only=prefix)

    def check_context_parallel_lengths(self, latents: torch.Tensor, num_ref_frames: int = 0) -> None:
        """Under context parallelism, refuse here (``ValueError`` naming the fix) the token counts Diffusers' even
        split would refuse deep in the transformer: the video alone (negative branch) and video + references."""
        f, h, w = self.video_token_grid(latents)
        video = f * h * w
        lengths = [video] + ([video + num_ref_frames * h * w] if num_ref_frames else [])
        for expert in self.experts:
            check_context_parallel_inputs(expert, lengths)

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs: Any) -> str:
        """Fetch a Hub repo with ``snapshot_download``.

        Diffusers' own ``download`` checks every component's library against diffusers/transformers and rejects our
        ``IDRouter``; a plain snapshot of the repo's weights and configs is all a DiasR repo needs.
        """
        local_files_only = bool(kwargs.get("local_files_only")) or hf_constants.HF_HUB_OFFLINE
        ignore = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.onnx", "*.h5"]
        if kwargs.get("use_safetensors") is False:
            ignore = ["*.msgpack", "*.onnx", "*.h5"]
        return snapshot_download(
            pretrained_model_name,
            cache_dir=kwargs.get("cache_dir"),
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            force_download=bool(kwargs.get("force_download", False)),
            local_files_only=local_files_only,
            ignore_patterns=ignore,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> DiffusionPipeline:
        """As ``DiffusionPipeline.from_pretrained``; the transformer's untrusted ``config.json`` is first checked
        against its weights (:func:`~diasr_diffusers.utils.checkpoints.check_block_model_folder`)."""
        from ..utils.checkpoint_paths import check_loader_sources

        kwargs = check_loader_sources(kwargs, pretrained_model_name_or_path=pretrained_model_name_or_path)
        folder = pretrained_model_name_or_path
        if not os.path.isdir(folder):
            folder = cls.download(folder, **kwargs)
        for name in cls._transformer_folders:
            if kwargs.get(name) is None and os.path.isdir(os.path.join(folder, name)):
                check_block_model_folder(cls._transformer_class, os.path.join(folder, name), kwargs.get("variant"))
        return super().from_pretrained(folder, **kwargs)

    def video_token_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """``(F, H, W)`` of the transformer's video tokens for ``latents`` laid out ``(B, C, F, h, w)``."""
        _, _, f, h, w = latents.shape
        pt, ph, pw = token_grid_factors(self.transformer)["patch_size"]
        return f // pt, h // ph, w // pw

    def latents_shape(self, num_videos: int, num_frames: int, height: int, width: int) -> tuple[tuple[int, ...], str]:
        """The shape the ``latents`` argument must have, and its layout in words (for the error message)."""
        s = self.vae_scale_factor_spatial
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        shape = (num_videos, self.transformer.config.in_channels, latent_frames, height // s, width // s)
        return shape, f"(videos, channels, latent frames, height / {s}, width / {s})"

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
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_ref: float | None = None,
        similarity_threshold: float = 0.0,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int = 512,
        routing: str = "auto",
        output_type: str = "np",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        route_text: bool = True,
        return_routing_maps: bool = False,
        sigmas: Any = None,
    ) -> None:
        """Check every argument of a call before anything is encoded; raise ``ValueError``/``TypeError`` naming it."""
        # Not the Diffusers parent's check_inputs: WanPipeline's reads Wan2.2's `boundary_ratio`, CogVideoXPipeline's
        # checks far less; one set of checks and messages for every family.
        _check_int("height", height, 1)
        _check_int("width", width, 1)
        patch = token_grid_factors(self.transformer)["patch_size"][1]
        multiple = self.vae_scale_factor_spatial * patch
        if height % multiple != 0 or width % multiple != 0:
            raise ValueError(
                f"`height` and `width` have to be divisible by {multiple} (the VAE's {self.vae_scale_factor_spatial}x "
                f"downsampling times the transformer's patch size {patch}) "
                f"but are {height} and {width}."
            )
        _check_int("num_frames", num_frames, 1)
        _check_int("num_inference_steps", num_inference_steps, 1)
        if sigmas is not None:
            _check_sigmas(sigmas, num_inference_steps)
            _scheduler_shift(self.scheduler)  # a scheduler that cannot take them: before anything is encoded
        _check_int("num_videos_per_prompt", num_videos_per_prompt, 1)
        _check_int("max_sequence_length", max_sequence_length, 1)
        _check_real("guidance_scale", guidance_scale, 0.0)
        if guidance_scale_ref is not None:
            _check_real("guidance_scale_ref", guidance_scale_ref, 0.0)
        _check_real("similarity_threshold", similarity_threshold)
        for name, flag in (("route_text", route_text), ("return_routing_maps", return_routing_maps)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {flag!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}")
        if not isinstance(routing, str) or (routing != "auto" and routing not in ROUTING_MODES):
            raise ValueError(f"`routing` must be 'auto' or one of {ROUTING_MODES}, got {routing!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if callback_on_step_end_tensor_inputs is not None:
            if isinstance(callback_on_step_end_tensor_inputs, str):
                raise ValueError(
                    "`callback_on_step_end_tensor_inputs` must be a list of names, e.g. "
                    f"[{callback_on_step_end_tensor_inputs!r}], got a string"
                )
            bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if bad:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {bad}"
                )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is None or isinstance(text, str):
                continue
            if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
                raise ValueError(f"`{name}` has to be a `str` or a non-empty list of `str`, but is {text!r:.200}")
        text_dim = IDRouter.host_sizes(self.transformer)["text_dim"]
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is None:
                continue
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != text_dim:
                got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise ValueError(f"`{name}` must be a tensor of shape (batch, tokens, {text_dim}), got {got}")
            if not embeds.is_floating_point() or not torch.isfinite(embeds).all():
                raise ValueError(f"`{name}` must be a finite floating-point tensor")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if negative_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
                raise ValueError(
                    f"`negative_prompt_embeds` has batch {negative_prompt_embeds.shape[0]} but `prompt_embeds` has "
                    f"{prompt_embeds.shape[0]}"
                )
        batch_size = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries for {batch_size} prompts; give one per prompt "
                "or a single string"
            )
        num_videos = batch_size * num_videos_per_prompt
        if isinstance(generator, list):
            if len(generator) != num_videos or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(
                    f"`generator` list must hold one torch.Generator per video: {batch_size} prompts x "
                    f"{num_videos_per_prompt} videos = {num_videos}, got {len(generator)} entries"
                )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}")
        if latents is not None:
            expected, layout = self.latents_shape(num_videos, num_frames, height, width)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"`latents` must be a tensor of shape {layout} = {expected}, got {got}")
            if not latents.is_floating_point() or not torch.isfinite(latents).all():
                raise ValueError("`latents` must be a finite floating-point tensor")
        if attention_kwargs is not None:
            if not isinstance(attention_kwargs, dict) or set(attention_kwargs) - {"scale"}:
                raise ValueError(
                    "`attention_kwargs` may only hold 'scale' (the LoRA scale: the transformer reads nothing "
                    f"else), got {attention_kwargs!r:.200}"
                )
            if "scale" in attention_kwargs:
                _check_real("attention_kwargs['scale']", attention_kwargs["scale"])

    def prepare_subject_call(
        self,
        *,
        prompt: str | list[str] | None,
        subject_images: list[Any] | None,
        subject_phrases: list[str] | None,
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_scale_ref: float | None,
        routing: str,
        route_text: bool,
        subject_masks: Any,
        similarity_threshold: float,
        num_videos_per_prompt: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        output_type: str,
        return_routing_maps: bool,
        attention_kwargs: dict[str, Any] | None,
        callback_on_step_end: Any,
        callback_on_step_end_tensor_inputs: list[str] | None,
        max_sequence_length: int,
        sigmas: Any = None,
        always_guide: bool = False,
        **family_inputs: Any,
    ) -> tuple[int, list[str] | None, list[list[PIL.Image.Image]], str]:
        """The start of every DiasR pipeline's ``__call__``, before anything is encoded: check every argument, round
        ``num_frames`` to what the VAE makes (with a warning), normalise the subject images, resolve ``routing``
        (``"none"`` without subjects), check the subject inputs and warn about arguments the mode ignores.

        ``family_inputs`` go to the family's :meth:`check_inputs` (e.g. Wan2.2's ``guidance_scale_2``).

        Returns ``(num_frames, prompts, subjects, routing)``: the frame count used, the prompts as a list (``None``
        with ``prompt_embeds``), one list of RGB images per subject, the resolved routing mode.
        """
        self.check_inputs(
            prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
            callback_on_step_end_tensor_inputs, num_frames=num_frames, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_scale_ref=guidance_scale_ref,
            similarity_threshold=similarity_threshold, num_videos_per_prompt=num_videos_per_prompt,
            max_sequence_length=max_sequence_length, routing=routing, output_type=output_type, generator=generator,
            latents=latents, attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
            route_text=route_text, return_routing_maps=return_routing_maps, sigmas=sigmas, **family_inputs,
        )  # fmt: skip
        if num_frames % self.vae_scale_factor_temporal != 1:
            used = (num_frames - 1) // self.vae_scale_factor_temporal * self.vae_scale_factor_temporal + 1
            logger.warning(
                f"`num_frames - 1` has to be divisible by {self.vae_scale_factor_temporal}: got num_frames={num_frames}, "
                f"generating {used} frames."
            )
            num_frames = used
        prompts = [prompt] if isinstance(prompt, str) else prompt
        subjects = normalize_subject_images(subject_images)
        if not subjects and routing != "auto":
            logger.warning(f"Ignoring `routing={routing!r}`: no `subject_images`, so nothing is routed.")
        routing = self._resolve_routing(routing, subject_masks) if subjects else "none"
        self.check_subject_inputs(
            prompts, subjects, subject_phrases, subject_masks, num_frames, height, width, routing, max_sequence_length
        )
        self._warn_unused_arguments(
            routing, bool(subjects), subject_masks, similarity_threshold, guidance_scale, guidance_scale_ref,
            return_routing_maps, always_guide,
        )  # fmt: skip
        return num_frames, prompts, subjects, routing

    def step_callback(
        self, callback: Any, i: int, t: torch.Tensor, names: list[str], tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Run ``callback_on_step_end`` on the ``names`` it asked for (of ``tensors``, the step's
        ``_callback_tensor_inputs``); returns ``tensors`` with what it gave back."""
        outputs = callback(self, i, t, {k: tensors[k] for k in names})
        return {k: outputs.pop(k, v) for k, v in tensors.items()}

    def _warn_unused_arguments(
        self,
        routing: str,
        has_subjects: bool,
        subject_masks: Any,
        similarity_threshold: float,
        guidance_scale: float,
        guidance_scale_ref: float | None,
        return_routing_maps: bool,
        always_guide: bool = False,
    ) -> None:
        """Warn about arguments that the chosen mode ignores (``routing`` is resolved: ``"none"`` without subjects)."""
        unused = []
        # `subject_masks` without subjects is an error (check_subject_inputs), not a warning.
        if subject_masks is not None and has_subjects and routing != "masks":
            unused.append(f"`subject_masks` (routing={routing!r}; they are used by routing='masks')")
        if guidance_scale_ref is not None and not has_subjects:
            unused.append("`guidance_scale_ref` (no `subject_images`)")
        elif guidance_scale_ref is not None and guidance_scale <= 1.0 and not always_guide:
            unused.append("`guidance_scale_ref` (guidance is off: `guidance_scale` <= 1)")
        if similarity_threshold != 0.0 and routing != "similarity":
            unused.append(f"`similarity_threshold` (routing={routing!r}; it is used by routing='similarity')")
        if return_routing_maps and routing in ("none", "dense"):
            unused.append(f"`return_routing_maps` (routing={routing!r} routes nothing: `routing_maps` is None)")
        if unused:
            logger.warning(f"Ignoring {', '.join(unused)}.")

    def _resolve_routing(self, routing: str, subject_masks: Any) -> str:
        if routing == "auto":
            if subject_masks is not None:
                return "masks"
            return "router" if self.id_router is not None else "similarity"
        if routing not in ROUTING_MODES:
            raise ValueError(f"`routing` must be 'auto' or one of {ROUTING_MODES}, got {routing!r}")
        if routing == "router" and self.id_router is None:
            raise ValueError("`routing='router'` needs an `id_router` component; load one or use routing='similarity'")
        if routing == "masks" and subject_masks is None:
            raise ValueError("`routing='masks'` needs `subject_masks`")
        return routing

    def check_subject_inputs(
        self,
        prompts: list[str] | None,
        subjects: list[list[PIL.Image.Image]],
        subject_phrases: list[str] | None,
        subject_masks: Any,
        num_frames: int,
        height: int,
        width: int,
        routing: str,
        max_sequence_length: int = 512,
    ) -> None:
        n = len(subjects)
        if routing == "router" and n > self.max_subjects:
            raise ValueError(f"{n} subjects given but the pipeline's `id_router` supports at most {self.max_subjects}")
        if subject_phrases is not None:
            if isinstance(subject_phrases, str) or len(subject_phrases) != n:
                got = 1 if isinstance(subject_phrases, str) else len(subject_phrases)
                raise ValueError(f"`subject_phrases` must give one phrase per subject: {n} subjects, {got} phrases")
            if prompts is None:
                raise ValueError("`subject_phrases` need `prompt` (text), not only `prompt_embeds`")
            for i, phrase in enumerate(subject_phrases):
                if not isinstance(phrase, str) or not phrase.strip():
                    raise ValueError(f"`subject_phrases[{i}]` must be a non-empty string, got {phrase!r}")
            for p in prompts:
                # Tokenizing here (cheap) finds phrases past `max_sequence_length` before anything is encoded.
                self.phrase_owners(p, subject_phrases, max_sequence_length)
        if subject_masks is not None:
            if n == 0:
                raise ValueError("`subject_masks` were given without `subject_images`")
            shape = tuple(getattr(subject_masks, "shape", ()))
            if shape not in ((n, num_frames, height, width), (n, height, width)):
                raise ValueError(
                    f"`subject_masks` must have shape (N, num_frames, height, width) = {(n, num_frames, height, width)} "
                    f"or (N, height, width) = {(n, height, width)}, got {shape or type(subject_masks).__name__}"
                )
            check_layout_masks(subject_masks, "subject_masks")  # values (0/255, NaN, empty masks) before any work
        rope_frames = getattr(self.transformer.config, "rope_max_seq_len", None)  # Wan: a fixed rotary table
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        total_refs = sum(len(s) for s in subjects)
        if rope_frames is not None and latent_frames + total_refs > rope_frames:
            raise ValueError(
                f"{latent_frames} latent frames + {total_refs} reference images exceed the transformer's "
                f"rope_max_seq_len={rope_frames}"
            )

    def phrase_owners(
        self, prompt: str, phrases: list[str], max_sequence_length: int, what: str = "prompt"
    ) -> list[int]:
        """The subject owning each of the ``max_sequence_length`` positions of ``prompt_embeds`` (``-1``: general
        text); ``ValueError`` naming the subject when a phrase cannot be routed. A pipeline whose text encoder does
        not see the bare prompt (HunyuanVideo-1.5's chat template) overrides it."""
        return phrase_token_owners(prompt, phrases, self.tokenizer, max_sequence_length, what)

    def _text_routing(
        self, prompts: list[str], phrases: list[str], max_sequence_length: int, num_videos_per_prompt: int
    ) -> list[TextSegments]:
        """Per (prompt, video) sample: ``prompt_embeds`` positions reordered ``[general | phrase_0 | ...]`` and the
        phrase lengths."""
        segments = []
        for prompt in prompts:
            owner = self.phrase_owners(prompt, phrases, max_sequence_length)
            mine = [[t for t, o in enumerate(owner) if o == s] for s in range(len(phrases))]
            order = [t for t, o in enumerate(owner) if o == -1] + [t for m in mine for t in m]
            seg = TextSegments(order=torch.tensor(order, dtype=torch.long), lengths=[len(m) for m in mine])
            segments += [seg] * num_videos_per_prompt
        return segments

    def prepare_routing(
        self, images_per_subject, phrases, prompts, prompt_embeds, subject_masks, routing, route_text,
        similarity_threshold, num_videos_per_prompt, num_frames, latents, max_sequence_length,
    ) -> dict[str, Any]:  # fmt: skip
        """The :class:`SubjectRoutingState` inputs for the conditional branches of this call (also used by the
        trainer). ``images_per_subject``: how many reference frames each subject has."""
        grid = self.video_token_grid(latents)
        tokens_per_frame = grid[1] * grid[2]
        inputs: dict[str, Any] = {
            "ref_lengths": [n * tokens_per_frame for n in images_per_subject],
            "video_grid": grid,
            "mode": routing,
            "router": self.id_router if routing == "router" else None,
            "similarity_threshold": similarity_threshold,
            "text_segments": None,
            "phrase_features": None,
            "phrase_masks": None,
            "mask_buckets": None,
        }
        if phrases is not None:
            segments = self._text_routing(prompts, phrases, max_sequence_length, num_videos_per_prompt)
            if route_text:
                inputs["text_segments"] = segments
            if routing == "router":
                # Phrase features for the router's text anchors: the text encoder's output at each phrase's tokens.
                feats, masks = [], []
                for s in range(len(images_per_subject)):
                    longest = max(seg.lengths[s] for seg in segments)
                    f = prompt_embeds.new_zeros(len(segments), longest, prompt_embeds.shape[-1])
                    m = torch.zeros(len(segments), longest, dtype=torch.bool, device=prompt_embeds.device)
                    for b, seg in enumerate(segments):
                        start = len(seg.order) - sum(seg.lengths) + sum(seg.lengths[:s])
                        idx = seg.order[start : start + seg.lengths[s]].to(prompt_embeds.device)
                        f[b, : len(idx)] = prompt_embeds[b, idx]
                        m[b, : len(idx)] = True
                    feats.append(f)
                    masks.append(m)
                inputs["phrase_features"], inputs["phrase_masks"] = feats, masks
        if routing == "router":
            self.id_router.to(latents.device)
        if routing == "masks":
            masks = normalize_masks(subject_masks, "subject_masks")
            if masks.ndim == 3:  # static layout: the same mask on every frame
                masks = masks[:, None].expand(-1, num_frames, -1, -1)
            coverage = masks_to_token_grid(masks[None], transformer=self.transformer, vae=self.vae)
            labels = layout_labels(coverage)  # (1, Lv); overlaps resolved by the documented rule
            inputs["mask_buckets"] = labels.expand(latents.shape[0], -1).to(latents.device)
        return inputs

    def set_exact_sigmas(self, sigmas: list[float] | np.ndarray, device: torch.device | None = None) -> None:
        """Set the scheduler so that the sigmas it steps through are exactly ``sigmas`` (then 0).

        Flow-matching schedulers shift the sigmas given to ``set_timesteps`` (``s -> k s / (1 + (k - 1) s)``,
        ``k`` = ``shift`` or ``flow_shift``); each is therefore first mapped through the inverse,
        ``s -> s / (k - (k - 1) s)``. The result is checked, so a scheduler that remaps sigmas in another way
        (Karras / exponential / beta sigmas, ``shift_terminal``) is refused instead of silently running another
        schedule.
        """
        target = _check_sigmas(sigmas, None)
        shift = _scheduler_shift(self.scheduler)
        unshifted = target / (shift - (shift - 1.0) * target)
        self.scheduler.set_timesteps(sigmas=unshifted, device=device)  # an array: UniPC does arithmetic on it
        used = self.scheduler.sigmas[: len(target)].double().cpu().numpy()
        # float32 arithmetic in the scheduler (and UniPC's 1 - 1e-6 for a first sigma of 1) stay well inside 1e-5.
        if len(used) != len(target) or not np.allclose(used, target, rtol=0.0, atol=1e-5):
            raise ValueError(
                f"`sigmas`: the pipeline's scheduler {type(self.scheduler).__name__} remaps explicit sigmas (e.g. "
                f"Karras sigmas or shift_terminal): asked for {target.tolist()}, it would use {used.tolist()}"
            )

    def _majority_buckets(self, state: SubjectRoutingState) -> torch.Tensor | None:
        """Majority vote over the routed layers of the last forward: ``(B, Lv)`` int64, or ``None`` (dense)."""
        if not state.buckets:
            return None
        stacked = torch.stack(list(state.buckets.values()))  # (layers, B, Lv)
        votes = torch.nn.functional.one_hot(stacked + 1, state.num_subjects + 1).sum(dim=0)  # (B, Lv, N + 1)
        return votes.argmax(dim=-1) - 1

    def _routing_maps(self, state: SubjectRoutingState) -> torch.Tensor | None:
        """Majority vote over the routed layers of the last forward: ``(B, F_lat, H_tok, W_tok)`` int64."""
        buckets = self._majority_buckets(state)
        return None if buckets is None else buckets.view(-1, *state.video_grid).cpu()

    # ------------------------------------------------------------------------------------------------------------
    # Memory

    def enable_group_offload(
        self,
        onload_device: torch.device,
        offload_device: torch.device = _CPU,
        offload_type: str = "block_level",
        num_blocks_per_group: int | None = None,
        non_blocking: bool = False,
        use_stream: bool = False,
        record_stream: bool = False,
        low_cpu_mem_usage: bool = False,
        offload_to_disk_path: str | None = None,
        exclude_modules: str | list[str] | None = None,
    ) -> None:
        """:meth:`~diffusers.DiffusionPipeline.enable_group_offload`, always excluding ``_exclude_from_cpu_offload``
        (the ``id_router``), which is placed on ``onload_device``.

        Diffusers' own method offloads every component, the router included. Its hooks onload weights on a module's
        ``forward`` only, but the transformer's processors also call ``IDRouter.encode_anchors`` (not a forward), so
        on an accelerator the router's anchor weights would still sit on ``offload_device``: a device mismatch.
        """
        exclude = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules or [])
        exclude += [name for name in self._exclude_from_cpu_offload if name not in exclude]
        super().enable_group_offload(
            onload_device=onload_device,
            offload_device=offload_device,
            offload_type=offload_type,
            num_blocks_per_group=num_blocks_per_group,
            non_blocking=non_blocking,
            use_stream=use_stream,
            record_stream=record_stream,
            low_cpu_mem_usage=low_cpu_mem_usage,
            offload_to_disk_path=offload_to_disk_path,
            exclude_modules=exclude,
        )
