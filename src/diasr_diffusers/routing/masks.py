"""Subject masks on the latent token grid.

Wan-style causal VAEs compress ``F = 1 + c_t * k`` frames into ``1 + k`` latent frames: latent frame 0 is pixel
frame 0 alone, latent frame ``t >= 1`` covers pixel frames ``c_t * (t - 1) + 1 ... c_t * t``. Spatially each latent
pixel is ``c_s x c_s`` pixels, and the transformer's patch embedding groups ``(p_t, p_h, p_w)`` latent cells into
one token. A token's *coverage* of a subject is the fraction of its pixels inside that subject's mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def token_grid_factors(transformer: Any = None, vae: Any = None) -> dict[str, Any]:
    """``temporal_compression``, ``spatial_compression`` and ``patch_size`` read off a Diffusers transformer + VAE.

    Missing parts fall back to Wan2.1's values (4, 8, (1, 2, 2)).
    """
    vae_cfg = getattr(vae, "config", None)
    tr_cfg = getattr(transformer, "config", None)
    return {
        "temporal_compression": int(getattr(vae_cfg, "scale_factor_temporal", 4)),
        "spatial_compression": int(getattr(vae_cfg, "scale_factor_spatial", 8)),
        "patch_size": tuple(getattr(tr_cfg, "patch_size", (1, 2, 2))),
    }


def masks_to_token_grid(
    masks: torch.Tensor,
    *,
    transformer: Any = None,
    vae: Any = None,
    temporal_compression: int | None = None,
    spatial_compression: int | None = None,
    patch_size: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Downsample per-frame masks to per-token coverage fractions.

    Args:
        masks: ``(..., F, H, W)`` bool or float in ``[0, 1]`` (e.g. ``(B, N, F, H, W)`` for N subjects), with
            ``F = 1 + temporal_compression * k`` and ``H, W`` divisible by ``spatial_compression * patch``.
        transformer, vae: read the factors from these (see :func:`token_grid_factors`); explicit factors win.

    Returns:
        ``(..., F_tok, H_tok, W_tok)`` float32 coverage in ``[0, 1]``; flatten the last three dims to get the
        transformer's token order (frame-major, then rows, then columns).
    """
    factors = token_grid_factors(transformer, vae)
    ct = temporal_compression or factors["temporal_compression"]
    cs = spatial_compression or factors["spatial_compression"]
    pt, ph, pw = patch_size or factors["patch_size"]
    if not isinstance(masks, torch.Tensor) or masks.ndim < 3:
        raise ValueError(f"`masks` must be a tensor of shape (..., F, H, W), got {getattr(masks, 'shape', masks)}")
    *lead, frames, height, width = masks.shape
    if (frames - 1) % ct != 0:
        raise ValueError(f"`masks` has {frames} frames; expected 1 + {ct} * k frames for temporal compression {ct}")
    if height % (cs * ph) or width % (cs * pw):
        raise ValueError(
            f"`masks` is {height}x{width}; height and width must be divisible by {cs * ph} and {cs * pw} "
            f"(VAE factor {cs} x patch {ph}x{pw})"
        )
    x = masks.reshape(-1, frames, height, width).float()
    # Temporal: latent frame 0 <- frame 0; latent t <- the next c_t frames. Average = coverage over time.
    first, rest = x[:, :1], x[:, 1:]
    if rest.shape[1]:
        rest = rest.unflatten(1, (-1, ct)).mean(dim=2)
    x = torch.cat([first, rest], dim=1)
    latent_frames = x.shape[1]
    if latent_frames % pt:
        raise ValueError(f"{latent_frames} latent frames are not divisible by the temporal patch size {pt}")
    x = x.unflatten(1, (-1, pt)).mean(dim=2)
    x = F.avg_pool2d(x, kernel_size=(cs * ph, cs * pw))
    return x.reshape(*lead, *x.shape[1:])


def routing_labels_from_coverage(coverage: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Hard per-token labels from per-subject coverage.

    Args:
        coverage: ``(B, N, L)`` or ``(B, N, F, H, W)`` coverage fractions of N subjects.
        threshold: a token belongs to its best-covering subject if that coverage is at least this, else -1.

    Returns:
        ``(B, L)`` int64 in ``[-1, N)`` (``-1`` = background / null), tokens flattened in transformer order.
    """
    if coverage.ndim == 5:
        coverage = coverage.flatten(2)
    if coverage.ndim != 3:
        raise ValueError(f"`coverage` must be (B, N, L) or (B, N, F, H, W), got {tuple(coverage.shape)}")
    if coverage.shape[1] == 0:
        return torch.full((coverage.shape[0], coverage.shape[2]), -1, dtype=torch.long, device=coverage.device)
    best, label = coverage.max(dim=1)
    return torch.where(best >= threshold, label, torch.full_like(label, -1))
