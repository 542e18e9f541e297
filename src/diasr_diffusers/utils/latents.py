"""VAE latents exactly as Wan pipelines normalise them: one helper for the pipeline, the data cache and training."""

from __future__ import annotations

from typing import Any

import torch


def _vae_normalization(vae: Any, z_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is None or std is None:
        return None
    if len(mean) != z_dim or len(std) != z_dim:
        raise ValueError(f"VAE config latents_mean/std have {len(mean)}/{len(std)} channels, latents have {z_dim}")
    return torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)


@torch.no_grad()
def encode_latents(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised latents of ``(B, 3, F, H, W)`` pixels in [-1, 1], as Wan pipelines compute them.

    The posterior mean is used (deterministic), then ``(z - latents_mean) / latents_std`` from the VAE config.
    """
    param = next(vae.parameters())
    z = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist.mode().float()
    norm = _vae_normalization(vae, z.shape[1])
    if norm is not None:
        mean, std = (t.to(z.device) for t in norm)
        z = (z - mean) / std
    return z
