"""VAE latents exactly as Diffusers pipelines normalise them (Wan: ``latents_mean/std``; CogVideoX: ``scaling_factor``):
one helper for the pipelines, the data cache and training."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import get_module_execution_device


def _vae_normalization(vae: Any, z_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is None or std is None:
        return None
    if len(mean) != z_dim or len(std) != z_dim:
        raise ValueError(f"VAE config latents_mean/std have {len(mean)}/{len(std)} channels, latents have {z_dim}")
    return torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)


def _posterior_mode(
    vae: Any,
    pixels: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sample: bool = False,
) -> torch.Tensor:
    """Un-normalised float32 latents (the posterior mean, or a sample drawn with ``generator``) of
    ``(B, 3, F, H, W)`` pixels, on the VAE's device."""
    # Not the weights' device and dtype: under offloading the weights sit on the CPU or on "meta" until the VAE's
    # hooks move them, and under layerwise casting they are stored in FP8. The inputs must match where and in which
    # dtype the VAE computes.
    pixels = pixels.to(device=get_module_execution_device(vae), dtype=vae.dtype)
    dist = vae.encode(pixels).latent_dist
    return (dist.sample(generator) if sample else dist.mode()).float()


@torch.no_grad()
def encode_latents(
    vae: Any,
    pixels: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sample: bool = False,
) -> torch.Tensor:
    """Normalised latents of ``(B, 3, F, H, W)`` pixels in [-1, 1], as Wan (and CogVideoX) pipelines compute them.

    The posterior mean is used (deterministic) unless ``sample`` (a draw with ``generator``, as SkyReels-V3 encodes
    its references), then ``(z - latents_mean) / latents_std`` from the VAE config, or, for a VAE without these
    (CogVideoX), ``(z - shift_factor) * scaling_factor`` as CogVideoX's pipelines scale latents.
    """
    z = _posterior_mode(vae, pixels, generator, sample)
    norm = _vae_normalization(vae, z.shape[1])
    if norm is not None:
        mean, std = (t.to(z.device) for t in norm)
        z = (z - mean) / std
    elif getattr(vae.config, "scaling_factor", None) is not None:  # CogVideoX-style VAEs (no per-channel stats)
        z = (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
    return z


@torch.no_grad()
def calibrate_latent_statistics(
    vae: Any, pixels: torch.Tensor | list[torch.Tensor]
) -> tuple[list[float], list[float]]:
    """Measure per-channel ``latents_mean`` / ``latents_std`` on ``pixels`` and write them into ``vae.config``.

    Wan's released VAE ships statistics that make its latents roughly unit-variance; a VAE with other weights (the
    random toy VAE of ``utils.tiny``, or one trained from scratch) does not match them, and its normalised latents
    can vary by only a few hundredths, far below the noise the flow-matching model adds. This recomputes them as they
    were computed for Wan: over every latent position of the given clips.

    Args:
        vae: an ``AutoencoderKLWan`` (anything with ``encode(x).latent_dist`` and a ``latents_mean/std`` config).
        pixels: ``(B, 3, F, H, W)`` in [-1, 1], or a list of such batches (shapes may differ between batches).

    Returns:
        ``(latents_mean, latents_std)`` as lists of ``z_dim`` floats, also registered in ``vae.config``.
    """
    batches = [pixels] if isinstance(pixels, torch.Tensor) else list(pixels)
    if not batches or any(b.ndim != 5 or b.shape[1] != 3 for b in batches):
        raise ValueError("`pixels` must be a (B, 3, F, H, W) tensor or a non-empty list of them")
    z = [_posterior_mode(vae, b) for b in batches]
    flat = torch.cat([t.transpose(0, 1).flatten(1) for t in z], dim=1)  # (C, N)
    mean = flat.mean(1).tolist()
    std = flat.std(1).clamp_min(1e-6).tolist()
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return mean, std
