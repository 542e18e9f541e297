"""Synthetic clips and photos shared by the evaluation tests (all generated or shipped inside PyPI packages)."""

from __future__ import annotations

import numpy as np


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random RGB texture: enough structure for Farneback flow to lock on."""
    import cv2

    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur((rng.random((height, width, 3)) * 255).astype(np.uint8), (0, 0), 1.5)


def translating_square(
    velocity: int, frames: int = 9, height: int = 96, width: int = 128, side: int = 48
) -> np.ndarray:
    """A textured square moving ``velocity`` px/frame to the right over a static textured background."""
    background = texture(height, width, seed=1)
    square = texture(side, side, seed=2)
    clip = []
    for t in range(frames):
        frame = background.copy()
        x = 20 + velocity * t
        frame[24 : 24 + side, x : x + side] = square
        clip.append(frame)
    return np.stack(clip)


def static_clip(frames: int = 9, height: int = 96, width: int = 128) -> np.ndarray:
    return np.stack([texture(height, width, seed=3)] * frames)


def astronaut_face(size: int = 128, dx: int = 0, dy: int = 0) -> np.ndarray:
    """A crop around the astronaut's face (``skimage.data.astronaut()``), optionally shifted, resized to ``size``."""
    import cv2
    from skimage.data import astronaut

    image = astronaut()
    crop = image[max(0, 0 + dy) : 256 + dy, 96 + dx : 352 + dx]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def hopper_face(size: int = 128) -> np.ndarray:
    """Grace Hopper's portrait, shipped with matplotlib (``mpl-data/sample_data/grace_hopper.jpg``)."""
    import cv2
    import matplotlib.cbook as cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        photo = np.asarray(image.convert("RGB"))
    crop = photo[80:400, 100:420]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
