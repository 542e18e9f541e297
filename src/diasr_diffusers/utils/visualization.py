"""See who was routed where: routing maps over the generated frames."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

# Distinct colours per subject (tab10); null tokens are left uncoloured.
SUBJECT_COLORS = np.array(
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75], [227, 119, 194]],
    dtype=np.float32,
)


def _frames_array(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().float().numpy()
    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], PIL.Image.Image):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"`frames` must be (F, H, W, 3) or a list of PIL images, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    return frames


def overlay_routing_maps(
    frames, routing_maps: torch.Tensor | np.ndarray, alpha: float = 0.5, temporal_compression: int = 4
) -> np.ndarray:
    """Colour every pixel by the subject its token was routed to.

    Args:
        frames: ``(F, H, W, 3)`` video (uint8, or float in [0, 1]) or a list of PIL images.
        routing_maps: ``(F_lat, H_tok, W_tok)`` int subject index per token, ``-1`` = null (one sample of
            ``DiasRPipelineOutput.routing_maps``).
        alpha: overlay opacity.
        temporal_compression: pixel frames per latent frame after the first (Wan: 4).

    Returns:
        ``(F, H, W, 3)`` uint8 frames.
    """
    frames = _frames_array(frames)
    maps = routing_maps.detach().cpu().numpy() if isinstance(routing_maps, torch.Tensor) else np.asarray(routing_maps)
    if maps.ndim != 3:
        raise ValueError(f"`routing_maps` must be (F_lat, H_tok, W_tok) for one video, got shape {maps.shape}")
    num_frames, height, width, _ = frames.shape
    out = frames.astype(np.float32)
    # Nearest-neighbour upsampling of the token grid to pixels.
    rows = np.arange(height) * maps.shape[1] // height
    cols = np.arange(width) * maps.shape[2] // width
    for f in range(num_frames):
        lat = min(0 if f == 0 else (f - 1) // temporal_compression + 1, maps.shape[0] - 1)
        cell = maps[lat][rows][:, cols]
        routed = cell >= 0
        color = SUBJECT_COLORS[np.clip(cell, 0, None) % len(SUBJECT_COLORS)]
        out[f][routed] = (1 - alpha) * out[f][routed] + alpha * color[routed]
    return out.round().astype(np.uint8)


def routing_grid(frames, routing_maps: torch.Tensor | np.ndarray, every: int = 4) -> PIL.Image.Image:
    """An image grid: every ``every``-th frame on top, its routing overlay below."""
    frames = _frames_array(frames)
    over = overlay_routing_maps(frames, routing_maps)
    idx = list(range(0, frames.shape[0], every))
    top = np.concatenate([frames[i] for i in idx], axis=1)
    bottom = np.concatenate([over[i] for i in idx], axis=1)
    return PIL.Image.fromarray(np.concatenate([top, bottom], axis=0))
