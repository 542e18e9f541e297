"""An identity embedder for the synthetic sprites that does not trust the generator.

Face benchmarks score identity with a face embedder trained apart from the video model; this is the same for the
toy sprites of :mod:`diasr_diffusers.data.synthetic`. :class:`SpriteEmbedder` is a small CNN (about 80k parameters)
trained by ``examples/train_sprite_embedder.py`` on crops of ``make-synthetic`` clips and references, with
augmentations that mimic a blurry generated video. It never sees the generator's weights, routing or latents.

It reads a crop of one sprite and predicts its **shape**, **colour** and **pattern** (the three attributes that
make a sprite's identity), plus an **objectness** (is a sprite centred in this crop?) used to search frames.

The embedding is ``concat_k sqrt(p_k) / sqrt(3)`` over the three attribute distributions ``p_k`` (20 numbers).
Each ``sqrt(p_k)`` has unit norm, so the cosine similarity of two embeddings is the mean over attributes of the
Bhattacharyya coefficient ``sum_c sqrt(p_k(c) q_k(c))``: 1 for the same predicted identity, about 2/3 when exactly
one attribute differs (a same-colour pair with swapped patterns), 1/3 for two, 0 for none. A penultimate feature
would also encode pose, size and background, which are not identity, and its similarities have no fixed scale.

Usage with the identity metrics of :mod:`diasr_diffusers.eval.identity` (``frames`` ``(F, H, W, 3)`` uint8 of a
generated video, ``masks`` ``(N, F, H, W)`` bool from the layout it was asked for, ``refs``/``ref_masks`` the ``N``
reference images and their masks)::

    from diasr_diffusers.eval import crop_subject, identity_scores, load_sprite_embedder

    embedder = load_sprite_embedder()
    ref_crops = [crop_subject(image, mask) for image, mask in zip(refs, ref_masks)]
    ref_emb = embedder.embed([c for c, _ in ref_crops], [m for _, m in ref_crops])  # (N, 20)
    per_frame, labels = [], []
    for t, frame in enumerate(frames):
        present = [i for i in range(len(masks)) if masks[i, t].any()]  # a subject may be hidden in a frame
        crops = [crop_subject(frame, masks[i, t]) for i in present]
        per_frame.append(embedder.embed([c for c, _ in crops], [m for _, m in crops]).numpy())
        labels.append(present)
    scores = identity_scores(ref_emb.numpy(), per_frame, frame_labels=labels)  # .labeled, .leakage_matrix, ...
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..data.synthetic import COLORS, PATTERNS, SHAPES
from ..utils.images import letterbox, to_pil_rgb
from .identity import _check_image

ATTRIBUTES = ("shape", "color", "pattern")
# Filled into crop padding and faded into pixels far from a mask: mid-grey, the colour of no sprite.
NEUTRAL = 128
_NEUTRAL_RGB = (NEUTRAL, NEUTRAL, NEUTRAL)
# Embedding batches are chunked so a long video's crops do not allocate all activations at once.
_CHUNK = 512
MAX_IMAGE_SIZE = 128
MAX_CHANNELS = 512


def _shipped_path() -> str:
    return str(resources.files("diasr_diffusers") / "assets" / "sprite_embedder")


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _check_labels(labels: Any, name: str) -> list[str]:
    if (
        not isinstance(labels, (list, tuple))
        or len(labels) < 2
        or not all(isinstance(x, str) and x for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise ValueError(f"`{name}` must be a list of at least 2 distinct non-empty strings, got {labels!r}")
    return list(labels)


class SpriteEmbedder(ModelMixin, ConfigMixin):
    r"""Shape / colour / pattern classifier of sprite crops, and the identity embedding built from it.

    Args:
        shapes, colors, patterns: class names of the three heads (default: those of ``make-synthetic``).
        image_size: crops are letterboxed to ``image_size x image_size`` (on mid-grey) before the network.
        channels: widths of the four convolution stages (the last three halve the resolution).
        mask_margin: with a mask, pixels farther than ``mask_margin * image_size`` from it fade to mid-grey (over a
            soft edge). The margin keeps the sprite when a layout mask and a generated sprite do not line up, and it
            rounds the mask's silhouette away, so that the shape is read from pixels, not from the mask.
        temperatures: softmax temperatures of the shape, colour and pattern heads, fitted on held-out degraded crops
            by the training script so that probabilities (and thus similarities) are calibrated.

    Example:
        ```py
        >>> from diasr_diffusers.eval import SpriteEmbedder, crop_subject, load_sprite_embedder
        >>> embedder = load_sprite_embedder()  # the shipped weights
        >>> crop, crop_mask = crop_subject(frame, mask)  # frame (H, W, 3) uint8, mask (H, W) bool
        >>> embedder.predict([crop], [crop_mask])[0]["phrase"]
        'the striped red star'
        >>> embedder.save_pretrained("my-embedder")  # safetensors + config.json
        >>> embedder = SpriteEmbedder.from_pretrained("my-embedder")
        ```
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        shapes: Sequence[str] = SHAPES,
        colors: Sequence[str] = tuple(COLORS),
        patterns: Sequence[str] = PATTERNS,
        image_size: int = 32,
        channels: Sequence[int] = (16, 32, 48, 64),
        mask_margin: float = 0.1,
        temperatures: Sequence[float] = (1.0, 1.0, 1.0),
    ):
        super().__init__()
        self.labels = {
            "shape": _check_labels(shapes, "shapes"),
            "color": _check_labels(colors, "colors"),
            "pattern": _check_labels(patterns, "patterns"),
        }
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 16 <= image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"`image_size` must be an integer in [16, {MAX_IMAGE_SIZE}], got {image_size!r}")
        if (
            not isinstance(channels, (list, tuple))
            or len(channels) != 4
            or not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= MAX_CHANNELS for c in channels)
        ):
            raise ValueError(f"`channels` must be 4 integers in [1, {MAX_CHANNELS}], got {channels!r}")
        if not isinstance(mask_margin, (int, float)) or not 0 <= mask_margin <= 0.5:
            raise ValueError(f"`mask_margin` must be a number in [0, 0.5], got {mask_margin!r}")
        if (
            not isinstance(temperatures, (list, tuple))
            or len(temperatures) != 3
            or not all(isinstance(t, (int, float)) and 0.05 <= t <= 20 for t in temperatures)
        ):
            raise ValueError(f"`temperatures` must be 3 numbers in [0.05, 20], got {temperatures!r}")
        c0, c1, c2, c3 = channels
        # 32 -> 16 -> 8 -> 4: the last stage's receptive field covers a whole sprite, which shape needs.
        self.features = nn.Sequential(
            _block(3, c0, 1), _block(c0, c1, 2), _block(c1, c1, 1), _block(c1, c2, 2), _block(c2, c2, 1),
            _block(c2, c3, 2),
        )  # fmt: skip
        side = math.ceil(image_size / 8)
        # Attention pooling with a learned positional prior: the crop's centred sprite, not a neighbour entering at
        # the border, should decide the prediction (global average pooling cannot tell centre from border).
        self.attention = nn.Conv2d(c3, 1, 1)
        self.position_prior = nn.Parameter(torch.zeros(side * side))
        self.hidden = nn.Sequential(nn.Linear(c3, c3), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(c3, len(v)) for k, v in self.labels.items()})
        self.objectness = nn.Linear(c3, 1)

    @property
    def embedding_dim(self) -> int:
        return sum(len(v) for v in self.labels.values())

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of each head for ``pixels`` ``(N, 3, S, S)`` as made by :meth:`preprocess`.

        Returns ``{"shape": (N, 8), "color": (N, 8), "pattern": (N, 4), "objectness": (N,)}`` (untempered logits).
        """
        x = self.features(pixels)  # (N, C, s, s)
        weights = (self.attention(x).flatten(1) + self.position_prior).softmax(-1)  # (N, s*s)
        pooled = self.hidden(torch.einsum("ncl,nl->nc", x.flatten(2), weights))
        out = {k: head(pooled) for k, head in self.heads.items()}
        out["objectness"] = self.objectness(pooled).squeeze(-1)
        return out

    # -- inputs --------------------------------------------------------------------------------------------------

    def preprocess(self, crops: Any, masks: Any = None) -> torch.Tensor:
        """Network input ``(N, 3, S, S)`` float32 from ``N`` crops (and optional masks); see :meth:`embed`."""
        images, mask_list = _as_batch(crops, masks)
        s = self.config.image_size
        x = np.stack([np.asarray(letterbox(img, s, s, fill=_NEUTRAL_RGB), dtype=np.float32) for img in images])
        x = torch.from_numpy(x).permute(0, 3, 1, 2) / 255.0
        masked = [i for i, m in enumerate(mask_list) if m is not None]
        if masked:
            m = np.stack([
                np.asarray(letterbox(PIL.Image.fromarray(mask_list[i]).convert("RGB"), s, s, fill=(0, 0, 0)))[..., 0]
                for i in masked
            ])  # fmt: skip
            m = torch.from_numpy(m.astype(np.float32) / 255.0)[:, None]
            r = round(self.config.mask_margin * s)
            if r > 0:
                m = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
            # A soft edge: a hard one would draw the (dilated) mask's outline, a shape cue the pixels may contradict.
            weight = F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False)
            x[masked] = weight * x[masked] + (1 - weight) * (NEUTRAL / 255.0)
        return (x - 0.5) / 0.25

    def logits(self, crops: Any, masks: Any = None) -> dict[str, torch.Tensor]:
        """Untempered logits of each head for a batch of crops (arguments as in :meth:`embed`), on the CPU:
        ``{"shape": (N, 8), "color": (N, 8), "pattern": (N, 4), "objectness": (N,)}``. In eval mode whatever the
        module's mode, without gradients."""
        pixels = self.preprocess(crops, masks)
        was_training = self.training
        self.eval()  # batch statistics of a few crops would make a crop's embedding depend on its neighbours
        try:
            with torch.no_grad():
                device = next(self.parameters()).device
                chunks = [self(pixels[i : i + _CHUNK].to(device)) for i in range(0, len(pixels), _CHUNK)]
        finally:
            self.train(was_training)
        if not chunks:
            sizes = {k: len(v) for k, v in self.labels.items()}
            return {**{k: torch.zeros(0, n) for k, n in sizes.items()}, "objectness": torch.zeros(0)}
        return {k: torch.cat([c[k] for c in chunks]).float().cpu() for k in chunks[0]}

    def probabilities(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Calibrated (tempered) softmax of each attribute head's ``logits``: ``{"shape": (N, 8), ...}``."""
        temps = dict(zip(ATTRIBUTES, self.config.temperatures))
        return {k: (logits[k] / temps[k]).softmax(-1) for k in ATTRIBUTES}

    def embed_logits(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """The embedding ``(N, D)`` of :meth:`embed` from the output of :meth:`logits` (to reuse one forward)."""
        probs = self.probabilities(logits)
        # Each sqrt(p) block has unit norm; normalising again only guards against rounding.
        return F.normalize(torch.cat([probs[k].sqrt() for k in ATTRIBUTES], dim=-1), dim=-1)

    # -- public API ------------------------------------------------------------------------------------------------

    def embed(self, crops: Any, masks: Any = None) -> torch.Tensor:
        """L2-normalised identity embeddings ``(N, D)`` float32 on the CPU (``D = 8 + 8 + 4 = 20`` by default).

        Args:
            crops: one crop or a list of ``N`` crops of one sprite each: ``(H, W, 3)`` uint8 numpy arrays or PIL
                images (an ``(N, H, W, 3)`` uint8 array is a batch). Any size; non-square crops are letterboxed.
                Use :func:`crop_subject` to cut them from frames.
            masks: ``None``, or one ``(H, W)`` bool mask per crop (``None`` entries allowed): pixels well outside
                the mask fade to mid-grey, which hides neighbours and background; the sprite may overflow the mask
                by ``mask_margin`` (a generated sprite and its layout mask need not line up).

        Cosine similarity of two embeddings = mean over shape, colour and pattern of the Bhattacharyya coefficient
        of the predicted distributions (see the module docstring).
        """
        return self.embed_logits(self.logits(crops, masks))

    def predict(self, crops: Any, masks: Any = None) -> list[dict[str, Any]]:
        """Per crop: ``{"shape", "color", "pattern"}`` labels, their probabilities ``"shape_prob"``... (calibrated),
        ``"objectness"`` (probability that a sprite is centred in the crop) and the ``"phrase"`` ("the striped red
        star"). Arguments as in :meth:`embed`."""
        logits = self.logits(crops, masks)
        probs = self.probabilities(logits)
        objectness = logits["objectness"].sigmoid()
        results = []
        for i in range(len(objectness)):
            row: dict[str, Any] = {}
            for k in ATTRIBUTES:
                p, c = probs[k][i].max(-1)
                row[k], row[f"{k}_prob"] = self.labels[k][int(c)], float(p)
            row["objectness"] = float(objectness[i])
            row["phrase"] = f"the {row['pattern']} {row['color']} {row['shape']}"
            results.append(row)
        return results


def load_sprite_embedder(device: str | torch.device = "cpu") -> SpriteEmbedder:
    """The embedder shipped in ``diasr_diffusers/assets/sprite_embedder`` (trained by
    ``examples/train_sprite_embedder.py``), in eval mode. Reads the package's files only; nothing is downloaded."""
    path = _shipped_path()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"the shipped sprite embedder is missing from {path}; reinstall diasr-diffusers or train it with "
            "`python examples/train_sprite_embedder.py` (docs/toy_model.md)"
        )
    return SpriteEmbedder.from_pretrained(path, use_safetensors=True).to(device).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def _as_rgb(image: Any, name: str) -> np.ndarray:
    """``image`` as a contiguous ``(H, W, 3)`` uint8 array; PIL images of any mode are converted (alpha on white)."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(to_pil_rgb(image, name))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"`{name}` must be an (H, W, 3) uint8 numpy array or a PIL image, got {type(image).__name__}")
    if image.ndim in (2, 3) and 0 in image.shape[:2]:
        raise ValueError(f"`{name}` is an empty image (shape {image.shape})")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"`{name}` must be an (H, W, 3) RGB image, got shape {image.shape}")
    return _check_image(image, name)


def _as_mask(mask: Any, name: str, shape: tuple[int, int], image_name: str) -> np.ndarray:
    if isinstance(mask, PIL.Image.Image):
        mask = np.asarray(mask.convert("L")) > 127
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"`{name}` must be an (H, W) bool numpy array or a PIL image, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise ValueError(f"`{name}` must be a bool array, got dtype {mask.dtype} (use `{name} > 0`)")
    if mask.shape != shape:
        raise ValueError(f"`{name}` has shape {mask.shape} but `{image_name}` is {shape[0]}x{shape[1]}")
    if not mask.any():
        raise ValueError(f"`{name}` is empty (no subject pixel)")
    return np.ascontiguousarray(mask).astype(np.uint8) * 255


def _as_batch(crops: Any, masks: Any) -> tuple[list[PIL.Image.Image], list[np.ndarray | None]]:
    """Crops as PIL RGB images and masks as uint8 (0/255) arrays (or None), checked one by one."""
    single = isinstance(crops, PIL.Image.Image) or (isinstance(crops, np.ndarray) and crops.ndim != 4)
    if single:
        crops, masks = [crops], (None if masks is None else [masks])
    elif isinstance(crops, np.ndarray):
        crops = list(crops)
    elif not isinstance(crops, (list, tuple)):
        raise TypeError(f"`crops` must be an image or a list of images, got {type(crops).__name__}")
    if masks is None:
        masks = [None] * len(crops)
    elif isinstance(masks, np.ndarray) and masks.ndim == 3:
        masks = list(masks)
    elif not isinstance(masks, (list, tuple)):
        raise TypeError(f"`masks` must be None or a list with one mask per crop, got {type(masks).__name__}")
    if len(masks) != len(crops):
        raise ValueError(f"`masks` has {len(masks)} entries for {len(crops)} `crops`")
    images, out_masks = [], []
    for i, (crop, mask) in enumerate(zip(crops, masks)):
        rgb = _as_rgb(crop, f"crops[{i}]")
        images.append(PIL.Image.fromarray(rgb))
        out_masks.append(None if mask is None else _as_mask(mask, f"masks[{i}]", rgb.shape[:2], f"crops[{i}]"))
    return images, out_masks


def crop_subject(frame: Any, mask: Any, pad: float = 0.15, min_side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A square crop around a subject: ``(crop (S, S, 3) uint8, crop_mask (S, S) bool)``.

    The square is centred on the mask's bounding box, with side ``max(box side) * (1 + 2 * pad)`` (at least
    ``min_side``); what falls outside the frame is mid-grey (and False in ``crop_mask``).

    Args:
        frame: ``(H, W, 3)`` uint8 numpy array or PIL image.
        mask: ``(H, W)`` bool array (or a PIL image, white = subject) with at least one True pixel.
        pad: margin on each side, as a fraction of the box's longer side (the embedder was trained with 0.05-0.6).
        min_side: smallest crop side, in pixels.
    """
    image = _as_rgb(frame, "frame")
    if isinstance(pad, bool) or not isinstance(pad, (int, float)) or not 0 <= pad <= 4:
        raise ValueError(f"`pad` must be a number in [0, 4], got {pad!r}")
    if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 1:
        raise ValueError(f"`min_side` must be a positive integer, got {min_side!r}")
    m = _as_mask(mask, "mask", image.shape[:2], "frame") > 0
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(min_side, round(max(y1 - y0, x1 - x0) * (1 + 2 * pad)))
    top, left = round((y0 + y1 - side) / 2), round((x0 + x1 - side) / 2)
    crop = np.full((side, side, 3), NEUTRAL, dtype=np.uint8)
    crop_mask = np.zeros((side, side), dtype=bool)
    fy0, fy1 = max(top, 0), min(top + side, image.shape[0])
    fx0, fx1 = max(left, 0), min(left + side, image.shape[1])
    crop[fy0 - top : fy1 - top, fx0 - left : fx1 - left] = image[fy0:fy1, fx0:fx1]
    crop_mask[fy0 - top : fy1 - top, fx0 - left : fx1 - left] = m[fy0:fy1, fx0:fx1]
    return crop, crop_mask


# ---------------------------------------------------------------------------------------------------------------------
# Search without masks


@dataclass
class SubjectLocation:
    """Where a reference's identity appears best in a frame: ``box`` ``(x0, y0, x1, y1)`` in pixels (exclusive
    end), ``score = similarity * objectness``, the window's cosine ``similarity`` to the reference embedding and its
    ``objectness`` (probability that a sprite is centred in it)."""

    box: tuple[int, int, int, int]
    score: float
    similarity: float
    objectness: float


def sliding_windows(height: int, width: int, sizes: Sequence[int], stride: int) -> list[tuple[int, int, int, int]]:
    """Square windows ``(x0, y0, x1, y1)`` of each size in ``sizes`` that fit in the frame, every ``stride`` pixels
    (the last row and column are added when the stride skips them, so the frame's edges are covered)."""
    boxes = []
    for size in sizes:
        if size > min(height, width):
            continue
        ys = sorted({*range(0, height - size + 1, stride), height - size})
        xs = sorted({*range(0, width - size + 1, stride), width - size})
        boxes.extend((x, y, x + size, y + size) for y in ys for x in xs)
    return boxes


def locate_subject(
    frame: Any,
    reference_embedding: torch.Tensor | np.ndarray,
    embedder: SpriteEmbedder,
    *,
    window_sizes: Sequence[int] | None = None,
    stride: int = 4,
) -> SubjectLocation | list[SubjectLocation]:
    """Find where a reference's identity appears best in ``frame``, without any mask.

    Every square window (a few sizes, every ``stride`` pixels) is embedded once; each reference picks the window
    with the highest ``cosine similarity x objectness`` (objectness keeps windows centred on a sprite, not on
    background or on a sprite's edge).

    Args:
        frame: ``(H, W, 3)`` uint8 numpy array or PIL image.
        reference_embedding: ``(D,)`` from ``embedder.embed(reference)[0]``, or ``(N, D)`` for ``N`` references.
        embedder: a :class:`SpriteEmbedder` (e.g. :func:`load_sprite_embedder`).
        window_sizes: window sides in pixels (default: 30%, 42% and 56% of the frame's shorter side, sized for
            ``make-synthetic`` sprites, whose diameter is 26-44% of it).
        stride: step between windows, pixels.

    Returns:
        One :class:`SubjectLocation` for a ``(D,)`` embedding, a list of ``N`` for ``(N, D)``.
    """
    if not isinstance(embedder, SpriteEmbedder):
        raise TypeError(f"`embedder` must be a SpriteEmbedder, got {type(embedder).__name__}")
    image = _as_rgb(frame, "frame")
    refs = torch.as_tensor(np.asarray(reference_embedding, dtype=np.float32))
    if refs.ndim not in (1, 2) or refs.shape[-1] != embedder.embedding_dim or refs.numel() == 0:
        raise ValueError(
            f"`reference_embedding` must be (D,) or (N, D) with D = {embedder.embedding_dim}, got {tuple(refs.shape)}"
        )
    if not torch.isfinite(refs).all():
        raise ValueError("`reference_embedding` has NaN or infinite values")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"`stride` must be a positive integer, got {stride!r}")
    height, width = image.shape[:2]
    short = min(height, width)
    if window_sizes is None:
        window_sizes = sorted({max(8, round(f * short)) for f in (0.3, 0.42, 0.56)})
    elif not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in window_sizes) or not window_sizes:
        raise ValueError(f"`window_sizes` must be positive integers, got {window_sizes!r}")
    boxes = sliding_windows(height, width, window_sizes, stride)
    if not boxes:
        raise ValueError(f"`window_sizes` {list(window_sizes)} are all larger than the {height}x{width} frame")
    crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]
    logits = embedder.logits(crops)
    windows = embedder.embed_logits(logits)  # (W, D)
    objectness = logits["objectness"].sigmoid()  # (W,)
    similarity = F.normalize(refs.reshape(-1, refs.shape[-1]), dim=-1) @ windows.T  # (N, W)
    score = similarity * objectness
    best = score.argmax(-1)
    found = [
        SubjectLocation(boxes[int(b)], float(score[n, b]), float(similarity[n, b]), float(objectness[b]))
        for n, b in enumerate(best)
    ]
    return found[0] if refs.ndim == 1 else found
