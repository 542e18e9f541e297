"""Subject masks on the latent token grid.

Wan-style causal VAEs compress ``F = 1 + c_t * k`` frames into ``1 + k`` latent frames: latent frame 0 is pixel
frame 0 alone, latent frame ``t >= 1`` covers pixel frames ``c_t * (t - 1) + 1 ... c_t * t``. Spatially each latent
pixel is ``c_s x c_s`` pixels, and the transformer's patch embedding groups ``(p_t, p_h, p_w)`` latent cells into
one token. A token's *coverage* of a subject is the fraction of its pixels inside that subject's mask.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def normalize_masks(masks: torch.Tensor | np.ndarray, name: str = "masks") -> torch.Tensor:
    """``masks`` as float32 values in ``[0, 1]`` (same device), refusing values that would be read wrongly.

    Accepted: bool; integers that are binary (``{0, 1}``) or 8-bit (``0..255`` reaching 255, as PNG masks are,
    scaled by ``1 / 255``); floats in ``[0, 1]`` (binary or coverage fractions). Anything else (a label map with
    values 0..N, floats in [0, 255], NaN, negative values) raises a ``ValueError`` naming ``name``.
    """
    if isinstance(masks, np.ndarray):
        if masks.dtype == object or not (np.issubdtype(masks.dtype, np.number) or masks.dtype == np.bool_):
            raise TypeError(f"`{name}` must hold bool, integer or float values, got dtype {masks.dtype}")
        masks = torch.from_numpy(masks)
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor or numpy array, got {type(masks).__name__}")
    if masks.dtype == torch.bool:
        return masks.float()
    if masks.is_complex():
        raise TypeError(f"`{name}` must hold bool, integer or float values, got dtype {masks.dtype}")
    if masks.numel() == 0:
        return masks.float()
    if not masks.is_floating_point():
        lo, hi = int(masks.min()), int(masks.max())
        if lo >= 0 and hi <= 1:
            return masks.float()
        if lo >= 0 and hi == 255:
            return masks.float() / 255.0
        raise ValueError(
            f"`{name}`: integer masks must be binary (0/1) or 8-bit (0..255, reaching 255), got values {lo}..{hi}"
            " (a label map? give one mask per subject)"
        )
    masks = masks.float()
    lo, hi = masks.min(), masks.max()
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise ValueError(f"`{name}` has NaN or infinite values")
    if lo < 0 or hi > 1:
        hint = " (8-bit masks: pass them as uint8, or divide by 255)" if hi <= 255 and lo >= 0 else ""
        raise ValueError(f"`{name}`: float masks must be in [0, 1], got values {float(lo):g}..{float(hi):g}{hint}")
    return masks


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


def token_grid_factors(transformer: Any = None, vae: Any = None) -> dict[str, Any]:
    """``temporal_compression``, ``spatial_compression`` and ``patch_size`` of a Diffusers transformer + VAE.

    The keys to read are family facts (:attr:`~diasr_diffusers.families.FamilySpec.token_grid`): the transformer's
    class picks its family (Wan, LTX-Video, CogVideoX, HunyuanVideo-1.5, Ingredients); the VAE's strides are read by
    its own class's family (the transformer's when the VAE class is registered by none). Without a transformer the
    VAE's family decides; without either, Wan2.1's values (4, 8, (1, 2, 2)). A part left out gives its family's
    Diffusers defaults. Raises :class:`~diasr_diffusers.families.UnsupportedFamilyError` for an unknown class.
    """
    from ..families import FAMILIES, UnsupportedFamilyError, family_for_transformer, family_for_vae

    vae_family = family_for_vae(vae) if vae is not None else None
    if transformer is not None:
        family = family_for_transformer(transformer)
    elif vae is None:
        family = FAMILIES["wan"]
    elif vae_family is None:
        raise UnsupportedFamilyError(f"cannot read the token grid of a {type(vae).__name__}: not a VAE of a supported family; pass the factors explicitly")  # fmt: skip
    else:
        family = vae_family
    grid = family.token_grid(transformer, vae)
    if vae_family is not None and vae_family is not family:  # e.g. Ingredients' transformer on CogVideoX's VAE
        strides = vae_family.token_grid(None, vae)
        grid.update(temporal_compression=strides["temporal_compression"], spatial_compression=strides["spatial_compression"])  # fmt: skip
    return grid


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
        masks: ``(..., F, H, W)`` masks (e.g. ``(B, N, F, H, W)`` for N subjects) as accepted by
            :func:`normalize_masks` (bool, 0/1 or 0..255 integers, floats in ``[0, 1]``), with
            ``F = 1 + temporal_compression * k`` and ``H, W`` divisible by ``spatial_compression * patch``.
        transformer, vae: read the factors from these (see :func:`token_grid_factors`); explicit factors win.

    Returns:
        ``(..., F_tok, H_tok, W_tok)`` float32 coverage in ``[0, 1]``; flatten the last three dims to get the
        transformer's token order (frame-major, then rows, then columns).
    """
    factors = token_grid_factors(transformer, vae)
    # `is None`, not `or`: an explicit 0 must be refused, not replaced by the default.
    ct = _positive_int(factors["temporal_compression"] if temporal_compression is None else temporal_compression,
                       "temporal_compression")  # fmt: skip
    cs = _positive_int(factors["spatial_compression"] if spatial_compression is None else spatial_compression,
                       "spatial_compression")  # fmt: skip
    patch = factors["patch_size"] if patch_size is None else patch_size
    if not isinstance(patch, (tuple, list)) or len(patch) != 3:
        raise ValueError(f"`patch_size` must be three positive integers (p_t, p_h, p_w), got {patch!r}")
    pt, ph, pw = (_positive_int(p, "patch_size") for p in patch)
    if not isinstance(masks, (torch.Tensor, np.ndarray)) or masks.ndim < 3:
        raise ValueError(f"`masks` must be a tensor of shape (..., F, H, W), got {getattr(masks, 'shape', masks)}")
    masks = normalize_masks(masks)
    *lead, frames, height, width = masks.shape
    if 0 in masks.shape:
        raise ValueError(f"`masks` is empty: shape {tuple(masks.shape)}")
    if (frames - 1) % ct != 0:
        raise ValueError(f"`masks` has {frames} frames; expected 1 + {ct} * k frames for temporal compression {ct}")
    if height % (cs * ph) or width % (cs * pw):
        raise ValueError(
            f"`masks` is {height}x{width}; height and width must be divisible by {cs * ph} and {cs * pw} "
            f"(VAE factor {cs} x patch {ph}x{pw})"
        )
    x = masks.reshape(-1, frames, height, width)
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


def pixels_to_token_grid(pixels: torch.Tensor, **factors: Any) -> torch.Tensor:
    """Average pixel values in ``[-1, 1]`` (e.g. a video's ``(3, F, H, W)``) onto the token grid, with the same frame
    grouping and pooling as :func:`masks_to_token_grid` (same keyword arguments): each token's mean colour.

    Values outside ``[-1, 1]`` are refused rather than read as masks of another range.
    """
    return masks_to_token_grid((pixels.float() + 1) / 2, **factors) * 2 - 1


def routing_labels_from_coverage(coverage: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Hard per-token labels from per-subject coverage.

    Args:
        coverage: ``(B, N, L)`` or ``(B, N, F, H, W)`` coverage fractions of N subjects.
        threshold: in ``(0, 1]``; a token belongs to its best-covering subject if that coverage is at least this,
            else -1.

    Returns:
        ``(B, L)`` int64 in ``[-1, N)`` (``-1`` = background / null), tokens flattened in transformer order.
    """
    # threshold 0 would hand every uncovered token to subject 0.
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"`threshold` must be a number in (0, 1], got {threshold!r}")
    if not isinstance(coverage, torch.Tensor):
        raise TypeError(f"`coverage` must be a torch.Tensor, got {type(coverage).__name__}")
    coverage = normalize_masks(coverage, "coverage")
    if coverage.ndim == 5:
        coverage = coverage.flatten(2)
    if coverage.ndim != 3:
        raise ValueError(f"`coverage` must be (B, N, L) or (B, N, F, H, W), got {tuple(coverage.shape)}")
    if coverage.shape[1] == 0:
        return torch.full((coverage.shape[0], coverage.shape[2]), -1, dtype=torch.long, device=coverage.device)
    best, label = coverage.max(dim=1)
    return torch.where(best >= threshold, label, torch.full_like(label, -1))


# -- layout masks given by a user (routing="masks") -----------------------------------------------------------------
#
# The rule, documented in README.md and docs/app.md:
# - an all-zero mask is refused (its subject would vanish without a word);
# - masks may overlap: a token goes to the subject covering the largest share of it; on a tie (the same pixels in
#   both masks) to the subject with the smaller mask in total, as a small region drawn over a large one is in front
#   of it (a face over a body), then to the lower index; a warning says how many tokens were contested;
# - a subject that ends up with no token (its mask covers less than half of every token, or lies entirely under
#   other subjects' smaller masks) is refused, naming it.


def check_layout_masks(masks: torch.Tensor | np.ndarray, name: str = "subject_masks") -> torch.Tensor:
    """:func:`normalize_masks`, and refuse (``ValueError``) a subject's mask with no pixel set."""
    masks = normalize_masks(masks, name)
    if masks.ndim >= 3 and masks.shape[0]:
        empty = (masks.flatten(1).amax(dim=1) <= 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"`{name}[{empty[0]}]` is empty (no pixel of its subject is set), so that subject would get no video "
                "token and vanish; draw where it goes, or leave the subject out"
            )
    return masks


def layout_labels(coverage: torch.Tensor, threshold: float = 0.5, name: str = "subject_masks") -> torch.Tensor:
    """Per-token subject labels of user layout masks by the rule above (not :func:`routing_labels_from_coverage`'s
    first-index ties, which let one subject take every shared token).

    Args:
        coverage: ``(B, N, F, H, W)`` or ``(B, N, L)`` coverage of N subjects (from :func:`masks_to_token_grid`).
        threshold: the share of a token a subject must cover to own it.

    Returns:
        ``(B, L)`` int64 in ``[-1, N)``.
    """
    from diffusers.utils import logging

    if not isinstance(coverage, torch.Tensor):
        raise TypeError(f"`coverage` must be a torch.Tensor, got {type(coverage).__name__}")
    if coverage.ndim == 5:
        coverage = coverage.flatten(2)
    if coverage.ndim != 3:
        raise ValueError(f"`coverage` must be (B, N, L) or (B, N, F, H, W), got {tuple(coverage.shape)}")
    coverage = normalize_masks(coverage, "coverage")
    batch, n, _ = coverage.shape
    labels = routing_labels_from_coverage(coverage, threshold)
    if n < 2:
        contested = torch.zeros_like(labels, dtype=torch.bool)
    else:
        best = coverage.max(dim=1, keepdim=True).values
        tied = coverage >= best - 1e-6  # (B, N, L)
        area = coverage.sum(dim=2)  # (B, N): each mask's size, in tokens
        rank = area.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = the smallest mask
        priority = torch.where(tied, rank[:, :, None], torch.full_like(tied, n, dtype=torch.long))
        winner = priority.argmin(dim=1)
        labels = torch.where(labels >= 0, winner, labels)
        contested = (tied.sum(dim=1) > 1) & (labels >= 0)
    shared = coverage.sum(dim=1) > 1 + 1e-6  # shares over 1: some pixels are in two masks
    if bool(shared.any()):
        logging.get_logger(__name__).warning(
            f"`{name}` overlap on {int(shared[0].sum())} video token(s); each token goes to the subject covering most "
            f"of it, {int(contested[0].sum())} tie(s) to the subject with the smaller mask (drawn in front)"
        )
    for b in range(batch):
        for i in range(n):
            if not bool((labels[b] == i).any()):
                under = bool((coverage[b, i] >= threshold).any())
                why = (
                    "every token it covers is also covered, as much, by another subject with a smaller mask"
                    if under
                    else f"it covers less than {threshold:.0%} of every video token; draw it larger"
                )
                raise ValueError(f"`{name}[{i}]` gets no video token: {why}")
    return labels
