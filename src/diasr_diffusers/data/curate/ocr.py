"""On-screen text: RapidOCR (PP-OCRv4 ONNX models shipped inside the ``rapidocr-onnxruntime`` wheel) and crop-away.

Open-Sora Plan v1.3 (the pipeline whose ``cut/crop`` fields OpenS2V-5M reuses) runs OCR at 1 fps and crops
subtitles away when they sit within 20 % of an edge; OpenS2V stores the kept window as
``crop = [s_x, e_x, s_y, e_y]``. :func:`text_free_crop` finds the largest such window; a clip whose text cannot be
cropped away within ``max_crop_fraction`` per side keeps its text and is judged by ``max_text_area``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .frames import resize_max_side


@dataclass
class RapidOCRText:
    """``boxes(frame) -> [(x1, y1, x2, y2, text, score), ...]`` in the frame's pixels.

    Args:
        max_side: frames are downscaled to this long side before detection (boxes are mapped back).
        min_score: recognition confidence below which a detection is ignored (rapidocr's own ``text_score`` 0.5).
        min_chars: detections with fewer recognised characters are ignored: on the footage in ``docs/data.md``
            single glyphs were texture read as text ('大' on vtest's grass, '?' on a Megamind lamp).
    """

    max_side: int = 960
    min_score: float = 0.5
    min_chars: int = 2
    name: str = "rapidocr-onnxruntime PP-OCRv4"
    _engine: Any = field(default=None, repr=False)

    def _load(self):
        if self._engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as err:
                raise ImportError(
                    "the OCR stage needs `rapidocr-onnxruntime` (models ship inside the wheel): "
                    "pip install --no-deps rapidocr-onnxruntime && pip install 'diasr-diffusers[curate]'"
                ) from err
            self._engine = RapidOCR()
        return self._engine

    def boxes(self, frame: np.ndarray) -> list[tuple[float, float, float, float, str, float]]:
        small = resize_max_side(frame, self.max_side)
        scale = frame.shape[1] / small.shape[1]
        # RapidOCR expects OpenCV's BGR order.
        result, _ = self._load()(np.ascontiguousarray(small[..., ::-1]))
        out = []
        for quad, text, score in result or []:
            if float(score) < self.min_score or len(str(text).strip()) < self.min_chars:
                continue
            q = np.asarray(quad, dtype=np.float32) * scale
            out.append((float(q[:, 0].min()), float(q[:, 1].min()), float(q[:, 0].max()), float(q[:, 1].max()),
                        str(text), float(score)))  # fmt: skip
        return out


def text_area_fraction(boxes: list[tuple], height: int, width: int) -> float:
    """Fraction of the frame covered by the union of text boxes."""
    canvas = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2, *_ in boxes:
        canvas[max(0, int(y1)) : int(np.ceil(y2)), max(0, int(x1)) : int(np.ceil(x2))] = True
    return float(canvas.mean())


def text_free_crop(
    boxes: list[tuple], height: int, width: int, max_crop_fraction: float = 0.2
) -> tuple[int, int, int, int] | None:
    """The largest window ``[s_x, e_x, s_y, e_y]`` (OpenS2V's ``crop``) that holds no text box, removing at most
    ``max_crop_fraction`` of the size from each side; None if no such window exists (text in the middle)."""
    if not boxes:
        return (0, width, 0, height)
    limit_x, limit_y = int(max_crop_fraction * width), int(max_crop_fraction * height)
    best, best_area = None, -1
    # Each side is cut either not at all or just past some text box: try every combination of those cut lines.
    lefts = {0} | {int(np.ceil(b[2])) for b in boxes if b[2] <= limit_x}
    rights = {width} | {int(b[0]) for b in boxes if b[0] >= width - limit_x}
    tops = {0} | {int(np.ceil(b[3])) for b in boxes if b[3] <= limit_y}
    bottoms = {height} | {int(b[1]) for b in boxes if b[1] >= height - limit_y}
    for sx in lefts:
        for ex in rights:
            for sy in tops:
                for ey in bottoms:
                    if ex <= sx or ey <= sy:
                        continue
                    inside = any(b[0] < ex and b[2] > sx and b[1] < ey and b[3] > sy for b in boxes)
                    area = (ex - sx) * (ey - sy)
                    if not inside and area > best_area:
                        best, best_area = (sx, ex, sy, ey), area
    return best
