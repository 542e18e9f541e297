"""``MuSADataset``: clips, reference images and latent-grid subject masks from a manifest, ready for training.

Usage::

    from torch.utils.data import DataLoader
    from diasr_diffusers.data import MuSADataset, collate_fn

    dataset = MuSADataset("data/manifest.jsonl", num_frames=17, height=64, width=64, seed=0)
    print(dataset.num_skipped, "bad or too-short records skipped")
    loader = DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=collate_fn)
    for epoch in range(2):
        dataset.set_epoch(epoch)  # new clip / crop / augmentation draws, still reproducible
        for batch in loader:
            batch["video"]  # (B, 3, F, H, W) in [-1, 1]

Every random draw of item ``i`` comes from ``numpy.random.default_rng([seed, epoch, i])``: the same (seed, epoch,
index) gives the same sample in any worker, in any order, after a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..routing.masks import masks_to_token_grid, routing_labels_from_coverage
from ..routing.phrases import phrase_problems
from ..utils.latents import encode_latents
from ._io import read_video_frames
from .manifest import ClipRecord, LoadedManifest, MaskTrack, ReferenceImage, load_manifest


@dataclass
class RefAugment:
    """Reference-image augmentation (training). Hue is never jittered: captions name colors.

    Attributes:
        crop_scale: side fraction kept by a random crop, taken inside the subject's box when a mask is given.
        scale: size of the subject in its canvas relative to fitting it exactly (smaller = more white margin).
        flip_p: probability of a horizontal flip.
        brightness, contrast, saturation: jitter strength; each factor is drawn from ``[1 - x, 1 + x]``.
        remove_background: paint pixels outside the reference mask white (as Phantom pads its references).
    """

    crop_scale: tuple[float, float] = (0.85, 1.0)
    scale: tuple[float, float] = (0.75, 1.0)
    flip_p: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    remove_background: bool = True


def _to_unit(array: np.ndarray) -> torch.Tensor:
    """uint8 / float [0, 255] (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(array)).float()
    return (t / 127.5 - 1.0).movedim(-1, -3)


def _fit_box(src_h: int, src_w: int, dst_h: int, dst_w: int) -> tuple[int, int]:
    """The largest ``(h, w)`` crop of a ``src`` image with the aspect ratio of ``dst``."""
    scale = max(dst_h / src_h, dst_w / src_w)
    return min(src_h, max(1, round(dst_h / scale))), min(src_w, max(1, round(dst_w / scale)))


def resize_crop(
    video: torch.Tensor, masks: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop ``box = (top, left, h, w)`` of video ``(F, 3, H0, W0)`` and masks ``(N, F, H0, W0)`` and resize both to
    ``size`` with the same (bilinear, antialiased) resampling; masks are re-binarised at 0.5, so a mask edge lands
    where the video's edge lands."""
    top, left, h, w = box
    v = video[..., top : top + h, left : left + w]
    m = masks[..., top : top + h, left : left + w]
    if (h, w) != tuple(size):
        v = F.interpolate(v, size=size, mode="bilinear", antialias=True, align_corners=False)
        if m.numel():
            n, f = m.shape[:2]
            m = F.interpolate(m.reshape(n * f, 1, h, w).float(), size=size, mode="bilinear", antialias=True,
                              align_corners=False).reshape(n, f, *size) >= 0.5
    return v, m.bool()


def prepare_reference(
    image: np.ndarray,
    mask: np.ndarray | None,
    size: tuple[int, int],
    rng: np.random.Generator | None = None,
    augment: RefAugment | None = None,
) -> torch.Tensor:
    """A reference image as the model sees it: ``(3, *size)`` in [-1, 1], fitted and centred on white.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` bool subject mask or None. With a mask the image is cropped to the subject's box and the
            background is painted white (unless ``augment.remove_background`` is False).
        size: ``(height, width)`` of the output canvas (Phantom: the video size).
        rng, augment: random crop / scale / flip / color jitter; both None = deterministic (evaluation).
    """
    aug = augment if rng is not None else None
    x = image.astype(np.float32)
    if aug is not None:
        # Color jitter first so the white background added below stays pure white.
        x = x * rng.uniform(1 - aug.brightness, 1 + aug.brightness)
        mean = x.mean()
        x = mean + (x - mean) * rng.uniform(1 - aug.contrast, 1 + aug.contrast)
        gray = x.mean(axis=-1, keepdims=True)
        x = gray + (x - gray) * rng.uniform(1 - aug.saturation, 1 + aug.saturation)
        x = x.clip(0, 255)
    top, left, bottom, right = 0, 0, x.shape[0], x.shape[1]
    if mask is not None and mask.any():
        if aug is None or aug.remove_background:
            x = np.where(mask[..., None], x, 255.0)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if aug is not None:
        frac = rng.uniform(*aug.crop_scale)
        h, w = max(1, round((bottom - top) * frac)), max(1, round((right - left) * frac))
        top += int(rng.integers(0, bottom - top - h + 1))
        left += int(rng.integers(0, right - left - w + 1))
        bottom, right = top + h, left + w
    x = x[top:bottom, left:right]
    if aug is not None and rng.random() < aug.flip_p:
        x = x[:, ::-1]
    out_h, out_w = size
    scale = min(out_h / x.shape[0], out_w / x.shape[1])
    if aug is not None:
        scale *= rng.uniform(*aug.scale)
    new_h, new_w = max(1, min(out_h, round(x.shape[0] * scale))), max(1, min(out_w, round(x.shape[1] * scale)))
    resized = Image.fromarray(x.round().clip(0, 255).astype(np.uint8)).resize((new_w, new_h), Image.BICUBIC)
    canvas = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
    y0, x0 = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas[y0 : y0 + new_h, x0 : x0 + new_w] = np.asarray(resized)
    return _to_unit(canvas)


def load_reference(ref: ReferenceImage) -> tuple[np.ndarray, np.ndarray | None]:
    """``(RGB uint8 (H, W, 3), mask bool (H, W) or None)``; an RGBA image's alpha serves as the mask."""
    with Image.open(ref.image) as img:
        alpha = np.asarray(img.getchannel("A")) > 127 if img.mode in ("RGBA", "LA") else None
        rgb = np.asarray(img.convert("RGB"))
    if ref.mask is not None:
        with Image.open(ref.mask) as m:
            alpha = np.asarray(m.convert("L")) > 127
    return rgb, alpha


class MuSADataset(Dataset):
    """Clips of a MuSA-format manifest with their subjects' references and masks.

    Args:
        manifest: a ``.jsonl`` path, a :class:`LoadedManifest`, or a list of validated :class:`ClipRecord`.
        num_frames: frames per sample, ``1 + temporal_compression * k`` (Wan: 1 + 4k, e.g. 17, 33, 81).
        height, width: output size; divisible by ``spatial_compression * patch_size``.
        frame_stride: take every ``frame_stride``-th frame.
        ref_size: ``(h, w)`` of reference canvases (default: the video size, as Phantom pads references).
        clip_sampling: ``"random"`` start frame, or ``"start"`` / ``"center"`` of the record's frame range.
        crop: ``"random"`` or ``"center"`` crop after resizing to cover ``(height, width)``.
        ref_augment: reference augmentation; None disables it (evaluation, caching).
        temporal_compression, spatial_compression, patch_size: the token grid (Wan2.1: 4, 8, (1, 2, 2)).
        label_threshold: coverage a token needs to be labelled with a subject (else -1, background).
        seed: base seed of every random draw.
        latent_cache: a folder written by :func:`cache_latents`; items are then read from it (no video decoding).
            Entries are keyed by each record's content (id, caption, phrases, frame range and the size and mtime of
            its video, reference and mask files), so a reordered or edited manifest still finds its own clips; a
            record that is not in the cache or whose files changed since is refused at construction, naming the
            record: re-run ``diasr cache-latents``.
        skip_invalid: skip (and count) bad records instead of raising.
        num_workers: threads used to validate the manifest.
        allow_outside_root: accept manifest paths outside the manifest's folder (see
            :func:`~diasr_diffusers.data.validate_manifest`).

    Items are dicts: ``video`` (3, F, H, W) float in [-1, 1]; ``ref_images`` list of (3, h, w); ``phrases``;
    ``caption``; ``masks`` (N, F, H, W) bool; ``token_masks`` (N, F_tok, H_tok, W_tok) coverage; ``token_labels``
    (L,) int64 in [-1, N); ``frame_indices`` (F,); ``clip_id``; ``index``. From a latent cache, ``latents``
    (C, F_lat, H_lat, W_lat) and ``ref_latents`` (N, C, 1, h_lat, w_lat) replace ``video`` and ``ref_images``.
    """

    def __init__(
        self,
        manifest: str | os.PathLike | LoadedManifest | Sequence[ClipRecord],
        *,
        num_frames: int = 17,
        height: int = 480,
        width: int = 832,
        frame_stride: int = 1,
        ref_size: tuple[int, int] | None = None,
        clip_sampling: str = "random",
        crop: str = "random",
        ref_augment: RefAugment | None = None,
        temporal_compression: int = 4,
        spatial_compression: int = 8,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        label_threshold: float = 0.5,
        seed: int = 0,
        latent_cache: str | os.PathLike | None = None,
        skip_invalid: bool = True,
        num_workers: int = 0,
        allow_outside_root: bool = False,
    ) -> None:
        # Types and ranges first: a float size or a zero factor would otherwise fail deep inside numpy / torch.
        for name, value, low in (
            ("num_frames", num_frames, 1),
            ("height", height, 1),
            ("width", width, 1),
            ("frame_stride", frame_stride, 1),
            ("temporal_compression", temporal_compression, 1),
            ("spatial_compression", spatial_compression, 1),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"`{name}` must be an integer, got {value!r}")
            if not low <= value < 2**31:
                raise ValueError(f"`{name}` must be an integer in [{low}, 2**31), got {value}")
        if not isinstance(patch_size, Sequence) or len(patch_size) != 3 or not all(
            isinstance(p, int | np.integer) and not isinstance(p, bool) and p >= 1 for p in patch_size
        ):
            raise ValueError(f"`patch_size` must be three positive integers (t, h, w), got {patch_size!r}")
        if ref_size is not None and (
            not isinstance(ref_size, Sequence)
            or len(ref_size) != 2
            or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in ref_size)
        ):
            raise ValueError(f"`ref_size` must be (height, width) with positive integer sides, got {ref_size!r}")
        if num_frames < 1 or (num_frames - 1) % temporal_compression:
            raise ValueError(
                f"`num_frames` must be 1 + {temporal_compression} * k (e.g. {1 + temporal_compression * 4}), "
                f"got {num_frames}"
            )
        pt, ph, pw = patch_size
        if height <= 0 or width <= 0 or height % (spatial_compression * ph) or width % (spatial_compression * pw):
            raise ValueError(
                f"`height` and `width` must be positive multiples of {spatial_compression * ph} and "
                f"{spatial_compression * pw} (VAE factor x patch), got {height}x{width}"
            )
        if ((num_frames - 1) // temporal_compression + 1) % pt:
            raise ValueError(f"`num_frames` {num_frames} gives a latent frame count not divisible by patch {pt}")
        if frame_stride < 1:
            raise ValueError(f"`frame_stride` must be >= 1, got {frame_stride}")
        if clip_sampling not in ("random", "start", "center"):
            raise ValueError(f"`clip_sampling` must be 'random', 'start' or 'center', got {clip_sampling!r}")
        if crop not in ("random", "center"):
            raise ValueError(f"`crop` must be 'random' or 'center', got {crop!r}")
        if ref_size is not None and (len(ref_size) != 2 or min(ref_size) <= 0):
            raise ValueError(f"`ref_size` must be (height, width) with positive sides, got {ref_size}")
        if not 0.0 < label_threshold <= 1.0:
            raise ValueError(f"`label_threshold` must be in (0, 1], got {label_threshold}")

        self.num_frames, self.height, self.width, self.frame_stride = num_frames, height, width, frame_stride
        self.ref_size = tuple(ref_size) if ref_size is not None else (height, width)
        self.clip_sampling, self.crop, self.ref_augment = clip_sampling, crop, ref_augment
        self.temporal_compression, self.spatial_compression = temporal_compression, spatial_compression
        self.patch_size = tuple(patch_size)
        self.label_threshold, self.seed, self.epoch = label_threshold, seed, 0

        if isinstance(manifest, (str, os.PathLike)):
            manifest = load_manifest(
                manifest, skip_invalid=skip_invalid, num_workers=num_workers, allow_outside_root=allow_outside_root
            )
        if isinstance(manifest, LoadedManifest):
            records, skipped = list(manifest.records), manifest.num_skipped
            self.skipped_reasons = [str(p) for p in manifest.report.problems]
        else:
            records, skipped, self.skipped_reasons = list(manifest), 0, []
        span = (num_frames - 1) * frame_stride + 1
        self.records: list[ClipRecord] = []
        for rec in records:
            if rec.num_video_frames is None:
                raise ValueError(f"record at line {rec.line} was not validated with check_media=True")
            # Records built by hand skip manifest validation: hold them to the pipeline's phrase rules too.
            phrase_issues = phrase_problems(rec.caption, rec.phrases, what="caption")
            if phrase_issues:
                msg = f"line {rec.line}: {'; '.join(phrase_issues)}"
                if not skip_invalid:
                    raise ValueError(msg)
                skipped += 1
                self.skipped_reasons.append(msg)
                continue
            if rec.end - rec.frame_start < span:
                msg = f"line {rec.line}: {rec.end - rec.frame_start} frames < {span} needed"
                if not skip_invalid:
                    raise ValueError(f"{msg} (num_frames={num_frames}, frame_stride={frame_stride})")
                skipped += 1
                self.skipped_reasons.append(msg)
                continue
            self.records.append(rec)
        self.num_skipped = skipped
        if not self.records:
            raise ValueError(f"`manifest` has no usable records ({skipped} skipped: {self.skipped_reasons[:5]})")
        self.latent_cache = None if latent_cache is None else LatentCacheDataset(latent_cache)
        if self.latent_cache is not None:
            self.latent_cache.check_compatible(self)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Change the random draws (clip start, crop, augmentation) for a new epoch, reproducibly."""
        self.epoch = int(epoch)

    def token_grid_kwargs(self) -> dict[str, Any]:
        return {
            "temporal_compression": self.temporal_compression,
            "spatial_compression": self.spatial_compression,
            "patch_size": self.patch_size,
        }

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def sample_frames(self, record: ClipRecord, rng: np.random.Generator) -> np.ndarray:
        span = (self.num_frames - 1) * self.frame_stride + 1
        slack = record.end - record.frame_start - span
        if self.clip_sampling == "random":
            offset = int(rng.integers(0, slack + 1))
        elif self.clip_sampling == "center":
            offset = slack // 2
        else:
            offset = 0
        return record.frame_start + offset + self.frame_stride * np.arange(self.num_frames, dtype=np.int64)

    def crop_box(self, src_h: int, src_w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        h, w = _fit_box(src_h, src_w, self.height, self.width)
        if self.crop == "random":
            return int(rng.integers(0, src_h - h + 1)), int(rng.integers(0, src_w - w + 1)), h, w
        return (src_h - h) // 2, (src_w - w) // 2, h, w

    def token_targets(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coverage (N, F_tok, H_tok, W_tok), labels (L,))`` of ``(N, F, H, W)`` masks on the token grid."""
        coverage = masks_to_token_grid(masks.float(), **self.token_grid_kwargs())
        labels = routing_labels_from_coverage(coverage.unsqueeze(0), threshold=self.label_threshold)[0]
        return coverage, labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"`index` must be an integer, got {index!r}")
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} records")
        record = self.records[index]
        if self.latent_cache is not None:
            item = self.latent_cache.get(record)
            item["index"] = index
            return item
        rng = self.rng(index)
        indices = self.sample_frames(record, rng)
        frames = read_video_frames(record.video, indices.tolist())  # (F, H0, W0, 3)
        src_h, src_w = frames.shape[1:3]
        masks = np.stack([s.masks.load(indices.tolist()) for s in record.subjects])  # (N, F, H0, W0)
        if masks.shape[2:] != (src_h, src_w):
            raise ValueError(f"line {record.line}: masks {masks.shape[2:]} do not match video {(src_h, src_w)}")
        box = self.crop_box(src_h, src_w, rng)
        video, mask_t = resize_crop(_to_unit(frames), torch.from_numpy(masks), box, (self.height, self.width))
        coverage, labels = self.token_targets(mask_t)
        refs = []
        for subject in record.subjects:
            ref = subject.references[int(rng.integers(len(subject.references)))] if self.ref_augment else \
                subject.references[0]
            image, ref_mask = load_reference(ref)
            refs.append(prepare_reference(image, ref_mask, self.ref_size, rng if self.ref_augment else None,
                                          self.ref_augment))
        return {
            "video": video.movedim(0, 1).contiguous(),  # (3, F, H, W)
            "ref_images": refs,
            "phrases": record.phrases,
            "caption": record.caption,
            "masks": mask_t,
            "token_masks": coverage,
            "token_labels": labels,
            "frame_indices": torch.from_numpy(indices),
            "clip_id": record.id or f"line{record.line}",
            "index": index,
        }


def _pad_stack(tensors: list[torch.Tensor], n_max: int, fill: float | bool = 0) -> torch.Tensor:
    """Stack ``(N_i, ...)`` tensors into ``(B, n_max, ...)`` padding missing subjects with ``fill``."""
    shape = tensors[0].shape[1:]
    if any(t.shape[1:] != shape for t in tensors):
        raise ValueError(f"cannot batch per-subject tensors of shapes {[tuple(t.shape) for t in tensors]}")
    out = torch.full((len(tensors), n_max, *shape), fill, dtype=tensors[0].dtype)
    for b, t in enumerate(tensors):
        out[b, : t.shape[0]] = t
    return out


def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items with different numbers of subjects.

    Per-subject tensors are padded to the largest subject count ``N`` of the batch and ``subject_valid`` (B, N)
    marks the real ones; ``phrases`` is padded with ``""``. Returns ``video`` (B, 3, F, H, W) (or ``latents``),
    ``ref_images`` (B, N, 3, h, w) (or ``ref_latents`` (B, N, C, 1, h', w')), ``masks`` (B, N, F, H, W),
    ``token_masks`` (B, N, F_tok, H_tok, W_tok), ``token_labels`` (B, L), ``subject_valid``, ``num_subjects`` (B,),
    ``phrases``, ``caption``, ``clip_id``, ``frame_indices`` (B, F) and ``index`` (B,).
    """
    if not batch:
        raise ValueError("`batch` is empty")
    counts = [len(item["phrases"]) for item in batch]
    n_max = max(counts)
    out: dict[str, Any] = {
        "num_subjects": torch.tensor(counts, dtype=torch.long),
        "subject_valid": torch.arange(n_max)[None] < torch.tensor(counts)[:, None],
        "phrases": [list(item["phrases"]) + [""] * (n_max - len(item["phrases"])) for item in batch],
        "caption": [item["caption"] for item in batch],
        "clip_id": [item["clip_id"] for item in batch],
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
    }
    for key in ("video", "latents", "frame_indices", "token_labels"):
        if key in batch[0]:
            shapes = {tuple(item[key].shape) for item in batch}
            if len(shapes) != 1:
                raise ValueError(f"cannot batch {key!r} of different shapes {sorted(shapes)}")
            out[key] = torch.stack([item[key] for item in batch])
    if "ref_images" in batch[0]:
        out["ref_images"] = _pad_stack([torch.stack(item["ref_images"]) for item in batch], n_max)
    if "ref_latents" in batch[0]:
        out["ref_latents"] = _pad_stack([item["ref_latents"] for item in batch], n_max)
    out["masks"] = _pad_stack([item["masks"] for item in batch], n_max, False)
    out["token_masks"] = _pad_stack([item["token_masks"] for item in batch], n_max, 0.0)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Latent cache

CACHE_FORMAT = "diasr-latent-cache"
# v2: entries keyed by record content instead of manifest line (v1 served other clips' latents after an edit).
CACHE_VERSION = 2


def _file_identity(path: Path | None) -> list[Any] | None:
    """``[size, mtime_ns]`` of a file, or of every PNG in a mask folder: cheap, and changes when the file does."""
    if path is None:
        return None
    try:
        if path.is_dir():
            return [[p.name, *_file_identity(p)] for p in MaskTrack(kind="png_dir", path=path)._png_files()]
        stat = path.stat()
    except OSError:
        return ["missing"]
    return [stat.st_size, stat.st_mtime_ns]


def _cache_key(record: ClipRecord) -> str:
    """A content key for a record: what its cached tensors depend on, not where it sits in the manifest."""
    content = {
        "id": record.id,
        "caption": record.caption,
        "frames": [record.frame_start, record.frame_end],
        "video": _file_identity(record.video),
        "subjects": [
            {
                "phrase": s.phrase,
                "references": [[_file_identity(r.image), _file_identity(r.mask)] for r in s.references],
                "masks": [s.masks.kind, s.masks.key, _file_identity(s.masks.path), s.masks.rle],
            }
            for s in record.subjects
        ],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _describe(record: ClipRecord) -> str:
    return f"manifest line {record.line}" + (f" (id {record.id!r})" if record.id else "")


def dataset_cache_config(dataset: MuSADataset) -> dict[str, Any]:
    """The dataset settings a cache depends on (a cache is only valid for a dataset with the same values)."""
    return {
        "num_frames": dataset.num_frames,
        "height": dataset.height,
        "width": dataset.width,
        "frame_stride": dataset.frame_stride,
        "ref_size": list(dataset.ref_size),
        "clip_sampling": dataset.clip_sampling,
        "crop": dataset.crop,
        "temporal_compression": dataset.temporal_compression,
        "spatial_compression": dataset.spatial_compression,
        "patch_size": list(dataset.patch_size),
        "label_threshold": dataset.label_threshold,
        "seed": dataset.seed,
    }


def _vae_signature(vae: Any, weights: bool = True) -> dict[str, Any]:
    """What a cache's latents depend on beyond the dataset settings: written to ``index.json``, checked on reuse.

    ``config_sha256`` covers the whole VAE config (architecture, ``latents_mean`` / ``latents_std``), so two VAEs
    with the same latent layout but another normalisation are told apart; ``weights_sha256`` covers every weight
    (name, dtype, shape, bytes), so two VAEs of one config with other weights (another checkpoint, a fine-tune) are
    too. Hashing reads each weight once (about a second for Wan2.1's VAE).
    """
    cfg = vae.config
    signature = {k: getattr(cfg, k, None) for k in ("z_dim", "scale_factor_temporal", "scale_factor_spatial")}
    public = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    signature["config_sha256"] = hashlib.sha256(
        json.dumps(public, sort_keys=True, default=str).encode("utf-8")
    ).hexdigest()
    if weights:
        signature["weights_sha256"] = weights_sha256(vae)
    return signature


def weights_sha256(module: Any) -> str:
    """SHA-256 of a module's ``state_dict``: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


class LatentCacheDataset(Dataset):
    """Items read from a folder written by :func:`cache_latents` (``index.json`` + one ``.safetensors`` per clip).

    Usable alone (``LatentCacheDataset(dir)[i]``) or through ``MuSADataset(..., latent_cache=dir)``.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"`cache_dir` {self.cache_dir} has no index.json; run `diasr cache-latents` first")
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{index_path} is not valid JSON ({err}); re-run `diasr cache-latents`") from err
        if not isinstance(self.index, dict) or self.index.get("format") != CACHE_FORMAT:
            raise ValueError(f"{index_path} is not a {CACHE_FORMAT} index; re-run `diasr cache-latents`")
        if self.index.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{index_path} is a {CACHE_FORMAT} v{self.index.get('version')} index, this version reads "
                f"v{CACHE_VERSION}; re-run `diasr cache-latents` (with --overwrite)"
            )
        entries = self.index.get("entries")
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("file"), str) for e in entries
        ):
            raise ValueError(f"{index_path}: `entries` must be a list of {{key, file}} objects; re-run cache-latents")
        for e in entries:
            # A cache file name is ours (a bare name): an edited index cannot point the reader elsewhere.
            if Path(e["file"]).name != e["file"] or e["file"] in (".", ".."):
                raise ValueError(f"{index_path}: entry file {e['file']!r} is not a file name inside the cache")
        self.entries: list[dict[str, Any]] = entries
        self._by_key = {e["key"]: e for e in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    def check_compatible(self, dataset: MuSADataset) -> None:
        want, have = dataset_cache_config(dataset), self.index["config"]
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(f"latent cache {self.cache_dir} was written with other settings (cache, dataset): {diff}")
        missing = [r for r in dataset.records if _cache_key(r) not in self._by_key]
        if missing:
            cached_ids = {e.get("id") for e in self.entries if e.get("id")}
            first = missing[0]
            why = (
                "its caption, phrases, frame range or files changed since caching"
                if first.id and first.id in cached_ids
                else "it is not in the cache, or its files changed since caching"
            )
            more = f" and {len(missing) - 1} more record(s)" if len(missing) > 1 else ""
            raise ValueError(
                f"latent cache {self.cache_dir} does not match {_describe(first)}{more}: {why}; re-run "
                "`diasr cache-latents` for this manifest"
            )

    def check_vae(self, vae: Any) -> None:
        """Refuse a cache written with a VAE of another latent layout than ``vae`` (its latents would not fit)."""
        written = self.index.get("vae", {})
        # Not the weights' hash: training may load the cache's VAE in another dtype; the layout is what must fit.
        layout = _vae_signature(vae, weights=False)
        diff = {k: (written.get(k), v) for k, v in layout.items() if written.get(k) != v}
        if diff:
            raise ValueError(f"latent cache {self.cache_dir} was written with another VAE (cache, model): {diff}")

    def _load(self, entry: dict[str, Any]) -> dict[str, Any]:
        from safetensors import safe_open

        path = self.cache_dir / entry["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for truncated or foreign files
            raise ValueError(f"latent cache file {path} is unreadable ({err}); re-run `diasr cache-latents`") from err
        if meta.get("key", entry["key"]) != entry["key"]:
            # index.json and the file disagree (a file copied from another cache): never serve another clip.
            raise ValueError(f"latent cache file {path} belongs to another record; re-run `diasr cache-latents`")
        return {
            "latents": tensors["latents"],
            "ref_latents": tensors["ref_latents"],
            "masks": tensors["masks"].bool(),
            "token_masks": tensors["token_masks"],
            "token_labels": tensors["token_labels"],
            "frame_indices": tensors["frame_indices"],
            "phrases": json.loads(meta["phrases"]),
            "caption": meta["caption"],
            "clip_id": meta["clip_id"],
        }

    def get(self, record: ClipRecord) -> dict[str, Any]:
        entry = self._by_key.get(_cache_key(record))
        if entry is None:
            raise KeyError(
                f"{_describe(record)} is not in latent cache {self.cache_dir} (or its files changed since caching); "
                "re-run `diasr cache-latents`"
            )
        return self._load(entry)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._load(self.entries[index])
        item["index"] = index
        return item


def _cached_with(path: Path, config_json: str, writer_json: str, key: str) -> bool:
    """True if ``path`` is a finished cache file of this record written with the same dataset settings, VAE and
    storage dtype (resume after a crash)."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a corrupt file is simply rewritten
        return False
    return meta.get("config") == config_json and meta.get("writer") == writer_json and meta.get("key") == key


def _is_cache_file(name: str) -> bool:
    return name.endswith(".safetensors") and name.startswith(("clip_", "line_"))


def cache_latents(
    dataset: MuSADataset,
    vae: Any,
    out_dir: str | os.PathLike,
    *,
    storage_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every item of ``dataset`` with a Wan VAE and store it under ``out_dir``; returns ``index.json``'s path.

    Each clip becomes ``clip_<content key>.safetensors`` (tensors ``latents`` (C, F_lat, H_lat, W_lat), ``ref_latents``
    (N, C, 1, h_lat, w_lat), the masks and token targets; caption and phrases in the metadata), written atomically;
    ``index.json`` is written last. A clip whose file already exists is kept (an interrupted run resumes) unless
    ``overwrite``. The dataset's draws for epoch 0 are frozen into the cache: build it with ``clip_sampling="start"``
    or ``"center"``, ``crop="center"`` and ``ref_augment=None`` unless you want one fixed random draw.

    Example::

        vae = AutoencoderKLWan.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", subfolder="vae")
        ds = MuSADataset("data/manifest.jsonl", num_frames=33, height=480, width=832, clip_sampling="start",
                         crop="center")
        cache_latents(ds, vae, "data/latents")
        train_ds = MuSADataset("data/manifest.jsonl", num_frames=33, height=480, width=832, clip_sampling="start",
                               crop="center", latent_cache="data/latents")
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ._io import atomic_path, atomic_write_text

    if not isinstance(dataset, MuSADataset):
        raise TypeError(f"`dataset` must be a MuSADataset, got {type(dataset).__name__}")
    if dataset.latent_cache is not None:
        raise ValueError("`dataset` already reads from a latent cache; pass one that decodes videos")
    if not hasattr(vae, "encode") or not hasattr(vae, "config"):
        raise TypeError(f"`vae` must be a Diffusers AutoencoderKLWan (or compatible), got {type(vae).__name__}")
    if not isinstance(storage_dtype, torch.dtype) or not storage_dtype.is_floating_point:
        raise TypeError(f"`storage_dtype` must be a floating torch dtype, got {storage_dtype!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out_dir` {out} is a file; give a folder for the cache")
    config = dataset_cache_config(dataset)
    vae_cfg = vae.config
    vae_info = {
        "class": type(vae).__name__,
        **_vae_signature(vae),
        "normalized": getattr(vae_cfg, "latents_mean", None) is not None,
    }
    dtype_name = str(storage_dtype).replace("torch.", "")
    index_path = out / "index.json"
    if index_path.exists() and not overwrite:
        try:
            old = json.loads(index_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError, OSError):
            old = None
        if not isinstance(old, dict) or old.get("format") != CACHE_FORMAT:
            raise FileExistsError(f"`out_dir` {out} holds an index.json that is not a latent cache's; pass overwrite=True")
        if old.get("config") != config or old.get("vae", vae_info) != vae_info:
            raise FileExistsError(
                f"`out_dir` {out} holds a cache with other dataset settings or another VAE; pass overwrite=True"
            )
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    config_json = json.dumps(config, sort_keys=True)
    writer_json = json.dumps({"vae": vae_info, "storage_dtype": dtype_name}, sort_keys=True, default=str)
    previous_epoch = dataset.epoch
    dataset.set_epoch(0)
    try:
        for i in tqdm(range(len(dataset)), desc="caching latents", disable=not progress):
            record = dataset.records[i]
            key = _cache_key(record)
            file = f"clip_{key[:32]}.safetensors"
            entries.append({"key": key, "file": file, "line": record.line, "id": record.id,
                            "video": record.video.as_posix()})
            if not overwrite and _cached_with(out / file, config_json, writer_json, key):
                continue
            item = dataset[i]
            latents = encode_latents(vae, item["video"][None])[0]
            refs = torch.stack(item["ref_images"]).unsqueeze(2)  # (N, 3, 1, h, w): one latent frame per reference
            ref_latents = encode_latents(vae, refs)
            tensors = {
                "latents": latents.to(storage_dtype).contiguous(),
                "ref_latents": ref_latents.to(storage_dtype).contiguous(),
                "masks": item["masks"].to(torch.uint8).contiguous(),
                "token_masks": item["token_masks"].contiguous(),
                "token_labels": item["token_labels"].contiguous(),
                "frame_indices": item["frame_indices"].contiguous(),
            }
            metadata = {"caption": item["caption"], "phrases": json.dumps(item["phrases"]),
                        "clip_id": item["clip_id"], "line": str(record.line), "config": config_json, "key": key,
                        "writer": writer_json}
            with atomic_path(out / file) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)
    finally:
        dataset.set_epoch(previous_epoch)
    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "config": config,
        "vae": vae_info,
        "storage_dtype": dtype_name,
        "entries": entries,
    }
    atomic_write_text(index_path, json.dumps(index, indent=1))
    # Files of records that left the manifest (or changed) would otherwise pile up forever.
    kept = {e["file"] for e in entries}
    for stale in out.iterdir():
        if _is_cache_file(stale.name) and stale.name not in kept and stale.is_file():
            stale.unlink(missing_ok=True)
    return index_path
