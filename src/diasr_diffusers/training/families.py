"""What the trainer needs to know about each model family: its diffusion objective (how ``x0`` is noised, the
transformer's timestep, the regression target), its toy model (``tiny_model``) and its checkpoint checks.

The family facts themselves (pipeline and checkpoint classes, VAE strides and patch size, the toy builder, how a
``model`` folder loads) are read from the family registry, :data:`diasr_diffusers.families.FAMILIES`, whose entries
name the :class:`TrainingFamily` subclass of each family (``FamilySpec.training_family``). The rest is the
pipeline's, because a pipeline already knows its model's layout: every DiasR pipeline provides the training hooks
``encode_video_latents`` (pixels to ``(B, C, F, h, w)`` normalised latents), ``encode_training_prompt`` (``(embeds,
padding mask or None)``), ``denoiser_inputs`` (the transformer's keyword inputs for ``[video | refs]``),
``video_prediction`` (the video part of the output, back in ``(B, C, F, h, w)``) and ``experts`` / ``expert_for``
(Wan2.2 A14B's two denoisers). So the trainer holds latents in one layout for every family, and adding a family to
training is one :class:`TrainingFamily` here (its objective) named by the family's registry entry.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .config import ConfigError


class TrainingFamily:
    """Wan (the default): Wan2.1, and Wan2.2 with ``tiny_model: {wan22: a14b | ti2v}`` or a Wan2.2 ``model`` folder.
    Flow matching: ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, timestep ``1000 s``."""

    name = "wan"  # the key of this family's entry in `diasr_diffusers.families.FAMILIES`
    route_needs_align = True  # stage `route` continues an `align` run (`init_from`) unless `allow_scratch`

    @property
    def spec(self) -> Any:
        """This family's :class:`~diasr_diffusers.families.FamilySpec`."""
        from ..families import FAMILIES

        return FAMILIES[self.name]

    @property
    def pipeline_classes(self) -> tuple[str, ...]:
        """The ``model_index.json`` class names a ``model`` folder may have (stock first, then ours)."""
        return (*self.spec.stock_pipelines, self.spec.pipeline_class_name)

    @property
    def frame_multiple(self) -> int:
        """``num_frames = 1 + frame_multiple * k`` (the family's VAE temporal compression)."""
        return self.spec.token_grid()["temporal_compression"]

    @property
    def size_multiple(self) -> int:
        """Sizes are multiples of this (the family's VAE spatial compression x patch size)."""
        grid = self.spec.token_grid()
        return grid["spatial_compression"] * grid["patch_size"][1]

    def pipeline_class(self) -> type:
        return self.spec.pipeline_class()

    def tiny_builder(self) -> Any:
        return self.spec.tiny_builder()

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
        """The pipeline of a ``model`` folder (a saved DiasR pipeline or a stock one, converted as the registry
        says); the config check has already matched its class to this family."""
        from ..pipelines.loading import DiasRAutoPipeline

        return DiasRAutoPipeline.from_pretrained(folder)

    def noisy_input(
        self, pipe: Any, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noisy latents, 0-d timestep, regression target)`` at noise level ``sigma`` in ``(0, 1)``."""
        return (1 - sigma) * x0 + sigma * noise, (sigma * 1000).reshape(()), noise - x0


class _ConvertingFamily(TrainingFamily):
    """A family without Wan's ``tiny_model`` extras (``wan22``)."""

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


class CogVideoXTrainingFamily(_ConvertingFamily):
    """CogVideoX 1.0: v-prediction on its DDPM schedule (``sigma`` picks the discrete timestep
    ``round(sigma * (T - 1))``; target ``scheduler.get_velocity``, as Diffusers' CogVideoX LoRA script trains)."""

    name = "cogvideox"

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

    name = "hunyuan_video15"  # frames 4k+1, sizes multiples of 16: the real VAE's (the toy's 2x / 4x accept them)

    def tiny_parameters(self) -> set[str]:
        return super().tiny_parameters() - {"guidance_scale"}  # training never guides

    def tiny_pipeline(self, tiny_model: dict[str, Any]) -> Any:
        from ..utils.tiny import configure_tiny_hunyuan_video15

        return configure_tiny_hunyuan_video15(super().tiny_pipeline(tiny_model))


class _TrainingFamilies(Mapping):
    """``model_family`` name -> :class:`TrainingFamily`, for every entry of the family registry (the class each
    entry names, created on first use: no family registers itself when its module is imported)."""

    def __init__(self) -> None:
        self._made: dict[str, TrainingFamily] = {}

    def __getitem__(self, name: str) -> TrainingFamily:
        from ..families import FAMILIES as SPECS

        if name not in self._made:
            self._made[name] = SPECS[name].training()  # KeyError for an unknown name, as a dict
        return self._made[name]

    def __iter__(self) -> Iterator[str]:
        from ..families import FAMILIES as SPECS

        return iter(SPECS)

    def __len__(self) -> int:
        from ..families import FAMILIES as SPECS

        return len(SPECS)


FAMILIES: Mapping[str, TrainingFamily] = _TrainingFamilies()
