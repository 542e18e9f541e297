"""Reference-image handling: accept what users pass, and fit it to the video without distortion."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor

_WHITE = (255, 255, 255)


def to_pil_rgb(image: ImageLike, name: str = "image") -> PIL.Image.Image:
    """A PIL RGB image from PIL (any mode; transparency composited on white), a numpy array ``(H, W[, C])``
    (uint8, or float in [0, 1]) or a tensor ``(C, H, W)`` / ``(H, W)`` (float in [0, 1] or [-1, 1] when negative
    values occur, or uint8)."""
    if isinstance(image, PIL.Image.Image):
        if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            canvas = PIL.Image.new("RGB", rgba.size, _WHITE)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        elif t.ndim != 2:
            raise ValueError(f"`{name}`: a tensor image must be (C, H, W) or (H, W), got shape {tuple(image.shape)}")
        if t.is_floating_point() and t.numel() and float(t.min()) < 0:
            t = (t + 1) / 2
        image = t.numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise ValueError(f"`{name}`: an array image must be (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return to_pil_rgb(PIL.Image.fromarray(a), name)
    raise TypeError(
        f"`{name}` must be a PIL.Image.Image, numpy.ndarray or torch.Tensor, got {type(image).__name__}"
    )


def letterbox(
    image: PIL.Image.Image,
    height: int,
    width: int,
    fill: tuple[int, int, int] = _WHITE,
    resample: str = "bicubic",
    floor_size: bool = False,
) -> PIL.Image.Image:
    """Resize to fit inside ``height x width`` keeping the aspect ratio, centred on a ``fill`` canvas (Phantom pads
    references with white).

    ``resample`` is ``"bicubic"`` or ``"lanczos"``; ``floor_size`` truncates the fitted side instead of rounding it,
    as Phantom's and SkyReels' ``load_ref_images`` do (``int(h * ratio)``), so their references are reproduced
    pixel for pixel. Extra space is split with the odd pixel on the right/bottom, as theirs.
    """
    filters = {"bicubic": PIL.Image.Resampling.BICUBIC, "lanczos": PIL.Image.Resampling.LANCZOS}
    if resample not in filters:
        raise ValueError(f"`resample` must be one of {sorted(filters)}, got {resample!r}")
    if floor_size:
        # Their exact arithmetic: compare aspect ratios, the long side fills, the other is int()-truncated.
        ratio = image.width / image.height
        if ratio > width / height:
            size = (width, max(1, int(width / ratio)))
        else:
            size = (max(1, int(height * ratio)), height)
    else:
        scale = min(width / image.width, height / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(size, filters[resample])
    canvas = PIL.Image.new("RGB", (width, height), fill)
    canvas.paste(resized, ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


def normalize_subject_images(subject_images: Any) -> list[list[PIL.Image.Image]]:
    """``subject_images`` as one list of PIL RGB images per subject.

    Each entry is one image (PIL, array or tensor) or a list/tuple of several images of the same subject.
    """
    if subject_images is None:
        return []
    if not isinstance(subject_images, (list, tuple)):
        raise TypeError(
            "`subject_images` must be a list with one entry per subject (an image, or a list of images of that "
            f"subject), got {type(subject_images).__name__}"
        )
    subjects = []
    for i, entry in enumerate(subject_images):
        images = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not images:
            raise ValueError(f"`subject_images[{i}]` is an empty list; give at least one image per subject")
        subjects.append([to_pil_rgb(img, f"subject_images[{i}]") for img in images])
    return subjects
