"""Subject handling shared by every DiasR pipeline (Wan, CogVideoX, ...): argument checks, routing resolution,
text routing over the subject phrases, the routing-state inputs of a call, the denoising loop, routing maps, loading
with a router.

:class:`SubjectPipelineMixin` goes first in a pipeline's bases (``class DiasRPipeline(SubjectPipelineMixin,
WanPipeline)``). A family's pipeline sets :attr:`~SubjectPipelineMixin._processor_class` and
:attr:`~SubjectPipelineMixin._transformer_class`, and says only how references enter
(:meth:`~SubjectPipelineMixin.encode_references`), what the transformer receives
(:meth:`~SubjectPipelineMixin.transformer_inputs`) and which part of its output is the video
(:meth:`~SubjectPipelineMixin.video_output`); :meth:`~SubjectPipelineMixin.denoise` is the one loop (dense and routed
branches, three-way guidance, Wan2.2's expert switch, callbacks, routing maps). It overrides
:meth:`~SubjectPipelineMixin.latents_shape` if the ``latents`` argument of its ``__call__`` is not laid out
``(B, C, F, h, w)``. The shared code itself (routing inputs, token grid, the trainer) reads latents in the VAE's
``(B, C, F, h, w)`` layout: CogVideoX hands them over transposed, LTX unpacked. A pipeline with several denoisers
(Wan2.2 A14B's two experts) overrides :attr:`~SubjectPipelineMixin.experts` /
:meth:`~SubjectPipelineMixin.expert_for` and lists their folders in ``_transformer_folders``; processors are
installed on every expert, all sharing one routing state (and one ``id_router``). What the trainer calls is
:class:`SubjectTrainingHooks`.
"""

from __future__ import annotations

import inspect
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput, logging
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download

from ..families import family_for_pipeline
from ..processors import ROUTING_MODES, RoutedAttnProcessorBase, SubjectRoutingState, TextSegments
from ..processors.core import set_subject_sparse_attn_processor
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


@dataclass
class DenoiseCall:
    r"""What :meth:`SubjectPipelineMixin.denoise` needs of one call besides the latents and timesteps.

    Args:
        prompt: the transformer's text inputs of the conditional branch (``{"encoder_hidden_states": ..., ...}``).
        negative: the same for the negative branch; ``None``: no guidance.
        references: the reference input in the family's layout (:meth:`~SubjectPipelineMixin.encode_references`),
            one per video; ``None``: no subjects (the stock pipeline's loop).
        num_ref_frames: how many frames ``references`` adds to the video's frame axis.
        routing_inputs: the :class:`SubjectRoutingState` inputs (:meth:`~SubjectPipelineMixin.prepare_routing`).
        guidance_scale_ref: three-way guidance's reference scale; ``None``: two-way guidance.
        return_routing_maps: record the routing of the last step.
        zero_negative_references: the negative branch keeps the references as zeros (Phantom, SkyReels).
        attention_kwargs: passed to every transformer call.
        inputs: the family's own per-call values (rotary tables, condition latents, ...).
    """

    prompt: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor] | None = None
    references: torch.Tensor | None = None
    num_ref_frames: int = 0
    routing_inputs: dict[str, Any] | None = None
    guidance_scale_ref: float | None = None
    return_routing_maps: bool = False
    zero_negative_references: bool = False
    attention_kwargs: dict[str, Any] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class SubjectTrainingHooks(Protocol):
    r"""What :class:`~diasr_diffusers.training.DiasRTrainer` calls on a pipeline (every DiasR pipeline provides it).

    The trainer holds latents in the VAE's ``(B, C, F, h, w)`` layout for every family; the pipeline translates:
    """

    routing_state: SubjectRoutingState

    @property
    def experts(self) -> list[Any]:
        """The transformers the pipeline runs (Wan2.2 A14B: two)."""

    def expert_for(self, t: torch.Tensor) -> tuple[Any, bool]:
        """The expert denoising timestep ``t`` and whether it is the low-noise one."""

    def encode_video_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, h, w)`` latents of ``(B, 3, F, H, W)`` pixels in [-1, 1]."""

    def encode_training_prompt(self, caption: str, max_sequence_length: int, device: torch.device) -> tuple[Any, Any]:
        """``(prompt_embeds, the other text inputs or None)`` of one caption, as the denoiser reads them."""

    def prepare_routing(self, **kwargs: Any) -> dict[str, Any]:
        """The :class:`SubjectRoutingState` inputs (keyword arguments: see the mixin's method)."""

    def drop_padding_tokens(self, segments: list[TextSegments], text: Any) -> list[TextSegments]:
        """Text routing segments mapped onto what the transformer reads (padding dropped, text reordered)."""

    def video_token_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """``(F, H, W)`` video tokens of ``(B, C, F, h, w)`` latents."""

    def denoiser_inputs(
        self, noisy: torch.Tensor, refs: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: Any
    ) -> dict[str, Any]:
        """The transformer's keyword inputs for ``[video | refs]`` (both ``(B, C, *, h, w)``) at timestep ``t``."""

    def video_prediction(self, pred: torch.Tensor, video_shape: torch.Size) -> torch.Tensor:
        """The video part ``(B, C, F, h, w)`` of the transformer's output for :meth:`denoiser_inputs`."""


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

    _transformer_class: type
    # The folders of a saved pipeline holding a `_transformer_class` (checked against their weights on loading).
    _transformer_folders: tuple[str, ...] = ("transformer",)

    @property
    def _processor_class(self) -> type[RoutedAttnProcessorBase]:
        """This family's attention-processor adapter, read from its :data:`~diasr_diffusers.families.FAMILIES` entry."""
        return family_for_pipeline(type(self)).processor_class()

    @property
    def _processor_prefix(self) -> str | None:
        """Module-name prefix of the attention modules to route (the family's entry); ``None``: all."""
        return family_for_pipeline(type(self)).processor_prefix

    @property
    def max_subjects(self) -> int | None:
        """The most subjects per call: the router's limit, or ``None`` (no limit) with the similarity router."""
        return self.id_router.config.max_subjects if self.id_router is not None else None

    @property
    def denoiser(self) -> Any:
        """The first transformer this pipeline runs (Wan2.2 with only the low-noise expert: ``transformer_2``)."""
        return self.experts[0]

    @staticmethod
    def load_id_router(id_router: IDRouter | str | os.PathLike | None, **kwargs: Any) -> IDRouter | None:
        """``id_router`` as an :class:`IDRouter`: an object as is, a folder or Hub id loaded with the Hub options of
        ``kwargs`` (``cache_dir``, ``token``, ``revision``, ``local_files_only``, ``force_download``)."""
        if id_router is None or isinstance(id_router, IDRouter):
            return id_router
        if not isinstance(id_router, (str, os.PathLike)):
            raise TypeError(
                f"`id_router` must be an IDRouter, a local folder or a Hub id, got {type(id_router).__name__}"
            )
        hub_kwargs = ("cache_dir", "token", "revision", "local_files_only", "force_download")
        return IDRouter.from_pretrained(id_router, **{k: kwargs[k] for k in hub_kwargs if k in kwargs})

    def rotary_limits(self) -> tuple[int | None, int | None, int | None]:
        """The most ``(frames, height, width)`` tokens the transformer's position table covers (``None``: computed
        for any size). A family with a fixed rotary table (Wan's ``rope_max_seq_len``) overrides it."""
        return None, None, None

    @property
    def experts(self) -> list[Any]:
        """The transformers this pipeline runs (``[transformer]``; Wan2.2 A14B: both experts)."""
        return [self.transformer] if self.transformer is not None else []

    def expert_for(self, t: torch.Tensor) -> tuple[Any, bool]:
        """The transformer that denoises timestep ``t``, and whether it is a low-noise second expert."""
        return self.transformer, False

    def _install_processors(self) -> None:
        # The one installer (it picks the adapter and prefix from the family registry, and refuses a transformer of
        # another family); skipped where this state's processors are already in place.
        spec = family_for_pipeline(type(self))
        processor_class, prefix = spec.processor_class(), spec.processor_prefix
        for expert in self.experts:
            procs = [p for name, p in expert.attn_processors.items() if prefix is None or name.startswith(prefix)]
            if not all(isinstance(p, processor_class) and p.state is self.routing_state for p in procs):
                set_subject_sparse_attn_processor(expert, self.routing_state, family=spec.name)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Any = None) -> None:
        """Diffusers' switch behind ``enable_xformers_memory_efficient_attention()`` (its checks, and every other
        component as Diffusers treats it), except that the transformers keep their processors, routed ones included,
        with Diffusers' xFormers attention backend on each that takes one (disabling resets it to the default).
        Diffusers would swap a legacy ``Attention``'s processor for ``XFormersAttnProcessor``, dropping routing and
        breaking joint attention (CogVideoX) and HunyuanVideo 1.5's token refiner (4-D mask). Routed attention then
        runs ``bucketed_attention(..., backend="xformers")`` (see ``SubjectRoutingState.op_backend``).
        ``attention_op`` only reaches the other components (Diffusers' attention backends take no op)."""
        from diffusers.models.attention_dispatch import AttentionBackendName

        saved = [(expert, expert.attn_processors) for expert in self.experts]
        super().set_use_memory_efficient_attention_xformers(valid, attention_op)
        for expert, processors in saved:
            expert.set_attn_processor(dict(processors))  # (it empties the dict it is given)
            for processor in processors.values():
                if valid and hasattr(processor, "_attention_backend"):
                    processor._attention_backend = AttentionBackendName.XFORMERS
                elif not valid and getattr(processor, "_attention_backend", None) == AttentionBackendName.XFORMERS:
                    processor._attention_backend = None

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
        cls.check_transformer_folders(folder, **kwargs)
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def check_transformer_folders(cls, folder: str | os.PathLike, **kwargs: Any) -> None:
        """Check the untrusted ``config.json`` of each transformer folder of a local pipeline ``folder`` (stock or
        DiasR) against its weights before anything loads, unless ``kwargs`` (``from_pretrained``'s) pass that
        component as an object."""
        if not os.path.isdir(folder):
            return
        for name in cls._transformer_folders:
            if kwargs.get(name) is None and os.path.isdir(os.path.join(folder, name)):
                check_block_model_folder(cls._transformer_class, os.path.join(folder, name), kwargs.get("variant"))

    def video_token_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """``(F, H, W)`` of the transformer's video tokens for ``latents`` laid out ``(B, C, F, h, w)``."""
        _, _, f, h, w = latents.shape
        pt, ph, pw = token_grid_factors(self.denoiser)["patch_size"]
        return f // pt, h // ph, w // pw

    def latents_shape(self, num_videos: int, num_frames: int, height: int, width: int) -> tuple[tuple[int, ...], str]:
        """The shape the ``latents`` argument must have, and its layout in words (for the error message)."""
        s = self.vae_scale_factor_spatial
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        shape = (num_videos, self.denoiser.config.in_channels, latent_frames, height // s, width // s)
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
        patch = token_grid_factors(self.denoiser)["patch_size"][1]
        multiple = self.vae_scale_factor_spatial * patch
        if height % multiple != 0 or width % multiple != 0:
            raise ValueError(
                f"`height` and `width` have to be divisible by {multiple} (the VAE's {self.vae_scale_factor_spatial}x "
                f"downsampling times the transformer's patch size {patch}) "
                f"but are {height} and {width}."
            )
        _check_int("num_frames", num_frames, 1)
        self.check_rotary_limits(num_frames, height, width)
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
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
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
        text_dim = IDRouter.host_sizes(self.denoiser)["text_dim"]
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

    def check_rotary_limits(self, num_frames: int, height: int, width: int) -> None:
        """``ValueError`` naming the argument when the video's token grid is past the transformer's rotary table
        (:meth:`rotary_limits`), instead of a shape error deep in the first forward."""
        s, t = self.vae_scale_factor_spatial, self.vae_scale_factor_temporal
        pt, ph, pw = token_grid_factors(self.denoiser)["patch_size"]
        grid = (((num_frames - 1) // t + 1) // pt, height // s // ph, width // s // pw)
        for name, value, tokens, limit in zip(("num_frames", "height", "width"), (num_frames, height, width), grid,
                                              self.rotary_limits()):  # fmt: skip
            if limit is not None and tokens > limit:
                raise ValueError(
                    f"`{name}`={value} gives {tokens} tokens along that axis, past the {limit} positions of the "
                    f"transformer's rotary table (rope_max_seq_len={limit}); use a smaller `{name}`"
                )

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
        # (stock Wan tests `num_frames % f != 1`, which also warns for a VAE without temporal compression)
        if (num_frames - 1) % self.vae_scale_factor_temporal:
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

    # ------------------------------------------------------------------------------------------------------------
    # The denoising loop, shared by every family. A family says what its transformer receives
    # (:meth:`transformer_inputs`), which part of its output is the video (:meth:`video_output`) and, where its
    # scheduler needs more than ``step(noise_pred, t, latents)``, how it steps (:meth:`scheduler_step`).

    # Families whose stock pipeline runs the negative and positive branches as one batch ([negative | positive]:
    # CogVideoX, LTX) set this: their subject-free calls stay bit-identical to stock, and `callback_on_step_end` gets
    # both guidance rows of `prompt_embeds`, as the stock pipeline passes them.
    _batch_guidance: bool = False
    # The frame axis of `encode_references`' output (CogVideoX: 1, its latents are (B, F, C, h, w)).
    _reference_frame_dim: int = 2
    _guidance_scale_2: float | None = None
    _guidance_rescale: float = 0.0

    def transformer_inputs(
        self, call: DenoiseCall, latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
        references: torch.Tensor | None,
    ) -> dict[str, Any]:  # fmt: skip
        """The transformer's keyword inputs (without ``attention_kwargs`` / ``return_dict``) for ``latents`` (this
        pipeline's layout, any batch) at timestep ``t``, with the text inputs ``text`` and, when not ``None``, the
        reference input ``references`` (:meth:`encode_references`'s layout, same batch) appended to the video."""
        raise NotImplementedError(f"{type(self).__name__} must define `transformer_inputs`")

    def video_output(self, call: DenoiseCall, pred: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The video part of the transformer's output ``pred`` (reference positions dropped), shaped as ``latents``
        and in the dtype the stock pipeline guides in."""
        raise NotImplementedError(f"{type(self).__name__} must define `video_output`")

    def scheduler_step(
        self, call: DenoiseCall, noise_pred: torch.Tensor, t: torch.Tensor, i: int, latents: torch.Tensor
    ) -> torch.Tensor:
        """One scheduler step (the stock pipelines' ``scheduler.step(noise_pred, t, latents)``)."""
        return self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    def step_guidance(self, call: DenoiseCall, i: int, t: torch.Tensor, low_noise: bool) -> float | None:
        """The text guidance scale of step ``i``, or ``None`` when the step runs no negative branch. Read from
        ``self._guidance_scale`` at every step, so a ``callback_on_step_end`` changing it takes effect (as Diffusers'
        ``test_callback_cfg`` expects); Wan2.2's low-noise expert reads ``self._guidance_scale_2``."""
        if call.negative is None:
            return None
        if low_noise and self._guidance_scale_2 is not None:
            return self._guidance_scale_2
        return self._guidance_scale

    def combine_guidance(
        self, call: DenoiseCall, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None,
        guidance_scale: float | None,
    ) -> torch.Tensor:  # fmt: skip
        """Classifier-free guidance of the two branches, with ``guidance_rescale`` (the stock pipelines' arithmetic,
        which is Diffusers' ``ClassifierFreeGuidance.forward``). A family with a guider component overrides it."""
        if pred_uncond is None:
            return pred_cond
        pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        if self._guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, guidance_rescale=self._guidance_rescale)
        return pred

    def cache_context_kwargs(self, i: int) -> dict[str, Any]:
        """Where the loop is, for Diffusers' cache hooks (``transformer.cache_context(name, **kwargs)``)."""
        kwargs: dict[str, Any] = {"step_index": i, "num_inference_steps": self._num_timesteps}
        sigmas = getattr(self.scheduler, "sigmas", None)  # DDIM-style schedulers have none
        if sigmas is not None and i < len(sigmas):
            kwargs["sigma"] = float(sigmas[i])
        return kwargs

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        num_inference_steps: int,
        call: DenoiseCall,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The denoising loop of every DiasR pipeline: returns ``(latents, routing_maps)``.

        Per step: the conditional branch (with the references, routed, when ``call.references`` is given), the
        negative branch without references (every video token would be routed to null: exactly video-only
        attention) or, with ``call.zero_negative_references`` (Phantom, SkyReels), with zero references routed as
        the conditional branch was, the reference-only branch for three-way guidance (``call.guidance_scale_ref``),
        the expert of the step (Wan2.2), the scheduler step, ``callback_on_step_end``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        refs = call.references
        guide = call.negative is not None
        batched = self._batch_guidance and guide
        three_way = refs is not None and guide and call.guidance_scale_ref is not None
        state = self.routing_state
        self._install_processors()
        self._num_timesteps = len(timesteps)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        routing_maps = None
        prompt, negative = call.prompt, call.negative

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                model, low_noise = self.expert_for(t)
                scale = self.step_guidance(call, i, t, low_noise)
                cache = self.cache_context_kwargs(i)

                def run(name, hidden, text, references, model=model, t=t, cache=cache):
                    inputs = self.transformer_inputs(call, hidden, t, text, references)
                    with model.cache_context(name, **cache):
                        pred = model(**inputs, attention_kwargs=call.attention_kwargs, return_dict=False)[0]
                    return self.video_output(call, pred, hidden)

                pred_uncond = None
                if refs is None and batched and scale is not None:
                    # Exactly the stock step: negative and positive in one batch.
                    both = {k: torch.cat([negative[k], prompt[k]]) for k in prompt}
                    pred_uncond, pred_cond = run("cond_uncond", torch.cat([latents] * 2), both, None).chunk(2)
                elif refs is None:
                    pred_cond = run("cond", latents, prompt, None)
                    if scale is not None:
                        pred_uncond = run("uncond", latents, negative, None)
                else:
                    record = call.return_routing_maps and i == len(timesteps) - 1
                    with state.activate(**call.routing_inputs, record=record):
                        pred_cond = run("cond", latents, prompt, refs)
                        if record:
                            routing_maps = self._routing_maps(state)
                        cond_buckets = self._majority_buckets(state)
                    unrouted = {"text_segments": None, "phrase_features": None, "phrase_masks": None}
                    if scale is not None and call.zero_negative_references:
                        # The reference frames stay, as zeros; each video token sees the zero frames of the subject
                        # it was routed to in this step's conditional pass, so the negative differs from the
                        # positive only in content. The negative prompt has no phrases: text is not routed.
                        inputs = {**call.routing_inputs, **unrouted}
                        if inputs["mode"] != "dense":
                            inputs.update(mode="masks", mask_buckets=cond_buckets, router=None)
                        with state.activate(**inputs):
                            pred_uncond = run("uncond", latents, negative, torch.zeros_like(refs))
                    elif scale is not None:
                        pred_uncond = run("uncond", latents, negative, None)
                    if scale is not None and three_way:
                        with state.activate(**{**call.routing_inputs, **unrouted}):
                            pred_ref = run("ref", latents, negative, refs)
                if scale is not None and three_way:
                    noise_pred = (
                        pred_uncond
                        + call.guidance_scale_ref * (pred_ref - pred_uncond)
                        + scale * (pred_cond - pred_ref)
                    )
                else:
                    noise_pred = self.combine_guidance(call, pred_cond, pred_uncond, scale)

                latents = self.scheduler_step(call, noise_pred, t, i, latents)

                if callback_on_step_end is not None:
                    latents, prompt, negative = self._step_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs or [], i, t, latents, prompt,
                        negative, batched,
                    )  # fmt: skip
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None
        return latents, routing_maps

    def _step_callback(
        self, callback: Any, names: list[str], i: int, t: torch.Tensor, latents: torch.Tensor,
        prompt: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None, batched: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:  # fmt: skip
        """Run ``callback_on_step_end`` on the tensors it asked for, as the stock pipelines do (``prompt_embeds``
        holds both guidance rows ``[negative | positive]`` where the stock pipeline batches them), and take back
        what it returns."""
        key = "encoder_hidden_states"
        tensors = {
            "latents": latents,
            "prompt_embeds": torch.cat([negative[key], prompt[key]]) if batched else prompt[key],
            "negative_prompt_embeds": None if negative is None else negative[key],
        }
        outputs = callback(self, i, t, {k: tensors[k] for k in names})
        if not isinstance(outputs, dict):
            # Diffusers fails here with "'NoneType' object has no attribute 'pop'".
            raise TypeError(
                "`callback_on_step_end` must return a dict of tensors (the `callback_kwargs` it was given, possibly "
                f"changed), got {type(outputs).__name__}"
            )
        latents = outputs.get("latents", latents)
        if negative is not None and "negative_prompt_embeds" in outputs:
            negative = {**negative, key: outputs["negative_prompt_embeds"]}
        if "prompt_embeds" in outputs:
            embeds = outputs["prompt_embeds"]
            if batched:
                negative_embeds, embeds = embeds.chunk(2)
                negative = {**negative, key: negative_embeds}
            prompt = {**prompt, key: embeds}
        return latents, prompt, negative

    def drop_padding_tokens(self, segments: list[TextSegments], text: Any) -> list[TextSegments]:
        """Map text routing segments (over ``prompt_embeds`` positions) onto the text the transformer reads, given
        the other text inputs ``text`` (a padding mask, ...). Default: unchanged (Wan and CogVideoX attend to every
        position)."""
        return segments

    def prepare_references(
        self,
        subjects: list[list[PIL.Image.Image]],
        *,
        subject_phrases: list[str] | None,
        prompts: list[str] | None,
        prompt: dict[str, torch.Tensor],
        video_latents: torch.Tensor,
        routing: str,
        route_text: bool,
        subject_masks: Any,
        similarity_threshold: float,
        num_videos_per_prompt: int,
        num_frames: int,
        max_sequence_length: int,
        height: int,
        width: int,
        device: torch.device,
        dtype: torch.dtype,
        text: Any = None,
        **encode_kwargs: Any,
    ) -> tuple[torch.Tensor, int, dict[str, Any]]:
        """The reference input (family layout, one per video), its frame count and the routing inputs of a call.
        ``video_latents``: the video latents in the VAE's ``(B, C, F, h, w)`` layout; ``prompt``: the conditional
        branch's text inputs; ``text``: what :meth:`drop_padding_tokens` needs (default: ``prompt``)."""
        embeds = prompt["encoder_hidden_states"]
        routing_inputs = self.prepare_routing(
            images_per_subject=[len(images) for images in subjects], phrases=subject_phrases, prompts=prompts,
            prompt_embeds=embeds, latents=video_latents, num_frames=num_frames,
            max_sequence_length=max_sequence_length, routing=routing, route_text=route_text,
            subject_masks=subject_masks, similarity_threshold=similarity_threshold,
            num_videos_per_prompt=num_videos_per_prompt,
        )  # fmt: skip
        if routing_inputs["text_segments"] is not None:
            routing_inputs["text_segments"] = self.drop_padding_tokens(
                routing_inputs["text_segments"], prompt if text is None else text
            )
        references = self.encode_references(subjects, height, width, device, dtype, **encode_kwargs)
        references = references.expand(video_latents.shape[0], *references.shape[1:])
        return references, references.shape[self._reference_frame_dim], routing_inputs

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
        rope_frames = self.rotary_limits()[0]
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        total_refs = sum(len(s) for s in subjects)
        if subjects and rope_frames is not None and latent_frames + total_refs > rope_frames:
            raise ValueError(
                f"{latent_frames} latent frames + {total_refs} reference images exceed the {rope_frames} frame "
                f"positions of the transformer's rotary table (rope_max_seq_len={rope_frames})"
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
        self,
        *,
        images_per_subject: list[int],
        phrases: list[str] | None,
        prompts: list[str] | None,
        prompt_embeds: torch.Tensor,
        latents: torch.Tensor,
        num_frames: int,
        max_sequence_length: int,
        routing: str = "router",
        route_text: bool = True,
        subject_masks: Any = None,
        similarity_threshold: float = 0.0,
        num_videos_per_prompt: int = 1,
    ) -> dict[str, Any]:
        """The :class:`SubjectRoutingState` inputs for the conditional branches of a call (also the trainer's).

        Args:
            images_per_subject: how many reference frames each subject has.
            phrases: the subject phrases (``None``: no text routing, no router text anchors).
            prompts: the prompts the phrases are found in (one per prompt of the batch).
            prompt_embeds: ``(videos, tokens, D)``, the text encoder's output (the router's phrase features).
            latents: the video latents in the VAE's ``(B, C, F, h, w)`` layout (the token grid).
            num_frames: the video's pixel frames (a static ``subject_masks`` is repeated over them).
            max_sequence_length: the text length ``prompt_embeds`` was encoded to.
            routing: a resolved routing mode (``"router"``, ``"similarity"``, ``"masks"``, ``"dense"``).
            route_text: route text cross-attention over the phrases.
            subject_masks: the pixel masks of ``routing="masks"``.
            similarity_threshold: the similarity router's null threshold.
            num_videos_per_prompt: videos per prompt (the text segments are repeated for them).

        The result's ``text_segments`` index ``prompt_embeds`` positions; :meth:`drop_padding_tokens` maps them
        onto what the transformer reads.
        """
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
            coverage = masks_to_token_grid(masks[None], transformer=self.denoiser, vae=self.vae)
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
