"""What the trainer needs to know about each model family, in one place: the pipeline it builds, its toy model
(``tiny_model``), how a ``model`` folder is loaded, and the diffusion objective (how ``x0`` is noised, the
transformer's timestep, the regression target).

The rest is the pipeline's, because a pipeline already knows its model's layout: every DiasR pipeline provides the
training hooks ``encode_video_latents`` (pixels to ``(B, C, F, h, w)`` normalised latents), ``encode_training_prompt``
(``(embeds, padding mask or None)``), ``denoiser_inputs`` (the transformer's keyword inputs for ``[video | refs]``:
Wan2.2 TI2V's per-token timesteps, LTX's packing, CogVideoX's ``(B, F, C, h, w)`` layout and rotary table),
``video_prediction`` (the video part of the output, back in ``(B, C, F, h, w)``) and ``experts`` / ``expert_for``
(Wan2.2 A14B's two denoisers). So the trainer holds latents in one layout for every family, and adding a family to
training is one :class:`TrainingFamily` here plus those hooks on its pipeline.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError


class TrainingFamily:
    """Wan (the default): Wan2.1, and Wan2.2 with ``tiny_model: {wan22: a14b | ti2v}`` or a Wan2.2 ``model`` folder.
    Flow matching: ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, timestep ``1000 s``."""

    name = "wan"
    pipeline_classes = ("WanPipeline", "DiasRPipeline")  # `model_index.json` class names of a `model` folder
    # `num_frames = 1 + frame_multiple * k`, sizes multiples of `size_multiple` (VAE compression x patch size).
    frame_multiple = 4
    size_multiple = 16
    route_needs_align = True  # stage `route` continues an `align` run (`init_from`) unless `allow_scratch`

    def pipeline_class(self) -> type:
        from ..pipelines import DiasRPipeline

        return DiasRPipeline

    def tiny_builder(self) -> Any:
        from ..utils.tiny import tiny_wan_components

        return tiny_wan_components

    def tiny_parameters(self) -> set[str]:
        """The keys ``tiny_model`` accepts."""
        return set(inspect.signature(self.tiny_builder()).parameters) | {"wan22"}

    def check_tiny_model(self, tiny_model: dict[str, Any]) -> None:
        """Family-specific ``tiny_model`` checks (``ConfigError``)."""
        from ..utils.tiny import WAN22_KINDS

        if "wan22" in tiny_model:  # a toy Wan2.2 (utils.tiny.tiny_wan22_components): its own VAE and patch size
            if tiny_model["wan22"] not in WAN22_KINDS:
                raise ConfigError(f"`tiny_model.wan22` must be one of {WAN22_KINDS}, got {tiny_model['wan22']!r}")
            fixed = sorted(k for k in ("vae", "patch_size") if k in tiny_model)
            if fixed:
                raise ConfigError(f"`tiny_model.wan22` fixes {fixed}; remove them")

    def tiny_components(self, tiny_model: dict[str, Any]) -> dict[str, Any]:
        """The pipeline components of the toy model ``tiny_model`` describes."""
        if "wan22" in tiny_model:
            from ..utils.tiny import tiny_wan22_components

            kwargs = {k: v for k, v in tiny_model.items() if k != "wan22"}
            return tiny_wan22_components(tiny_model["wan22"], **kwargs)
        return self.tiny_builder()(**tiny_model)

    def tiny_pipeline(self, tiny_model: dict[str, Any]) -> Any:
        """The toy pipeline ``tiny_model`` describes."""
        return self.pipeline_class()(**self.tiny_components(tiny_model))

    def trainer_class(self) -> type:
        """The trainer ``diasr train`` builds for this family."""
        from .trainer import DiasRTrainer

        return DiasRTrainer

    def load(self, folder: str) -> Any:
        from ..commands.generate import load_pipeline

        return load_pipeline(folder)

    def noisy_input(
        self, pipe: Any, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noisy latents, 0-d timestep, regression target)`` at noise level ``sigma`` in ``(0, 1)``."""
        return (1 - sigma) * x0 + sigma * noise, (sigma * 1000).reshape(()), noise - x0


class _ConvertingFamily(TrainingFamily):
    """A family whose ``model`` folder is either a saved DiasR pipeline or a stock one converted by
    ``from_<family>`` (``from_ltx``, ``from_cogvideox``)."""

    def load(self, folder: str) -> Any:
        cls = self.pipeline_class()
        index = json.loads((Path(folder) / "model_index.json").read_text())
        if index.get("_class_name") == cls.__name__:
            return cls.from_pretrained(folder)
        return getattr(cls, f"from_{self.name}")(folder)

    def tiny_parameters(self) -> set[str]:
        return set(inspect.signature(self.tiny_builder()).parameters)

    def check_tiny_model(self, tiny_model: dict[str, Any]) -> None:
        return None

    def tiny_components(self, tiny_model: dict[str, Any]) -> dict[str, Any]:
        return self.tiny_builder()(**tiny_model)


class LTXTrainingFamily(_ConvertingFamily):
    """LTX-Video: flow matching as Wan (its scheduler is ``FlowMatchEulerDiscreteScheduler``); the pipeline packs the
    latents into tokens, gives the reference tokens timestep 0 and masks padded prompt tokens."""

    name = "ltx"
    pipeline_classes = ("LTXPipeline", "DiasRLTXPipeline")
    frame_multiple = 8
    size_multiple = 32

    def pipeline_class(self) -> type:
        from ..pipelines import DiasRLTXPipeline

        return DiasRLTXPipeline

    def tiny_builder(self) -> Any:
        from ..utils.tiny import tiny_ltx_components

        return tiny_ltx_components


class CogVideoXTrainingFamily(_ConvertingFamily):
    """CogVideoX 1.0: v-prediction on its DDPM schedule (``sigma`` picks the discrete timestep
    ``round(sigma * (T - 1))``; target ``scheduler.get_velocity``, as Diffusers' CogVideoX LoRA script trains)."""

    name = "cogvideox"
    pipeline_classes = ("CogVideoXPipeline", "DiasRCogVideoXPipeline")

    def pipeline_class(self) -> type:
        from ..pipelines import DiasRCogVideoXPipeline

        return DiasRCogVideoXPipeline

    def tiny_builder(self) -> Any:
        from ..utils.tiny import tiny_cogvideox_components

        return tiny_cogvideox_components

    def noisy_input(self, pipe, x0, noise, sigma):
        scheduler = pipe.scheduler
        steps = scheduler.config.num_train_timesteps
        t = (sigma.reshape(()).float() * (steps - 1)).round().long().clamp(0, steps - 1)
        return scheduler.add_noise(x0, noise, t), t, scheduler.get_velocity(x0, noise, t)


class HunyuanVideo15TrainingFamily(_ConvertingFamily):
    """HunyuanVideo-1.5 text-to-video: flow matching as Wan (``FlowMatchEulerDiscreteScheduler``; the timestep
    ``1000 s`` is shared by the reference frames). The pipeline builds the ``[x_t | cond | mask]`` frames (zeros for
    the video, ``[x0_ref | x0_ref | 1]`` for references), the Qwen + ByT5 text and zero image embeddings. A ``model``
    folder is a stock ``HunyuanVideo15Pipeline`` or a saved ``DiasRHunyuanVideo15Pipeline`` (both load with
    ``from_pretrained``); the toy is ``tiny_hunyuan_video15_components`` with its text lengths set
    (``configure_tiny_hunyuan_video15``)."""

    name = "hunyuan_video15"
    pipeline_classes = ("HunyuanVideo15Pipeline", "DiasRHunyuanVideo15Pipeline")
    # The real VAE: 4x temporal, 16x spatial, patch 1 (the toy's 2x / 4x accept these sizes too).
    frame_multiple = 4
    size_multiple = 16

    def pipeline_class(self) -> type:
        from ..pipelines import DiasRHunyuanVideo15Pipeline

        return DiasRHunyuanVideo15Pipeline

    def tiny_builder(self) -> Any:
        from ..utils.tiny import tiny_hunyuan_video15_components

        return tiny_hunyuan_video15_components

    def tiny_parameters(self) -> set[str]:
        return super().tiny_parameters() - {"guidance_scale"}  # training never guides

    def tiny_pipeline(self, tiny_model: dict[str, Any]) -> Any:
        from ..utils.tiny import configure_tiny_hunyuan_video15

        return configure_tiny_hunyuan_video15(super().tiny_pipeline(tiny_model))

    def load(self, folder: str) -> Any:
        return self.pipeline_class().from_pretrained(folder)  # a stock folder loads as is (no `from_...` needed)


FAMILIES: dict[str, TrainingFamily] = {
    "wan": TrainingFamily(),
    "ltx": LTXTrainingFamily(),
    "cogvideox": CogVideoXTrainingFamily(),
    "hunyuan_video15": HunyuanVideo15TrainingFamily(),
}
# `model_family: ingredients` is registered by training/ingredients.py (imported with this package).
