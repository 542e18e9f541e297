"""Reference-image handling: accept what users pass, and fit it to the video without distortion."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor

_WHITE = (255, 255, 255)
# Channel counts an array may carry, read as PIL does: gray, gray + alpha, RGB, RGB + alpha.
_CHANNEL_COUNTS = (1, 2, 3, 4)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# A [0, 1] image that overshoots a little (resampling, a VAE decode) must not be read as a near-black [0, 255] one:
# between 1 and this value the float range is refused as ambiguous.
_FLOAT_255_MIN_PEAK = 2.0

ACCEPTED_IMAGES = (
    "a PIL image (any mode; 16-bit 'I;16' and 'F' images are rescaled, alpha is composited on white), "
    "a numpy array (H, W) or (H, W, C) or a tensor (C, H, W), (H, W, C) or (H, W), with C in 1-4 "
    "(gray, gray+alpha, RGB, RGBA), of dtype bool, uint8 (0-255), uint16 (0-65535), another integer type "
    "with values in 0-255, or float in [0, 1], [-1, 1] or [0, 255]"
)


def _as_uint8(a: np.ndarray, name: str, sixteen_bit: bool = False) -> np.ndarray:
    """``a`` on the 0-255 scale as uint8, its value range read off the dtype (and the data for floats)."""
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if a.dtype == np.uint16 or sixteen_bit:
            if lo < 0 or hi > 65535:
                raise ValueError(f"`{name}`: a 16-bit image must hold values in 0-65535, got {lo}..{hi}")
            return ((a.astype(np.float64) / 257.0).round()).astype(np.uint8)
        if lo < 0 or hi > 255:
            # The bit depth of a wide integer type is unknown: refuse rather than guess 12-, 16- or 32-bit.
            raise ValueError(
                f"`{name}`: an {a.dtype} image must hold 8-bit values (0-255), got {lo}..{hi}; pass 16-bit data as "
                "uint16, or rescale it to uint8"
            )
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"`{name}`: image dtype {a.dtype} is not supported; expected {ACCEPTED_IMAGES}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"`{name}`: the image has NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        scaled = a
    elif lo >= -1.0 and hi <= 1.0:
        scaled = (a + 1.0) / 2.0
    elif lo >= 0.0 and _FLOAT_255_MIN_PEAK <= hi <= 255.0:
        scaled = a / 255.0
    else:
        raise ValueError(
            f"`{name}`: float values span [{lo:g}, {hi:g}], which is none of the accepted ranges [0, 1], [-1, 1] "
            f"or [0, 255] (a [0, 255] image must reach at least {_FLOAT_255_MIN_PEAK:g}); rescale or clamp it first"
        )
    return (scaled * 255.0).round().astype(np.uint8)


def _channels_last(shape: tuple[int, ...], is_tensor: bool, name: str) -> bool:
    """Whether a 3-D image of ``shape`` is channels-last; refuse layouts that fit both readings."""
    first, last = shape[0] in _CHANNEL_COUNTS, shape[-1] in _CHANNEL_COUNTS
    if not is_tensor:
        # numpy's (and PIL's) convention is channels-last; a channels-first array is refused, not transposed.
        if last:
            return True
        hint = " (it looks channels-first: use `.transpose(1, 2, 0)`)" if first else ""
        raise ValueError(f"`{name}`: a numpy image must be (H, W) or (H, W, C) with C in 1-4, got {shape}{hint}")
    if first and last:
        raise ValueError(
            f"`{name}`: tensor shape {shape} is ambiguous: it could be (C, H, W) or (H, W, C). Pass it as a numpy "
            "array, which is always (H, W, C) (`t.numpy()` or `t.permute(1, 2, 0).numpy()`), or as a PIL image"
        )
    if not (first or last):
        raise ValueError(f"`{name}`: a tensor image must be (C, H, W), (H, W, C) or (H, W) with C in 1-4, got {shape}")
    return last


def to_pil_rgb(image: ImageLike, name: str = "image") -> PIL.Image.Image:
    """A PIL RGB image from a PIL image, a numpy array or a tensor.

    Accepted:

    - PIL images of any mode. Transparency is composited on white; 16-bit images (``I;16*``, and ``I`` images read
      from PNG, which stores at most 16 bits) are scaled from 0-65535; other ``I`` and ``F`` images go through the
      array rules below.
    - numpy arrays ``(H, W)`` or ``(H, W, C)``: numpy's channels-last convention, never transposed.
    - tensors ``(C, H, W)``, ``(H, W, C)`` or ``(H, W)``: the layout is the one whose end holds a channel count;
      a shape where both ends could (``(3, H, 3)``, ``(4, 40, 3)``) is refused as ambiguous.
    - ``C`` is 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).
    - Values by dtype: bool (black/white), uint8 (0-255), uint16 (0-65535), other integers only with values in
      0-255, floats in [0, 1], or [-1, 1] when negative values occur, or [0, 255] when the largest value is at
      least 2 (between 1 and 2 is refused: a [0, 1] image overshooting, or a black [0, 255] one?). A [-1, 1] image
      without negative values cannot be told from a [0, 1] one and is read as [0, 1]. NaN and infinity are refused.

    Raises:
        TypeError: for other types and dtypes.
        ValueError: for an empty image, a wrong shape or an out-of-range value, naming ``name``.
    """
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"`{name}` is an empty image ({image.width}x{image.height})")
        try:
            if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
                return _array_to_pil(np.asarray(image), name, is_tensor=False, sixteen_bit=True)
            if image.mode in ("I", "F"):
                return _array_to_pil(np.asarray(image), name, is_tensor=False)
            if image.mode in _ALPHA_MODES or "transparency" in image.info:
                rgba = image.convert("RGBA")
                canvas = PIL.Image.new("RGB", rgba.size, _WHITE)
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                return canvas
            return image.convert("RGB")
        except (OSError, SyntaxError) as e:  # Pillow's errors for truncated or corrupt files, raised on first load
            raise ValueError(f"`{name}`: the image could not be decoded: {e}") from e
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.is_complex():
            raise TypeError(f"`{name}`: image dtype {t.dtype} is not supported; expected {ACCEPTED_IMAGES}")
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()  # numpy has no bfloat16
        return _array_to_pil(t.numpy(), name, is_tensor=True)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, name, is_tensor=False)
    raise TypeError(f"`{name}` must be a PIL.Image.Image, numpy.ndarray or torch.Tensor, got {type(image).__name__}")


def _array_to_pil(a: np.ndarray, name: str, is_tensor: bool, sixteen_bit: bool = False) -> PIL.Image.Image:
    # is_tensor: the array came from a tensor, so channels-first is allowed.
    if a.ndim == 3:
        if not _channels_last(a.shape, is_tensor, name):
            a = a.transpose(1, 2, 0)
    elif a.ndim != 2:
        kind = "tensor image must be (C, H, W), (H, W, C)" if is_tensor else "numpy image must be (H, W, C)"
        raise ValueError(
            f"`{name}`: a {kind} or (H, W), got shape {a.shape}; give one image per entry (a list for several)"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"`{name}` is an empty image (shape {a.shape})")
    a = _as_uint8(a, name, sixteen_bit)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    # uint8 (H, W), (H, W, 2|3|4) -> L, LA, RGB, RGBA: PIL's own reading of the channel count.
    return to_pil_rgb(PIL.Image.fromarray(np.ascontiguousarray(a)), name)


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
    if image.width == 0 or image.height == 0:
        raise ValueError(f"cannot letterbox an empty image ({image.width}x{image.height})")
    if height < 1 or width < 1:
        raise ValueError(f"letterbox `height` and `width` must be >= 1, got {height}x{width}")
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

    Each entry is one image (see :func:`to_pil_rgb` for the accepted forms) or a list/tuple of several images of the
    same subject.
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
