"""What the trainer needs to know about each model family: its pipeline, latent layout, diffusion objective and
transformer call. Adding a family to training is one :class:`TrainingFamily` here (its processor and pipeline live
in ``processors/`` and ``pipelines/``).
"""

from __future__ import annotations

from typing import Any

import torch


class TrainingFamily:
    """Wan2.1 (the default): latents ``(B, C, F, h, w)``, flow matching (``x_t = (1 - s) x0 + s noise``, target
    ``noise - x0``, timestep ``1000 s``), ``transformer(hidden, timestep, text)``."""

    name = "wan"
    frame_dim = 2  # the axis reference frames are appended on
    pipeline_classes = ("WanPipeline", "DiasRPipeline")  # `model_index.json` class names of a `model` folder

    def pipeline_class(self) -> type:
        from ..pipelines import DiasRPipeline

        return DiasRPipeline

    def tiny_components(self) -> Any:
        from ..utils.tiny import tiny_wan_components

        return tiny_wan_components

    def load(self, folder: str) -> Any:
        from ..commands.generate import load_pipeline

        return load_pipeline(folder)

    def to_model_layout(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, h, w)`` VAE latents in the layout the transformer takes."""
        return latents

    def prompt(self, text: str) -> str:
        """The caption as it is given to ``encode_prompt`` (Wan's cleans it itself)."""
        return text

    def noisy_input(
        self, pipe: Any, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noisy latents, timestep (1,), regression target)`` at noise level ``sigma`` in ``(0, 1)``."""
        return (1 - sigma) * x0 + sigma * noise, (sigma * 1000).reshape(1), noise - x0

    def forward(self, pipe: Any, transformer: Any, hidden: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor):
        return transformer(hidden, timestep, text, return_dict=False)[0]


class CogVideoXTrainingFamily(TrainingFamily):
    """CogVideoX 1.0: latents ``(B, F, C, h, w)``, v-prediction on its DDPM schedule (``sigma`` picks the discrete
    timestep ``round(sigma * (T - 1))``; target ``scheduler.get_velocity``, as Diffusers' CogVideoX LoRA script
    trains), rotary embeddings over video + reference frames, the caption cleaned as the phrase matcher reads it."""

    name = "cogvideox"
    frame_dim = 1
    pipeline_classes = ("CogVideoXPipeline", "DiasRCogVideoXPipeline")

    def pipeline_class(self) -> type:
        from ..pipelines import DiasRCogVideoXPipeline

        return DiasRCogVideoXPipeline

    def tiny_components(self) -> Any:
        from ..utils.tiny import tiny_cogvideox_components

        return tiny_cogvideox_components

    def load(self, folder: str) -> Any:
        import json
        from pathlib import Path

        cls = self.pipeline_class()
        index = json.loads((Path(folder) / "model_index.json").read_text())
        if index.get("_class_name") == cls.__name__:
            return cls.from_pretrained(folder)
        return cls.from_cogvideox(folder)

    def to_model_layout(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.transpose(1, 2)

    def prompt(self, text: str) -> str:
        from ..routing.phrases import clean_prompt

        return clean_prompt(text)

    def noisy_input(self, pipe, x0, noise, sigma):
        scheduler = pipe.scheduler
        steps = scheduler.config.num_train_timesteps
        t = (sigma.reshape(1).float() * (steps - 1)).round().long().clamp(0, steps - 1)
        return scheduler.add_noise(x0, noise, t), t, scheduler.get_velocity(x0, noise, t)

    def forward(self, pipe, transformer, hidden, timestep, text):
        s = pipe.vae_scale_factor_spatial
        rotary = pipe.rotary_embeddings(hidden.shape[-2] * s, hidden.shape[-1] * s, hidden.shape[1], hidden.device)
        return transformer(
            hidden_states=hidden, encoder_hidden_states=text, timestep=timestep, image_rotary_emb=rotary,
            return_dict=False,
        )[0]  # fmt: skip


FAMILIES: dict[str, TrainingFamily] = {"wan": TrainingFamily(), "cogvideox": CogVideoXTrainingFamily()}
