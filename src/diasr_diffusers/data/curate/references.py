"""Reference images: the subject cut out of the annotated frame and pasted on white, with its mask.

This is what OpenS2V's reader (``data_process/demo_dataloader.py:190-216``) and its trainers feed as the subject
image: the mask's bounding box, background set to white.
"""

from __future__ import annotations

import numpy as np

from .frames import mask_box


def cutout_on_white(frame: np.ndarray, mask: np.ndarray, margin: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``(image, mask)``: the crop around ``mask`` (plus ``margin`` of its size) with everything outside the mask
    white, and the mask as uint8 0/255 of the same size. Raises ``ValueError`` for an empty mask."""
    box = mask_box(mask)
    if box is None:
        raise ValueError("cannot cut out an empty mask")
    x1, y1, x2, y2 = box
    mx, my = int(round((x2 - x1) * margin)), int(round((y2 - y1) * margin))
    h, w = mask.shape
    x1, y1, x2, y2 = max(0, x1 - mx), max(0, y1 - my), min(w, x2 + mx), min(h, y2 + my)
    crop_mask = mask[y1:y2, x1:x2]
    image = np.where(crop_mask[..., None], frame[y1:y2, x1:x2], np.uint8(255)).astype(np.uint8)
    return image, crop_mask.astype(np.uint8) * 255
