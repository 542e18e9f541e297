"""See who was routed where: routing maps over the generated frames, with a legend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from .images import to_pil_rgb

# Distinct colours per subject (tab10); null tokens are left uncoloured.
SUBJECT_COLORS = np.array(
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75], [227, 119, 194]],
    dtype=np.float32,
)

# Tints for routing maps drawn over coloured subjects (``tint_colors``): saturated (a routing map drawn over grey
# frames shows them all) and far apart, so that some of them stay far from any subject's own colour.
HIGH_CONTRAST_TINTS = np.array(
    [[0, 230, 0], [255, 0, 255], [255, 255, 0], [0, 255, 255], [255, 128, 0], [130, 0, 255], [0, 90, 255]],
    dtype=np.float32,
)

# Legend rows are 16 px so a strip keeps a video's height a multiple of 16 (ffmpeg's macro block: no rescaling).
_LEGEND_ROW = 16
_SWATCH = 10
_LEGEND_BACKGROUND = (24, 24, 24)
_LEGEND_TEXT = (240, 240, 240)


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


def subject_color(index: int) -> tuple[int, int, int]:
    """The RGB colour of subject ``index`` in routing maps and their legend."""
    return tuple(int(c) for c in SUBJECT_COLORS[index % len(SUBJECT_COLORS)])


def dominant_color(image) -> tuple[int, int, int]:
    """The colour of an image's most saturated pixels (the median of those with at least 70% of the largest
    saturation ``max - min`` of RGB): a subject's own colour on a reference drawn or photographed on a plain
    background (a darker pattern on it is less saturated and left out)."""
    rgb = np.asarray(to_pil_rgb(image, "image"), dtype=np.float32).reshape(-1, 3)
    saturation = rgb.max(axis=1) - rgb.min(axis=1)
    top = rgb[saturation >= 0.7 * saturation.max()]
    return tuple(int(c) for c in np.median(top, axis=0).round())


def tint_colors(subject_colors: Sequence[Sequence[float]]) -> list[tuple[int, int, int]]:
    """One routing-map tint per subject that reads at a glance over the subjects themselves.

    Each subject in turn takes the unused colour of :data:`HIGH_CONTRAST_TINTS` farthest (RGB distance) from every
    subject's own colour, so no subject is tinted in a colour it (or another subject the tint may land on when
    routing is wrong) already has: a blue tint over a blue sprite is invisible.

    Args:
        subject_colors: each subject's own RGB colour, e.g. ``dominant_color(reference)``.

    Returns:
        ``len(subject_colors)`` RGB tuples, all different (at most ``len(HIGH_CONTRAST_TINTS)`` subjects).
    """
    own = np.asarray(subject_colors, dtype=np.float32).reshape(-1, 3)
    if len(own) > len(HIGH_CONTRAST_TINTS):
        raise ValueError(f"`subject_colors`: at most {len(HIGH_CONTRAST_TINTS)} subjects, got {len(own)}")
    distance = np.linalg.norm(HIGH_CONTRAST_TINTS[:, None] - own[None], axis=-1).min(axis=1)  # (tints,)
    order = np.argsort(-distance, kind="stable")[: len(own)]
    return [tuple(int(c) for c in HIGH_CONTRAST_TINTS[i]) for i in order]


def _fit_text(draw: PIL.ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..." if text else ""


def routing_legend(
    phrases: Sequence[str], width: int, colors: Sequence[Sequence[int]] | None = None, null_label: str = "null"
) -> np.ndarray:
    """A legend strip for routing maps: a colour swatch and the phrase of every subject, then ``null`` (untinted).

    ``colors`` gives each subject's swatch colour (default: :func:`subject_color`); ``null_label`` the text of the
    untinted entry.

    Entries wrap onto as many 16-pixel rows as ``width`` needs; a phrase too long for one row is shortened with
    ``...``. Uses PIL's built-in default font (nothing is downloaded).

    Returns:
        ``(16 * rows, width, 3)`` uint8.
    """
    if isinstance(phrases, str):
        raise TypeError("`phrases` must be a list of subject phrases, not one string")
    if width < _SWATCH + 4:
        raise ValueError(f"`width` must be at least {_SWATCH + 4} pixels for a legend, got {width}")
    font = PIL.ImageFont.load_default()
    measure = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    colors = _subject_colors(colors, len(phrases), "colors")
    entries = [(tuple(int(c) for c in colors[i]), str(p)) for i, p in enumerate(phrases)] + [(None, null_label)]
    # Lay the entries out first (x, row, shortened label), then draw them on a strip of the needed height.
    placed, x, row = [], 0, 0
    for color, label in entries:
        label = _fit_text(measure, label, font, width - _SWATCH - 6)
        entry_width = _SWATCH + 6 + int(np.ceil(measure.textlength(label, font=font))) + 8
        if x > 0 and x + entry_width > width:
            x, row = 0, row + 1
        placed.append((x, row, color, label))
        x += entry_width
    strip = PIL.Image.new("RGB", (width, _LEGEND_ROW * (row + 1)), _LEGEND_BACKGROUND)
    draw = PIL.ImageDraw.Draw(strip)
    for x, row, color, label in placed:
        top = row * _LEGEND_ROW + (_LEGEND_ROW - _SWATCH) // 2
        box = (x + 2, top, x + 2 + _SWATCH - 1, top + _SWATCH - 1)
        if color is None:  # null tokens are drawn untinted: an empty box
            draw.rectangle(box, outline=_LEGEND_TEXT)
        else:
            draw.rectangle(box, fill=color)
        draw.text(
            (x + _SWATCH + 6, row * _LEGEND_ROW + _LEGEND_ROW // 2), label, fill=_LEGEND_TEXT, font=font, anchor="lm"
        )
    return np.asarray(strip)


def _subject_colors(colors: Sequence[Sequence[int]] | None, count: int, name: str) -> np.ndarray:
    if colors is None:
        return SUBJECT_COLORS[np.arange(count) % len(SUBJECT_COLORS)]
    array = np.asarray(colors, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != 3 or len(array) < count:
        raise ValueError(f"`{name}` must give an RGB colour for each of the {count} subjects, got shape {array.shape}")
    return array


def _check_phrases(phrases: Sequence[str], maps: np.ndarray) -> None:
    if isinstance(phrases, str):
        raise TypeError("`phrases` must be a list of subject phrases, not one string")
    top = int(maps.max()) if maps.size else -1
    if top >= len(phrases):
        raise ValueError(f"`routing_maps` route tokens to subject {top} but only {len(phrases)} `phrases` were given")


def overlay_routing_maps(
    frames,
    routing_maps: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    temporal_compression: int = 4,
    phrases: Sequence[str] | None = None,
    colors: Sequence[Sequence[int]] | None = None,
    grayscale: bool = False,
) -> np.ndarray:
    """Colour every pixel by the subject its token was routed to.

    Args:
        frames: ``(F, H, W, 3)`` video (uint8, or float in [0, 1]) or a list of PIL images.
        routing_maps: ``(F_lat, H_tok, W_tok)`` int subject index per token, ``-1`` = null (one sample of
            ``DiasRPipelineOutput.routing_maps``).
        alpha: overlay opacity.
        temporal_compression: pixel frames per latent frame after the first (the VAE's
            ``scale_factor_temporal``; Wan: 4).
        phrases: the subject phrases; when given, a legend strip (see :func:`routing_legend`) is added below every
            frame, so the frames are taller than ``H``.
        colors: an RGB tint per subject (default: :data:`SUBJECT_COLORS`; :func:`tint_colors` picks tints far from
            the subjects' own colours).
        grayscale: draw the frames in grey under the tints, so a tint never mixes with a subject's own colour.

    Returns:
        ``(F, H, W, 3)`` uint8 frames (``(F, H + legend, W, 3)`` with ``phrases``).
    """
    frames = _frames_array(frames)
    maps = routing_maps.detach().cpu().numpy() if isinstance(routing_maps, torch.Tensor) else np.asarray(routing_maps)
    if maps.ndim != 3:
        raise ValueError(f"`routing_maps` must be (F_lat, H_tok, W_tok) for one video, got shape {maps.shape}")
    if phrases is not None:
        _check_phrases(phrases, maps)
    num_frames, height, width, _ = frames.shape
    out = frames.astype(np.float32)
    if grayscale:
        out = np.repeat(out @ np.array([0.299, 0.587, 0.114], np.float32), 3).reshape(out.shape)
    top = int(maps.max()) if maps.size else -1
    palette = _subject_colors(colors, max(top + 1, len(phrases) if phrases is not None else 0, 1), "colors")
    # Nearest-neighbour upsampling of the token grid to pixels.
    rows = np.arange(height) * maps.shape[1] // height
    cols = np.arange(width) * maps.shape[2] // width
    for f in range(num_frames):
        lat = min(0 if f == 0 else (f - 1) // temporal_compression + 1, maps.shape[0] - 1)
        cell = maps[lat][rows][:, cols]
        routed = cell >= 0
        color = palette[np.clip(cell, 0, None) % len(palette)]
        out[f][routed] = (1 - alpha) * out[f][routed] + alpha * color[routed]
    out = out.round().astype(np.uint8)
    if phrases is not None:
        legend = routing_legend(phrases, width, colors=None if colors is None else palette)
        out = np.concatenate([out, np.broadcast_to(legend, (num_frames, *legend.shape))], axis=1)
    return out


def routing_grid(
    frames,
    routing_maps: torch.Tensor | np.ndarray,
    every: int = 4,
    phrases: Sequence[str] | None = None,
    temporal_compression: int = 4,
) -> PIL.Image.Image:
    """An image grid: every ``every``-th frame on top, its routing overlay below, and with ``phrases`` a legend
    strip (see :func:`routing_legend`) at the bottom."""
    frames = _frames_array(frames)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"`every` must be a positive integer, got {every!r}")
    over = overlay_routing_maps(frames, routing_maps, temporal_compression=temporal_compression)
    if phrases is not None:
        _check_phrases(phrases, np.asarray(routing_maps))
    idx = list(range(0, frames.shape[0], every))
    top = np.concatenate([frames[i] for i in idx], axis=1)
    bottom = np.concatenate([over[i] for i in idx], axis=1)
    parts = [top, bottom]
    if phrases is not None:
        parts.append(routing_legend(phrases, top.shape[1]))
    return PIL.Image.fromarray(np.concatenate(parts, axis=0))
