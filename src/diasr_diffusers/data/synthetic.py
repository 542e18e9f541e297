"""Synthetic multi-subject videos with exact masks: the test data for training and for routing quality.

Each clip shows 1-4 distinct textured sprites (shape x color x pattern) moving, rotating and occluding each other over
a panning background. Masks are exact and occlusion-aware (a pixel belongs to the top-most sprite covering it).
Each sprite's reference image is rendered alone on white at a different rotation and scale than anywhere in the clip,
and the caption names each sprite by a phrase such as "the striped red star".

Colour alone is not a shortcut for routing: in about half of the multi-subject clips two sprites share a color (and
differ by shape and/or pattern), and in some clips two share a shape (and differ by color).

Usage::

    from diasr_diffusers.data import make_synthetic, MuSADataset

    manifest = make_synthetic("data/synth", num_clips=64, seed=0, subjects=(1, 4), num_frames=17, height=64, width=64)
    dataset = MuSADataset(manifest, num_frames=17, height=64, width=64)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..utils.output_paths import OutputPathError, check_outputs, claim_outputs
from ._io import atomic_path, atomic_write_bytes, npz_bytes, write_video
from .manifest import write_manifest

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 205, 30),
    "purple": (145, 60, 200),
    "orange": (245, 135, 30),
    "cyan": (30, 200, 210),
    "pink": (240, 120, 180),
}
PATTERNS = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = {
    "linear": "a soft gradient background",
    "radial": "a radial gradient background",
    "noise": "a blotchy textured background",
}
MAX_SUBJECTS = 4
# Probabilities of forcing two sprites of a clip to share a color / a shape (they always differ somewhere).
SHARE_COLOR_P = 0.5
SHARE_SHAPE_P = 0.3
REFERENCE_RADIUS = 0.45  # a reference sprite's radius, as a fraction of the reference image's side


@dataclass(frozen=True)
class SpriteSpec:
    shape: str
    color: str
    pattern: str

    @property
    def phrase(self) -> str:
        return f"the {self.pattern} {self.color} {self.shape}"


@dataclass
class SyntheticClip:
    """One rendered clip. ``frames`` (F, H, W, 3) uint8, ``masks`` (N, F, H, W) bool, ``references`` N x (R, R, 3)
    uint8 on white with ``reference_masks`` N x (R, R) bool; ``depth[i]`` is sprite i's layer (0 = back)."""

    sprites: list[SpriteSpec]
    frames: np.ndarray
    masks: np.ndarray
    references: list[np.ndarray]
    reference_masks: list[np.ndarray]
    caption: str
    background: str
    depth: list[int]
    centers: np.ndarray  # (N, F, 2) sprite centre (x, y) in pixels
    angles: np.ndarray  # (N, F) rotation in degrees, for checking that references use another pose
    reference_angles: list[float]
    radii: np.ndarray  # (N,) sprite radius in the clip, pixels
    reference_radius: float

    @property
    def phrases(self) -> list[str]:
        return [s.phrase for s in self.sprites]


# ---------------------------------------------------------------------------------------------------------------------
# Shapes and patterns in a sprite's local frame: (u, v) in [-1, 1]^2, unit = the sprite's radius.


def _half_planes(u: np.ndarray, v: np.ndarray, angles_deg: Sequence[float], dist: float) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for a in np.deg2rad(angles_deg):
        inside &= u * math.cos(a) + v * math.sin(a) <= dist
    return inside


def _star(u: np.ndarray, v: np.ndarray, outer: float = 0.97, inner: float = 0.42) -> np.ndarray:
    rho = np.hypot(u, v)
    # Fold the angle into one half-spike [0, 36 deg], point up (-v is up in image coordinates).
    theta = np.mod(np.arctan2(u, -v), 2 * math.pi / 5)
    theta = np.minimum(theta, 2 * math.pi / 5 - theta)
    x, y = rho * np.cos(theta), rho * np.sin(theta)
    p1 = np.array([outer, 0.0])
    p2 = np.array([inner * math.cos(math.pi / 5), inner * math.sin(math.pi / 5)])
    ex, ey = p2 - p1
    # Inside when on the same side of the edge p1->p2 as the origin.
    side = ex * (y - p1[1]) - ey * (x - p1[0])
    origin_side = ex * (0 - p1[1]) - ey * (0 - p1[0])
    return side * origin_side >= 0


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test of ``shape`` at local coordinates ``(u, v)`` (all shapes fit in the unit disk)."""
    if shape == "circle":
        return u * u + v * v <= 0.92**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.7
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 0.97
    if shape == "triangle":
        return _half_planes(u, v, (90.0, 210.0, 330.0), 0.48)
    if shape == "hexagon":
        return _half_planes(u, v, (0.0, 60.0, 120.0, 180.0, 240.0, 300.0), 0.85)
    if shape == "star":
        return _star(u, v)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.92))
    if shape == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the pattern's second (dark) color shows, in local coordinates (so the pattern turns with the sprite)."""
    if pattern == "solid":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "striped":
        return np.mod(u + 10.0, 0.6) < 0.3
    if pattern == "checkered":
        return (np.floor((u + 10.0) / 0.5) + np.floor((v + 10.0) / 0.5)).astype(np.int64) % 2 == 1
    if pattern == "dotted":
        du = np.mod(u + 10.0, 0.55) - 0.275
        dv = np.mod(v + 10.0, 0.55) - 0.275
        return du * du + dv * dv <= 0.15**2
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def _sprite_colors(spec: SpriteSpec) -> tuple[np.ndarray, np.ndarray]:
    base = np.array(COLORS[spec.color], dtype=np.float64)
    return base.astype(np.uint8), (base * 0.4).round().astype(np.uint8)


def _render_sprite(
    spec: SpriteSpec, height: int, width: int, cx: float, cy: float, radius: float, angle_deg: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """``(bbox slices, inside mask, RGB)`` of a sprite at a pose; only its bounding box is evaluated."""
    y0, y1 = max(0, int(math.floor(cy - radius))), min(height, int(math.ceil(cy + radius)) + 1)
    x0, x1 = max(0, int(math.floor(cx - radius))), min(width, int(math.ceil(cx + radius)) + 1)
    ys = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy) / radius
    xs = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx) / radius
    dy, dx = np.meshgrid(ys, xs, indexing="ij")
    a = math.radians(angle_deg)
    u = math.cos(a) * dx + math.sin(a) * dy
    v = -math.sin(a) * dx + math.cos(a) * dy
    inside = shape_mask(spec.shape, u, v)
    main, dark = _sprite_colors(spec)
    rgb = np.where(pattern_mask(spec.pattern, u, v)[..., None], dark, main)
    return (slice(y0, y1), slice(x0, x1)), inside, rgb


# ---------------------------------------------------------------------------------------------------------------------
# Backgrounds


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    return 0.45 * rng.uniform(40, 230, size=3) + 0.55 * rng.uniform(70, 190)


def _background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """A float (H, W, 3) background in [0, 255]."""
    if kind == "linear":
        c0, c1 = _muted_color(rng), _muted_color(rng)
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
        t = (math.cos(a) * xx + math.sin(a) * yy) / math.sqrt(2) * 0.5 + 0.5
        return c0 * (1 - t[..., None]) + c1 * t[..., None]
    if kind == "radial":
        c0, c1 = _muted_color(rng), _muted_color(rng)
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        yy, xx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
        t = np.clip(np.hypot(yy - cy, xx - cx) / (0.8 * max(height, width)), 0, 1)
        return c0 * (1 - t[..., None]) + c1 * t[..., None]
    if kind == "noise":
        cells = int(rng.integers(3, 7))
        grid = np.stack([_muted_color(rng) for _ in range(cells * cells)]).reshape(cells, cells, 3)
        img = Image.fromarray(grid.round().clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        fine = rng.normal(0.0, 6.0, size=(height, width, 1))
        return np.asarray(img, dtype=np.float64) + fine
    raise ValueError(f"unknown background {kind!r}; expected one of {list(BACKGROUNDS)}")


# ---------------------------------------------------------------------------------------------------------------------
# Clips


def _sample_sprites(rng: np.random.Generator, n: int) -> list[SpriteSpec]:
    shapes = list(rng.choice(SHAPES, size=n, replace=False))
    colors = list(rng.choice(list(COLORS), size=n, replace=n > len(COLORS)))
    patterns = list(rng.choice(PATTERNS, size=n, replace=True))
    if n >= 2:
        r = rng.random()
        i, j = (int(k) for k in rng.choice(n, size=2, replace=False))
        if r < SHARE_COLOR_P:
            colors[j] = colors[i]
        elif r < SHARE_COLOR_P + SHARE_SHAPE_P:
            shapes[j] = shapes[i]
            if colors[j] == colors[i]:
                colors[j] = next(c for c in COLORS if c != colors[i])
    specs = [SpriteSpec(str(s), str(c), str(p)) for s, c, p in zip(shapes, colors, patterns)]
    # Sprites must be distinguishable; fix duplicates by changing the pattern (cannot loop: 4 patterns, <= 4 sprites).
    for k in range(n):
        while any(specs[k] == specs[m] for m in range(k)):
            specs[k] = SpriteSpec(specs[k].shape, specs[k].color, PATTERNS[(PATTERNS.index(specs[k].pattern) + 1) % 4])
    return specs


def _caption(rng: np.random.Generator, phrases: list[str], background: str) -> str:
    if len(phrases) == 1:
        listed, verb, verb2 = phrases[0], "moves", "drifts"
    else:
        listed, verb, verb2 = ", ".join(phrases[:-1]) + " and " + phrases[-1], "move", "drift"
    bg = BACKGROUNDS[background]
    templates = [
        f"{listed} {verb} across {bg}.",
        f"A video of {listed} moving over {bg}.",
        f"{listed} slowly {verb2} and turns in front of {bg}." if len(phrases) == 1 else
        f"{listed} slowly {verb2}, turn and pass each other in front of {bg}.",
    ]
    text = templates[int(rng.integers(len(templates)))]
    return text[0].upper() + text[1:]


def _angle_gap(a: float, b: np.ndarray) -> np.ndarray:
    return np.abs((b - a + 180.0) % 360.0 - 180.0)


# Bounds on the generator's geometry: far above any useful toy set, far below what would exhaust memory.
MAX_SIDE = 4096
MAX_CLIP_BYTES = 2 * 2**30
MAX_CLIPS = 1_000_000


def render_clip(
    seed: int,
    index: int = 0,
    *,
    num_subjects: int | None = None,
    subjects: tuple[int, int] = (1, 4),
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    ref_size: int | None = None,
) -> SyntheticClip:
    """Render clip ``index`` of the synthetic set with ``seed`` (in memory; nothing is written).

    Clip ``i`` depends only on ``(seed, i)``, so a larger set starts with the clips of a smaller one.

    Args:
        num_subjects: exact number of sprites; if None, drawn uniformly from the ``subjects`` range (inclusive).
        ref_size: side of the square reference images (default: ``max(64, min(height, width))``).
    """
    lo, hi = subjects
    if not 1 <= lo <= hi <= MAX_SUBJECTS:
        raise ValueError(f"`subjects` must be a range (lo, hi) with 1 <= lo <= hi <= {MAX_SUBJECTS}, got {subjects}")
    if num_subjects is not None and not 1 <= num_subjects <= MAX_SUBJECTS:
        raise ValueError(f"`num_subjects` must be in [1, {MAX_SUBJECTS}], got {num_subjects}")
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width), ("seed", seed),
                        ("index", index)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"`{name}` must be an integer, got {value!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"`seed` and `index` must be >= 0, got {seed} and {index}")
    if num_frames < 1:
        raise ValueError(f"`num_frames` must be >= 1, got {num_frames}")
    if height < 16 or width < 16:
        raise ValueError(f"`height` and `width` must be >= 16, got {height}x{width}")
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"`height` and `width` must be <= {MAX_SIDE}, got {height}x{width}")
    if num_frames * height * width * 3 > MAX_CLIP_BYTES:
        # Caught here rather than as a MemoryError (or a machine swapping for minutes) inside numpy.
        raise ValueError(
            f"a {num_frames}x{height}x{width} clip needs {num_frames * height * width * 3 / 2**30:.1f} GiB of frames "
            f"(limit {MAX_CLIP_BYTES / 2**30:.0f} GiB): lower `num_frames`, `height` or `width`"
        )
    ref_size = ref_size or max(64, min(height, width))
    if not 16 <= ref_size <= MAX_SIDE:
        raise ValueError(f"`ref_size` must be in [16, {MAX_SIDE}], got {ref_size}")

    rng = np.random.default_rng([int(seed), int(index)])
    n = num_subjects or int(rng.integers(lo, hi + 1))
    sprites = _sample_sprites(rng, n)
    background = str(rng.choice(list(BACKGROUNDS)))
    caption = _caption(rng, [s.phrase for s in sprites], background)
    short = min(height, width)
    margin = max(2, short // 8)
    bg_full = _background(rng, background, height + 2 * margin, width + 2 * margin)
    pan = rng.uniform(-1, 1, size=2) * margin  # total background shift over the clip, pixels

    # Sample a layout until every sprite is visible in most frames (occlusion is wanted, vanishing is not).
    for _attempt in range(100):
        radii = rng.uniform(0.13, 0.22, size=n) * short
        pos = np.stack([rng.uniform(radii, width - radii), rng.uniform(radii, height - radii)], axis=1)
        speed = rng.uniform(0.2, 0.7, size=n) * short / max(num_frames - 1, 1)
        heading = rng.uniform(0, 2 * math.pi, size=n)
        vel = np.stack([np.cos(heading), np.sin(heading)], axis=1) * speed[:, None]
        angle0 = rng.uniform(0, 360, size=n)
        spin = rng.uniform(-120, 120, size=n) / max(num_frames - 1, 1)
        depth = [int(d) for d in rng.permutation(n)]
        centers = np.zeros((n, num_frames, 2))
        p = pos.copy()
        for t in range(num_frames):
            centers[:, t] = p
            p = p + vel
            # Bounce off the borders so sprites stay in view.
            for axis, limit in ((0, width), (1, height)):
                low, high = p[:, axis] < radii, p[:, axis] > limit - radii
                vel[low | high, axis] *= -1
                p[:, axis] = np.clip(p[:, axis], radii, limit - radii)
        angles = angle0[:, None] + spin[:, None] * np.arange(num_frames)[None]

        frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
        labels = np.full((num_frames, height, width), -1, dtype=np.int8)
        order = sorted(range(n), key=lambda i: depth[i])  # back to front
        for t in range(num_frames):
            oy, ox = (np.array([margin, margin]) + pan[::-1] * (t / max(num_frames - 1, 1))).round().astype(int)
            canvas = bg_full[oy : oy + height, ox : ox + width].round().clip(0, 255).astype(np.uint8)
            for i in order:
                box, inside, rgb = _render_sprite(
                    sprites[i], height, width, centers[i, t, 0], centers[i, t, 1], radii[i], angles[i, t]
                )
                canvas[box][inside] = rgb[inside]
                labels[t][box][inside] = i
            frames[t] = canvas
        masks = labels[None] == np.arange(n, dtype=np.int8)[:, None, None, None]
        visible_frames = masks.any(axis=(2, 3)).mean(axis=1)
        if (visible_frames >= 0.75).all():
            break
    else:  # pragma: no cover - with <= 4 sprites a layout is found within a few tries
        raise RuntimeError(f"could not lay out clip {index} of seed {seed} with every sprite visible")

    # References: alone on white, larger than in the clip and turned by >= 30 degrees from every clip pose.
    references, reference_masks, reference_angles = [], [], []
    ref_radius = REFERENCE_RADIUS * ref_size
    for i, spec in enumerate(sprites):
        for _ in range(1000):
            a = float(rng.uniform(0, 360))
            if _angle_gap(a, angles[i]).min() >= 30.0:
                break
        ref, ref_mask = render_reference(spec, ref_size, a)
        references.append(ref)
        reference_masks.append(ref_mask)
        reference_angles.append(a)
    return SyntheticClip(
        sprites=sprites,
        frames=frames,
        masks=masks,
        references=references,
        reference_masks=reference_masks,
        caption=caption,
        background=background,
        depth=depth,
        centers=centers,
        angles=angles,
        reference_angles=reference_angles,
        radii=radii,
        reference_radius=ref_radius,
    )


def render_reference(spec: SpriteSpec, size: int = 64, angle_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A sprite's reference image as ``make-synthetic`` draws it: alone on white, centred, radius 0.45 x ``size``.

    Returns ``(image (size, size, 3) uint8, mask (size, size) bool)``.
    """
    if not isinstance(spec, SpriteSpec):
        raise TypeError(f"`spec` must be a SpriteSpec, got {type(spec).__name__}")
    if spec.shape not in SHAPES or spec.color not in COLORS or spec.pattern not in PATTERNS:
        raise ValueError(f"`spec` must use SHAPES, COLORS and PATTERNS, got {spec}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 16 <= size <= MAX_SIDE:
        raise ValueError(f"`size` must be an integer in [16, {MAX_SIDE}], got {size!r}")
    box, inside, rgb = _render_sprite(spec, size, size, size / 2, size / 2, REFERENCE_RADIUS * size, angle_deg)
    ref = np.full((size, size, 3), 255, dtype=np.uint8)
    mask = np.zeros((size, size), dtype=bool)
    ref[box][inside] = rgb[inside]
    mask[box] = inside
    return ref, mask


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


_OUTPUT_ENTRIES = ("manifest.jsonl", "videos", "masks", "refs")
# The files make_synthetic writes, relative to its folder; group 1 is the clip index.
_OUTPUT_FILE = re.compile(
    r"(?:videos/clip_(\d{6})\.mp4|masks/clip_(\d{6})\.npz|masks/clip_(\d{6})_s\d+/\d{5}\.png"
    r"|refs/clip_(\d{6})_s\d+(?:_mask)?\.png)"
)


def _check_not_overwriting(out: Path, num_clips: int, overwrite: bool) -> None:
    """Refuse (``FileExistsError``) files this run would replace that diasr did not write, e.g. a folder holding
    ``videos/clip_000000.mp4`` of another origin but no manifest."""
    if not out.is_dir():
        return
    existing = []
    for sub in _OUTPUT_ENTRIES[1:]:
        for root, _, files in os.walk(out / sub):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), out).replace(os.sep, "/")
                match = _OUTPUT_FILE.fullmatch(rel)
                if match and int(next(g for g in match.groups() if g is not None)) < num_clips:
                    existing.append(("`out_dir`", out / rel))
    try:
        check_outputs(existing, overwrite=overwrite, flag="`out_dir`",
                      overwrite_hint="pass overwrite=True (`--overwrite`) to replace it")
    except OutputPathError as err:
        raise FileExistsError(str(err)) from None


def make_synthetic(
    out_dir: str | os.PathLike,
    num_clips: int,
    seed: int = 0,
    subjects: tuple[int, int] = (1, 4),
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    *,
    fps: float = 8.0,
    ref_size: int | None = None,
    mask_format: str = "npz",
    crf: int = 12,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic multi-subject dataset in the manifest format; returns the path of ``manifest.jsonl``.

    Layout: ``videos/clip_XXXXXX.mp4``, ``masks/clip_XXXXXX.npz`` (arrays ``s0``, ``s1``, ... of shape (F, H, W))
    or ``masks/clip_XXXXXX_sJ/NNNNN.png`` with ``mask_format="png"``, ``refs/clip_XXXXXX_sJ.png`` (+ ``_mask.png``),
    and ``manifest.jsonl`` (written last, atomically). Same seed -> byte-identical masks, references and manifest.

    Args:
        out_dir: output folder (created). Refuses a folder that already has a manifest unless ``overwrite``.
        num_clips: number of clips (>= 1).
        seed: clip ``i`` depends only on ``(seed, i)``.
        subjects: inclusive range of sprites per clip, within [1, 4].
        num_frames, height, width: clip geometry (Wan-style ``1 + 4k`` frames suit the dataset defaults).
        fps: frame rate stored in the mp4 and the manifest.
        ref_size: side of the square reference images.
        mask_format: ``"npz"`` or ``"png"``.
        crf: H.264 quality of the mp4 (lower = closer to the rendered frames).
    """
    if isinstance(num_clips, bool) or not isinstance(num_clips, int) or not 1 <= num_clips <= MAX_CLIPS:
        raise ValueError(f"`num_clips` must be an integer in [1, {MAX_CLIPS}], got {num_clips!r}")
    if mask_format not in ("npz", "png"):
        raise ValueError(f"`mask_format` must be 'npz' or 'png', got {mask_format!r}")
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or not 0 < fps <= 1000:
        raise ValueError(f"`fps` must be a number in (0, 1000], got {fps!r}")
    out = Path(out_dir)
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"`out_dir` {out}: {parent} is a file, not a folder")
            break
    manifest_path = out / "manifest.jsonl"
    if manifest_path.exists() and not overwrite:
        raise FileExistsError(f"`out_dir` {out} already holds a manifest.jsonl; pass overwrite=True (`--overwrite`) to replace it")
    # Fail on bad geometry before writing anything.
    render_clip(seed, 0, num_subjects=subjects[0], subjects=subjects, num_frames=1, height=height, width=width,
                ref_size=ref_size)
    _check_not_overwriting(out, num_clips, overwrite)

    records: list[dict[str, Any]] = []
    for i in range(num_clips):
        clip = render_clip(
            seed, i, subjects=subjects, num_frames=num_frames, height=height, width=width, ref_size=ref_size
        )
        clip_id = f"clip_{i:06d}"
        if i == 0:  # the first clip passed every check: from now on the folder's entries are ours
            claim_outputs([out / name for name in _OUTPUT_ENTRIES])
        write_video(out / "videos" / f"{clip_id}.mp4", clip.frames, fps=fps, crf=crf)
        if mask_format == "npz":
            atomic_write_bytes(
                out / "masks" / f"{clip_id}.npz", npz_bytes({f"s{j}": m for j, m in enumerate(clip.masks)})
            )
        subject_records = []
        for j, spec in enumerate(clip.sprites):
            ref_path = out / "refs" / f"{clip_id}_s{j}.png"
            ref_mask_path = out / "refs" / f"{clip_id}_s{j}_mask.png"
            _write_png(ref_path, clip.references[j])
            _write_png(ref_mask_path, clip.reference_masks[j].astype(np.uint8) * 255)
            if mask_format == "npz":
                masks_entry: dict[str, Any] = {"npz": f"masks/{clip_id}.npz", "key": f"s{j}"}
            else:
                mask_dir = out / "masks" / f"{clip_id}_s{j}"
                for t, m in enumerate(clip.masks[j]):
                    _write_png(mask_dir / f"{t:05d}.png", m.astype(np.uint8) * 255)
                masks_entry = {"png_dir": f"masks/{clip_id}_s{j}"}
            subject_records.append(
                {
                    "phrase": spec.phrase,
                    "references": [{"image": f"refs/{clip_id}_s{j}.png", "mask": f"refs/{clip_id}_s{j}_mask.png"}],
                    "masks": masks_entry,
                    "meta": {"shape": spec.shape, "color": spec.color, "pattern": spec.pattern,
                             "depth": clip.depth[j]},
                }
            )
        records.append(
            {
                "id": clip_id,
                "video": f"videos/{clip_id}.mp4",
                "caption": clip.caption,
                "fps": fps,
                "frame_start": 0,
                "frame_end": num_frames,
                "subjects": subject_records,
                "meta": {"generator": "diasr-synthetic", "seed": seed, "index": i, "background": clip.background},
            }
        )
    write_manifest(manifest_path, records)
    return manifest_path
