"""The toy-scale proof of DiasR's claim: routed references keep identities apart where dense references mix them.

For each held-out clip and each noise level σ, the clip's video is encoded to latents (as ``diasr train`` does),
noised to σ with a seeded generator (the same noise for every method) and sampled back to clean with the same
steps by every method:

- ``router``: the DiasR model with its trained router,
- ``similarity``: the DiasR model with training-free similarity routing,
- ``masks``: the DiasR model routed by the clip's ground-truth layout masks,
- ``dense``: the Phantom-style dense baseline (its own pipeline folder: every video token sees every reference),
- ``no_refs``: the DiasR model without references (``dense_no_refs``: the dense model without them, opt-in).

Each subject's region in every decoded frame is cropped with its ground-truth mask and scored against every
reference of the clip by the sprite identity embedder (``diasr_diffusers.eval.sprites``): identity match, identity
similarity, attributes, leakage to the other subjects and attribute swaps between same-colour subjects. Also:
generation from pure noise with the layout masks, the routing IoU of the router, and how many held-out subject
combinations occur in the training set. Means carry 95% bootstrap intervals over clips.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/toy_claim.py \\
        --routed runs/sprite_route/pipeline --dense runs/sprite_dense/pipeline \\
        --test-data runs/sprites_test --train-data runs/sprites_train --clips 16 \\
        --out runs/toy_claim --out-md docs/toy_model.md --strips docs/images/toy_claim

Deterministic given ``--seed``. ``--clips 16`` with the three σ takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from diasr_diffusers import DiasRPipeline
from diasr_diffusers.data import MuSADataset
from diasr_diffusers.data.dataset import load_reference
from diasr_diffusers.eval.routing import label_iou
from diasr_diffusers.eval.sprites import SpriteEmbedder, crop_subject, load_sprite_embedder, locate_subject
from diasr_diffusers.routing import token_grid_factors
from diasr_diffusers.utils.io import atomic_path, atomic_write_text
from diasr_diffusers.utils.latents import encode_latents
from diasr_diffusers.utils.visualization import overlay_routing_maps, routing_legend

SIGMAS = (0.6, 0.8, 0.95)
# Method name -> (which model, routing, with references). `dense_no_refs` is opt-in (--methods).
METHODS: dict[str, tuple[str, str | None, bool]] = {
    "router": ("routed", "router", True),
    "similarity": ("routed", "similarity", True),
    "masks": ("routed", "masks", True),
    "dense": ("dense", "dense", True),
    "no_refs": ("routed", None, False),
    "dense_no_refs": ("dense", None, False),
}
DEFAULT_METHODS = ("router", "similarity", "masks", "dense", "no_refs")
FULL_METHODS = ("masks", "dense")  # generation from pure noise: the layout masks' regions are where to look
LABELS = {
    "router": "DiasR, trained router",
    "similarity": "DiasR, similarity routing (training-free)",
    "masks": "DiasR, ground-truth layout masks",
    "dense": "dense baseline (Phantom-style)",
    "no_refs": "no references (DiasR model)",
    "dense_no_refs": "no references (dense model)",
    "ground_truth": "ground-truth frames (embedder ceiling)",
    "reconstruction": "VAE reconstruction (σ = 0 ceiling)",
}
# Row labels of the strips (PIL's built-in font has no "σ").
SHORT_LABELS = {
    "router": "DiasR router",
    "similarity": "DiasR similarity",
    "masks": "DiasR GT masks",
    "dense": "dense baseline",
    "no_refs": "no refs (DiasR)",
    "dense_no_refs": "no refs (dense)",
}
METRICS = ("id_acc", "id_sim", "attr_acc", "leak_sim", "swap_rate")
METRIC_HEADERS = {
    "id_acc": "identity match ↑",
    "id_sim": "identity sim ↑",
    "attr_acc": "attributes ↑",
    "leak_sim": "leakage sim ↓",
    "swap_rate": "attribute swaps ↓",
    "presence_sim": "best match anywhere ↑",
}
# From-noise runs and ceilings also get the mask-free search (where the embedder has one), on every other frame:
# it embeds a few hundred windows a frame, the costliest scoring there is.
FULL_METRICS = (*METRICS, "presence_sim")
PRESENCE_EVERY = 2
MARK_START, MARK_END = "<!-- toy_claim:start -->", "<!-- toy_claim:end -->"


# ---------------------------------------------------------------------------------------------------------------------
# The embedder


@dataclass
class Scorer:
    """The pieces of :mod:`diasr_diffusers.eval.sprites` the benchmark uses: the embedder (``embed``, ``predict``),
    ``crop_subject(frame, mask) -> (crop, crop_mask)`` and ``locate_subject`` (mask-free search)."""

    embedder: SpriteEmbedder
    crop_subject: Callable[..., tuple[np.ndarray, np.ndarray]] = crop_subject
    locate_subject: Callable[..., Any] = locate_subject

    @property
    def name(self) -> str:
        return f"{type(self.embedder).__module__}.{type(self.embedder).__name__}"


def load_embedder() -> Scorer:
    """The shipped sprite identity embedder (:func:`diasr_diffusers.eval.sprites.load_sprite_embedder`)."""
    return Scorer(load_sprite_embedder())


def _attribute(pred: dict[str, Any], name: str) -> Any:
    """An attribute label (``"shape"``, ``"color"``, ``"pattern"``) from a ``SpriteEmbedder.predict`` row."""
    return pred[name]


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def bootstrap_ci(
    values: Sequence[float], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float | int | None]:
    """Mean of ``values`` with a percentile bootstrap interval (resampling the values, i.e. clips).

    Returns ``{"mean", "low", "high", "n"}``; all ``None`` but ``n`` for no values. The same ``seed`` and ``n`` give
    the same resamples, so two methods scored on the same clips are resampled alike.
    """
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "n": int(len(x))}


def _seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (stable across runs and platforms)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


# ---------------------------------------------------------------------------------------------------------------------
# Scoring one video


@dataclass
class ClipData:
    """One held-out clip as the benchmark uses it."""

    index: int
    clip_id: str
    caption: str
    phrases: list[str]
    specs: list[dict[str, str]]  # shape / color / pattern per subject
    video: torch.Tensor  # (3, F, H, W) in [-1, 1]
    masks: torch.Tensor  # (N, F, H, W) bool
    token_labels: torch.Tensor  # (L,)
    references: list[np.ndarray]  # as the model saw them in training: fitted on white at the video size, uint8
    ref_embeddings: torch.Tensor | None = None  # (N, D), filled by run_claim

    @property
    def num_subjects(self) -> int:
        return len(self.phrases)

    @property
    def same_colour_pairs(self) -> list[tuple[int, int]]:
        pairs = itertools.permutations(range(self.num_subjects), 2)
        return [(i, j) for i, j in pairs if self.specs[i]["color"] == self.specs[j]["color"]]


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def score_frames(
    frames: np.ndarray, clip: ClipData, scorer: Scorer, min_pixels: int = 32, presence: bool = False
) -> dict[str, float | int | None]:
    """Identity scores of one decoded video ``(F, H, W, 3)`` uint8 at the clip's ground-truth subject regions.

    Every (subject, frame) whose mask has at least ``min_pixels`` pixels is cropped and embedded; the clip's scores
    are means over those crops (``None`` where undefined: matching and leakage need two subjects, swaps a pair of
    subjects sharing a colour). With ``presence`` (and an embedder that can search), also ``presence_sim``: each
    reference's best match anywhere in each frame, found without masks (``locate_subject``), so a model that puts
    a subject elsewhere than the layout says is not penalised for where, only for what.
    """
    masks = clip.masks.numpy()
    crops, crop_masks, owners = [], [], []
    for s, f in itertools.product(range(clip.num_subjects), range(frames.shape[0])):
        if masks[s, f].sum() >= min_pixels:
            crop, crop_mask = scorer.crop_subject(frames[f], masks[s, f])
            crops.append(crop)
            crop_masks.append(crop_mask)
            owners.append(s)
    out: dict[str, float | int | None] = {"crops": len(crops)}
    if presence:
        out["presence_sim"] = presence_similarity(frames, clip, scorer)
    if not crops:
        return out | {m: None for m in METRICS}
    sim = (scorer.embedder.embed(crops, crop_masks).float() @ clip.ref_embeddings.float().T).numpy()  # (K, N)
    preds = scorer.embedder.predict(crops, crop_masks)
    owners_arr = np.asarray(owners)
    own = sim[np.arange(len(owners)), owners_arr]
    out["id_sim"] = float(own.mean())
    if clip.num_subjects >= 2:
        others = np.where(np.eye(clip.num_subjects, dtype=bool)[owners_arr], -np.inf, sim)
        # Strictly more similar than every other reference: an embedder that cannot tell them apart scores 0.
        out["id_acc"] = float((own > others.max(1)).mean())
        out["leak_sim"] = float(others.max(1).mean())
    else:
        out["id_acc"] = out["leak_sim"] = None
    attrs = ("shape", "color", "pattern")
    correct = [all(_attribute(p, a) == clip.specs[s][a] for a in attrs) for p, s in zip(preds, owners)]
    out["attr_acc"] = float(np.mean(correct))
    swaps = []
    partners = {}
    for i, j in clip.same_colour_pairs:
        partners.setdefault(i, []).append(j)
    for p, s in zip(preds, owners):
        for j in partners.get(s, []):
            swapped = any(
                _attribute(p, a) == clip.specs[j][a] and clip.specs[j][a] != clip.specs[s][a]
                for a in ("shape", "pattern")
            )
            swaps.append(swapped)
    out["swap_rate"] = float(np.mean(swaps)) if swaps else None
    return out


def presence_similarity(frames: np.ndarray, clip: ClipData, scorer: Scorer) -> float | None:
    """Mean over frames (every ``PRESENCE_EVERY``-th) and references of the cosine of the best-matching window
    (``locate_subject``)."""
    sims = []
    for frame in frames[::PRESENCE_EVERY]:
        found = scorer.locate_subject(frame, clip.ref_embeddings, scorer.embedder)
        sims += [loc.similarity for loc in found]
    return _mean(sims)


def embed_references(clip: ClipData, records_subjects: Sequence[Any], scorer: Scorer) -> torch.Tensor:
    """Embeddings ``(N, D)`` of the clip's reference images (the raw reference, cropped with its mask)."""
    crops, crop_masks = [], []
    for subject in records_subjects:
        rgb, mask = load_reference(subject.references[0])
        if mask is None or not mask.any():
            mask = (rgb < 250).any(-1)  # sprites are rendered alone on white
        crop, crop_mask = scorer.crop_subject(rgb, mask)
        crops.append(crop)
        crop_masks.append(crop_mask)
    return scorer.embedder.embed(crops, crop_masks).float()


# ---------------------------------------------------------------------------------------------------------------------
# Novelty of the held-out combinations


def _manifest_specs(path: str | os.PathLike) -> list[list[tuple[str, str, str]]]:
    """(shape, color, pattern) of every subject of every clip of a make-synthetic manifest (read as JSON lines)."""
    path = Path(path)
    path = path / "manifest.jsonl" if path.is_dir() else path
    clips = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                clips.append([(s["meta"]["shape"], s["meta"]["color"], s["meta"]["pattern"]) for s in rec["subjects"]])
    return clips


def combination_novelty(test: Sequence[Sequence[tuple[str, str, str]]], train_manifest: str | os.PathLike) -> dict:
    """How many held-out subjects, pairs, same-colour pairs and whole subject sets occur in the training clips.

    A held-out pair "occurs" when some training clip has both subjects (shape, colour and pattern equal); a whole
    set when some training clip has all of its subjects.
    """
    train = [set(c) for c in _manifest_specs(train_manifest)]
    seen_subjects = set().union(*train) if train else set()

    def co_occurs(subjects: set) -> bool:
        return any(subjects <= clip for clip in train)

    subjects = [s for clip in test for s in clip]
    pairs = [(a, b) for clip in test for a, b in itertools.combinations(clip, 2)]
    same_colour = [(a, b) for a, b in pairs if a[1] == b[1]]
    multi = [set(clip) for clip in test if len(clip) >= 2]

    def fraction(items: list, test_fn: Callable[[Any], bool]) -> dict[str, Any]:
        hits = sum(test_fn(x) for x in items)
        return {"seen": hits, "total": len(items), "fraction": hits / len(items) if items else None}

    return {
        "train_clips": len(train),
        "subjects": fraction(subjects, lambda s: s in seen_subjects),
        "pairs": fraction(pairs, lambda p: co_occurs(set(p))),
        "same_colour_pairs": fraction(same_colour, lambda p: co_occurs(set(p))),
        "multi_subject_sets": fraction(multi, co_occurs),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Running the methods


@dataclass
class ClaimSettings:
    """What the benchmark runs; every default is what the docs' table uses."""

    sigmas: tuple[float, ...] = SIGMAS
    steps: int = 8  # steps for σ = 1; a run from σ takes max(1, round(steps * σ)) steps on a linear schedule
    full_steps: int = 8
    guidance_scale: float = 1.0
    methods: tuple[str, ...] = DEFAULT_METHODS
    full_generation: bool = True
    seed: int = 0
    resamples: int = 1000
    min_pixels: int = 32
    max_sequence_length: int = 64
    num_frames: int = 9
    height: int = 64
    width: int = 64

    def validate(self) -> None:
        if not self.sigmas or any(not (isinstance(s, float | int) and 0 < s <= 1) for s in self.sigmas):
            raise ValueError(f"`sigmas` must be noise levels in (0, 1], got {self.sigmas!r}")
        for name in ("steps", "full_steps", "resamples", "max_sequence_length", "num_frames", "height", "width",
                     "min_pixels"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {self.seed!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"`methods` must be a non-empty subset of {list(METHODS)}, got {list(self.methods)}")
        if not (isinstance(self.guidance_scale, float | int) and math.isfinite(self.guidance_scale)):
            raise ValueError(f"`guidance_scale` must be a finite number, got {self.guidance_scale!r}")

    def steps_for(self, sigma: float) -> int:
        return max(1, round(self.steps * sigma))


def _load_clips(pipe: DiasRPipeline, test_data: str | os.PathLike, clips: int | None, s: ClaimSettings):
    path = Path(test_data)
    manifest = path / "manifest.jsonl" if path.is_dir() else path
    grid = token_grid_factors(pipe.transformer, pipe.vae)
    # As the trainer's held-out set: first frames, centre crop, no reference augmentation.
    dataset = MuSADataset(
        str(manifest), num_frames=s.num_frames, height=s.height, width=s.width, clip_sampling="start", crop="center",
        ref_augment=None, seed=0, **grid,
    )  # fmt: skip
    count = len(dataset) if clips is None else min(clips, len(dataset))
    out = []
    for i in range(count):
        item = dataset[i]
        record = dataset.records[i]
        refs = [
            ((r.movedim(0, -1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy() for r in item["ref_images"]
        ]
        specs = [{k: sub.meta.get(k) for k in ("shape", "color", "pattern")} for sub in record.subjects]
        out.append(
            ClipData(
                index=i,
                clip_id=item["clip_id"],
                caption=item["caption"],
                phrases=list(item["phrases"]),
                specs=specs,
                video=item["video"],
                masks=item["masks"].bool(),
                token_labels=item["token_labels"],
                references=refs,
            )
        )
    return dataset, out


def _generate(
    pipe: DiasRPipeline, clip: ClipData, routing: str | None, with_refs: bool, latents: torch.Tensor,
    sigmas: list[float], s: ClaimSettings,
) -> tuple[np.ndarray, torch.Tensor | None]:  # fmt: skip
    kwargs: dict[str, Any] = {}
    if with_refs:
        kwargs.update(subject_images=clip.references, subject_phrases=clip.phrases, routing=routing)
        if routing == "masks":
            kwargs["subject_masks"] = clip.masks
        kwargs["return_routing_maps"] = routing != "dense"
    out = pipe(
        clip.caption, height=s.height, width=s.width, num_frames=s.num_frames, latents=latents.clone(),
        sigmas=sigmas, guidance_scale=s.guidance_scale, max_sequence_length=s.max_sequence_length,
        output_type="np", **kwargs,
    )  # fmt: skip
    return _to_uint8(out.frames[0]), out.routing_maps[0] if out.routing_maps is not None else None


def _decode(pipe: DiasRPipeline, latents: torch.Tensor) -> np.ndarray:
    """Frames of normalised latents, decoded exactly as the pipeline decodes (for the reconstruction row)."""
    cfg = pipe.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(latents)
    with torch.no_grad():
        video = pipe.vae.decode(latents / inv_std + mean, return_dict=False)[0]
    return _to_uint8(pipe.video_processor.postprocess_video(video, output_type="np")[0])


def run_claim(
    routed: DiasRPipeline,
    dense: DiasRPipeline | None,
    test_data: str | os.PathLike,
    train_data: str | os.PathLike | None = None,
    *,
    clips: int | None = 16,
    settings: ClaimSettings | None = None,
    scorer: Scorer | None = None,
    strip_clips: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method on the held-out clips and score them; returns every number (see the module docstring).

    Args:
        routed: the DiasR pipeline (with a trained ``id_router`` for the ``router`` method).
        dense: the dense baseline pipeline, or ``None`` (its methods are then left out, and said so).
        test_data, train_data: ``make-synthetic`` folders (or manifests); ``train_data`` only for novelty.
        clips: how many held-out clips (the first ones), ``None`` for all.
        scorer: the sprite embedder and its crop / search functions; default :func:`load_embedder`.
        strip_clips: keep frames and routing maps of this many clips (multi-subject ones, same-colour first) for
            :func:`write_strips` (in ``result["_strips"]``, not JSON).
    """
    s = settings or ClaimSettings()
    s.validate()
    if clips is not None and (isinstance(clips, bool) or not isinstance(clips, int) or clips < 1):
        raise ValueError(f"`clips` must be a positive integer or None, got {clips!r}")
    if "router" in s.methods and routed.id_router is None:
        raise ValueError("`routed` has no id_router: leave 'router' out of `methods` or give a DiasR folder with one")
    scorer = scorer if scorer is not None else load_embedder()
    methods = [m for m in s.methods if METHODS[m][0] == "routed" or dense is not None]
    skipped = [m for m in s.methods if m not in methods]
    full_methods = [m for m in FULL_METHODS if m in methods] if s.full_generation else []
    pipes = {"routed": routed, "dense": dense}
    for p in pipes.values():
        if p is not None:
            p.set_progress_bar_config(disable=True)

    t0 = time.perf_counter()
    dataset, data = _load_clips(routed, test_data, clips, s)
    timing: dict[str, float] = {"load_clips": time.perf_counter() - t0}
    strip_ids = _pick_strip_clips(data, strip_clips)
    strips: dict[str, dict[str, Any]] = {}
    per_clip: list[dict[str, Any]] = []

    def tick(key: str, start: float) -> None:
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - start

    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(data) * (len(s.sigmas) * len(methods) + len(full_methods))
        bar = tqdm(total=total, desc="toy_claim", file=sys.stderr)
    for clip in data:
        start = time.perf_counter()
        clip.ref_embeddings = embed_references(clip, dataset.records[clip.index].subjects, scorer)
        x0 = encode_latents(routed.vae, clip.video[None])
        row: dict[str, Any] = {
            "clip_id": clip.clip_id, "num_subjects": clip.num_subjects, "same_colour": bool(clip.same_colour_pairs),
            "partial": {}, "full": {}, "routing_iou": {},
        }  # fmt: skip
        gt_frames = _to_uint8((clip.video.movedim(0, -1).numpy() + 1) / 2)
        row["ground_truth"] = score_frames(gt_frames, clip, scorer, s.min_pixels, presence=bool(full_methods))
        recon = _decode(routed, x0)
        row["reconstruction"] = score_frames(recon, clip, scorer, s.min_pixels, presence=bool(full_methods))
        tick("encode_and_ceilings", start)
        keep = clip.clip_id in strip_ids
        if keep:
            strips[clip.clip_id] = {"clip": clip, "partial": {}, "full": {}, "sigma": max(s.sigmas)}
        for k, sigma in enumerate(s.sigmas):
            gen = torch.Generator().manual_seed(_seed(s.seed, clip.index, k))
            noise = torch.randn(x0.shape, generator=gen)
            start_latents = (1 - sigma) * x0 + sigma * noise
            schedule = np.linspace(sigma, 0.0, s.steps_for(sigma) + 1)[:-1].tolist()
            for method in methods:
                which, routing, with_refs = METHODS[method]
                start = time.perf_counter()
                frames, maps = _generate(pipes[which], clip, routing, with_refs, start_latents, schedule, s)
                tick(f"generate:{method}", start)
                start = time.perf_counter()
                row["partial"].setdefault(method, {})[str(sigma)] = score_frames(frames, clip, scorer, s.min_pixels)
                if maps is not None:
                    iou = label_iou(maps.reshape(-1), clip.token_labels, clip.num_subjects)["mean_iou"]
                    row["routing_iou"].setdefault(method, {})[str(sigma)] = iou
                tick("score", start)
                if keep and sigma == max(s.sigmas):
                    strips[clip.clip_id]["partial"][method] = (frames, maps)
                if bar is not None:
                    bar.update()
        if full_methods:
            gen = torch.Generator().manual_seed(_seed(s.seed, clip.index, 1_000))
            noise = torch.randn(x0.shape, generator=gen)
            schedule = np.linspace(1.0, 0.0, s.full_steps + 1)[:-1].tolist()
            for method in full_methods:
                which, routing, with_refs = METHODS[method]
                start = time.perf_counter()
                frames, maps = _generate(pipes[which], clip, routing, with_refs, noise, schedule, s)
                tick(f"full:{method}", start)
                row["full"][method] = score_frames(frames, clip, scorer, s.min_pixels, presence=True)
                if keep:
                    strips[clip.clip_id]["full"][method] = (frames, maps)
                if bar is not None:
                    bar.update()
        per_clip.append(row)
    if bar is not None:
        bar.close()

    result = summarize(per_clip, methods, full_methods, s)
    result["config"] = {
        "clips": len(data), "clip_ids": [c.clip_id for c in data], "skipped_records": dataset.num_skipped,
        "sigmas": list(s.sigmas), "steps_per_sigma": {str(x): s.steps_for(x) for x in s.sigmas},
        "full_steps": s.full_steps, "schedule": "linear in σ from σ to 0 (DiasRPipeline(sigmas=...))",
        "guidance_scale": s.guidance_scale, "methods": methods, "methods_left_out": skipped,
        "full_generation_methods": full_methods, "seed": s.seed, "resamples": s.resamples,
        "min_pixels": s.min_pixels, "max_sequence_length": s.max_sequence_length,
        "video": [s.num_frames, s.height, s.width],
        "embedder": scorer.name,
    }  # fmt: skip
    if train_data is not None:
        result["novelty"] = combination_novelty([[tuple(sp.values()) for sp in c.specs] for c in data], train_data)
    result["timing_s"] = {k: round(v, 2) for k, v in sorted(timing.items())} | {
        "total": round(time.perf_counter() - t0, 2)
    }
    result["per_clip"] = per_clip
    result["_strips"] = strips
    return result


def _pick_strip_clips(data: list[ClipData], count: int) -> list[str]:
    """Multi-subject clips, those with a same-colour pair first (where mixing identities shows)."""
    multi = [c for c in data if c.num_subjects >= 2]
    ranked = sorted(multi, key=lambda c: (not c.same_colour_pairs, c.index))
    return [c.clip_id for c in ranked[:count]]


def summarize(per_clip: list[dict[str, Any]], methods: list[str], full_methods: list[str], s: ClaimSettings) -> dict:
    """Means and bootstrap intervals over clips: per method and σ, pooled over σ (each clip's mean over σ), the
    paired differences to the dense baseline, the from-noise runs and the ceilings."""

    def stats(values: list[float | None]) -> dict[str, Any]:
        return bootstrap_ci(values, s.resamples, s.seed)

    def pooled(row: dict[str, Any], method: str, metric: str) -> float | None:
        return _mean([v[metric] for v in row["partial"][method].values() if v[metric] is not None])

    partial: dict[str, Any] = {}
    for method in methods:
        by_sigma = {
            str(sig): {m: stats([r["partial"][method][str(sig)][m] for r in per_clip]) for m in METRICS}
            for sig in s.sigmas
        }
        overall = {m: stats([pooled(r, method, m) for r in per_clip]) for m in METRICS}
        partial[method] = {"by_sigma": by_sigma, "overall": overall}
    paired: dict[str, Any] = {}
    if "dense" in methods:
        for method in (m for m in ("router", "similarity", "masks") if m in methods):
            diffs = {}
            for m in METRICS:
                pairs = [(pooled(r, method, m), pooled(r, "dense", m)) for r in per_clip]
                diffs[m] = stats([a - b for a, b in pairs if a is not None and b is not None])
            paired[f"{method} - dense"] = diffs
    routing: dict[str, Any] = {}
    for method in methods:
        if any(method in r["routing_iou"] for r in per_clip):
            routing[method] = {
                str(sig): stats([r["routing_iou"][method][str(sig)] for r in per_clip]) for sig in s.sigmas
            } | {
                "overall": stats(
                    [_mean([v for v in r["routing_iou"][method].values() if v is not None]) for r in per_clip]
                )
            }
    full = {
        method: {m: stats([r["full"][method].get(m) for r in per_clip]) for m in FULL_METRICS}
        for method in full_methods
    }
    ceilings = {
        name: {m: stats([r[name].get(m) for r in per_clip]) for m in FULL_METRICS}
        for name in ("ground_truth", "reconstruction")
    }
    return {"partial": partial, "paired_vs_dense": paired, "routing_iou_last_step": routing, "full": full,
            "ceilings": ceilings}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def _cell(st: dict[str, Any], signed: bool = False) -> str:
    if st["mean"] is None:
        return "–"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(st['mean'])} [{fmt.format(st['low'])}, {fmt.format(st['high'])}]"


def _table(
    rows: list[tuple[str, dict[str, Any]]],
    signed: bool = False,
    extra: dict[str, str] | None = None,
    metrics: Sequence[str] = METRICS,
) -> str:
    head = (
        "| | " + " | ".join(METRIC_HEADERS[m] for m in metrics) + (" | routing IoU |" if extra is not None else " |")
    )
    sep = "|---" + "|---:" * (len(metrics) + (extra is not None)) + "|"
    lines = [head, sep]
    for name, cells in rows:
        tail = f" | {extra.get(name, '–')} |" if extra is not None else " |"
        lines.append(f"| {name} | " + " | ".join(_cell(cells[m], signed) for m in metrics) + tail)
    return "\n".join(lines)


def environment() -> dict[str, str]:
    import diffusers

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "device": f"{device} ({os.cpu_count()} CPU cores visible, {torch.get_num_threads()} torch threads)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def render_markdown(result: dict[str, Any], command: str | None = None, strips: Sequence[str] = ()) -> str:
    """The claim section for ``docs/toy_model.md``: tables with 95% bootstrap intervals over clips."""
    cfg, env = result["config"], result.get("environment", {})
    routing = result["routing_iou_last_step"]
    iou = {LABELS[m]: _cell(v["overall"]) for m, v in routing.items()}
    lines = []
    if cfg["embedder"].startswith("STAND-IN"):
        lines += ["> **STAND-IN EMBEDDER (colour statistics only): these numbers are not a result.**", ""]
    steps = ", ".join(f"σ {k}: {v}" for k, v in cfg["steps_per_sigma"].items())
    lines += [
        f"Held-out clips: {cfg['clips']} ({', '.join(cfg['clip_ids'][:3])}{', …' if cfg['clips'] > 3 else ''}); "
        f"each clip's latents noised to σ ∈ {{{', '.join(str(x) for x in cfg['sigmas'])}}} with the same seeded "
        f"noise for every method, then sampled back with the same linear schedule from σ to 0 ({steps} steps), "
        f"guidance_scale={cfg['guidance_scale']} (no classifier-free guidance: one transformer pass a step for every "
        "method). Each subject is cropped with its ground-truth mask in every frame "
        f"(≥ {cfg['min_pixels']} pixels) and scored by `{cfg['embedder']}` against every reference of its clip. "
        "Cells: mean [95% bootstrap interval over clips, "
        f"{cfg['resamples']} resamples].",
        "",
        "- identity match: the subject's own reference is the most similar of its clip's (clips with ≥ 2 subjects);",
        "- identity sim: cosine to its own reference; attributes: predicted shape, colour and pattern all right;",
        "- leakage sim: highest cosine to another subject's reference (≥ 2 subjects); attribute swaps: for two "
        "subjects of one colour, the predicted shape or pattern is the other's and not its own (clips with such a "
        "pair).",
        "",
        "**All noise levels** (each clip's mean over σ):",
        "",
        _table(
            [(LABELS[m], v["overall"]) for m, v in result["partial"].items()]
            + [(LABELS[name], v) for name, v in result["ceilings"].items()],
            extra=iou,
        ),
        "",
    ]
    if result["paired_vs_dense"]:
        lines += [
            "**Paired difference to the dense baseline** (same clips, same noise; interval of the per-clip "
            "difference):",
            "",
            _table(
                [(k.replace(" - dense", "") + " − dense", v) for k, v in result["paired_vs_dense"].items()],
                signed=True,
            ),
            "",
        ]
    lines += ["**Per noise level:**", ""]
    rows = []
    for sigma in cfg["sigmas"]:
        for m, v in result["partial"].items():
            rows.append((f"σ {sigma}: {LABELS[m]}", v["by_sigma"][str(sigma)]))
    sig_iou = {f"σ {sig}: {LABELS[m]}": _cell(v[str(sig)]) for m, v in routing.items() for sig in cfg["sigmas"]}
    lines += [_table(rows, extra=sig_iou), ""]
    if result["full"]:
        lines += [
            f"**From pure noise** ({cfg['full_steps']} steps, linear schedule from σ = 1), scored at the held-out "
            'clip\'s layout. DiasR is routed by that layout (`routing="masks"`); the dense model has no layout input, '
            "so at the layout's regions it can only score by chance. The last column is layout-free: for each "
            "reference, the best-matching window anywhere in the frame (the embedder's mask-free `locate_subject`), "
            "so it compares what is drawn, not where (ceilings: ground truth "
            f"{_cell(result['ceilings']['ground_truth']['presence_sim'])}, VAE reconstruction "
            f"{_cell(result['ceilings']['reconstruction']['presence_sim'])}):",
            "",
            _table([(LABELS[m], v) for m, v in result["full"].items()], metrics=FULL_METRICS),
            "",
        ]
    if routing:
        lines.append(
            "Routing IoU: the maps each call returns (`return_routing_maps=True`: majority over routed layers at the "
            "last step) against the ground-truth token labels, mean over subjects per clip."
        )
    if result.get("trainer_eval"):
        te = result["trainer_eval"]
        lines.append(
            f"The trainer's own held-out evaluation (`{te['path']}`): routing IoU {te['routing_iou_mean']:.3f} "
            f"(σ {te.get('eval_sigmas')}, one forward pass on noised ground-truth latents)."
        )
    nov = result.get("novelty")
    if nov:

        def pct(key: str) -> str:
            f = nov[key]
            return "–" if f["fraction"] is None else f"{f['seen']}/{f['total']} ({100 * f['fraction']:.0f}%)"

        lines += [
            "",
            f"**Unseen combinations.** Of the scored held-out clips' subjects, {pct('subjects')} occur (same shape, "
            f"colour and pattern) somewhere in the {nov['train_clips']} training clips; of their subject pairs, "
            f"{pct('pairs')} occur together in a training clip, of the same-colour pairs {pct('same_colour_pairs')}, "
            f"and of the multi-subject clips' whole subject sets {pct('multi_subject_sets')}.",
        ]
    if cfg["methods_left_out"]:
        lines += ["", f"Left out (no dense pipeline given): {', '.join(cfg['methods_left_out'])}."]
    if strips:
        lines += ["", "Examples (references | frames of each method at the highest σ | routing maps):", ""]
        lines += [f"![toy claim strip]({p})" for p in strips]
    timing = result["timing_s"]
    lines += [
        "",
        f"Run: {env.get('device', '?')}, torch {env.get('torch', '?')}, diffusers {env.get('diffusers', '?')}, "
        f"{env.get('date', '?')}; {timing['total']:.0f} s in all.",
    ]
    if command:
        lines += ["", "```bash", command, "```"]
    return "\n".join(lines) + "\n"


def update_marked_section(path: str | os.PathLike, block: str) -> None:
    """Replace what lies between the toy_claim markers of ``path`` (appending the markers at the end when absent,
    creating the file when missing); nothing else of the file changes. Written atomically."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    section = f"{MARK_START}\n{block.rstrip()}\n{MARK_END}"
    start, end = text.find(MARK_START), text.find(MARK_END)
    if (start == -1) != (end == -1) or (start != -1 and end < start):
        raise ValueError(f"`--out-md` {path} has a broken toy_claim section: one marker without the other")
    if start == -1:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section + "\n"
    else:
        text = text[:start] + section + text[end + len(MARK_END) :]
    atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------------------------------
# Strips


def _label_tile(text: str, height: int, width: int) -> np.ndarray:
    tile = PIL.Image.new("RGB", (width, height), (24, 24, 24))
    draw = PIL.ImageDraw.Draw(tile)
    font = PIL.ImageFont.load_default()
    words, lines, line = text.split(), [], ""
    for w in words:  # wrap on words to the tile's width
        trial = f"{line} {w}".strip()
        if draw.textlength(trial, font=font) > width - 6 and line:
            lines.append(line)
            line = w
        else:
            line = trial
    lines.append(line)
    for i, ln in enumerate(lines[: max(1, height // 12)]):
        draw.text((3, 3 + 12 * i), ln, fill=(240, 240, 240), font=font)
    return np.asarray(tile)


def write_strips(
    result: dict[str, Any], folder: str | os.PathLike, temporal_compression: int, scale: int = 2
) -> list[Path]:
    """One PNG per kept clip: references, ground truth, each method's frames (highest σ) with its routing maps,
    and the from-noise runs; ``scale``x nearest-neighbour enlarged. Returns the paths written."""
    folder = Path(folder)
    written = []
    label_w = 150
    for clip_id, entry in result["_strips"].items():
        clip: ClipData = entry["clip"]
        rows: list[tuple[str, np.ndarray]] = [("references", np.concatenate(clip.references, axis=1))]
        gt = _to_uint8((clip.video.movedim(0, -1).numpy() + 1) / 2)
        idx = list(range(0, gt.shape[0], 2))
        rows.append(("ground truth", np.concatenate([gt[i] for i in idx], axis=1)))
        runs = [(f"{SHORT_LABELS[m]}, from noise level {entry['sigma']}", v) for m, v in entry["partial"].items()]
        runs += [(f"{SHORT_LABELS[m]}, from pure noise", v) for m, v in entry["full"].items()]
        for label, (frames, maps) in runs:
            rows.append((label, np.concatenate([frames[i] for i in idx], axis=1)))
            if maps is not None:
                over = overlay_routing_maps(frames, maps, temporal_compression=temporal_compression)
                rows.append(("  routing", np.concatenate([over[i] for i in idx], axis=1)))
        width = max(r.shape[1] for _, r in rows)
        body = []
        for label, img in rows:
            img = np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0)), constant_values=255)
            img = img.repeat(scale, 0).repeat(scale, 1)
            body.append(np.concatenate([_label_tile(label, img.shape[0], label_w), img], axis=1))
        legend = routing_legend(clip.phrases, body[0].shape[1])
        canvas = np.concatenate([*body, legend], axis=0)
        path = folder / f"toy_claim_{clip_id}.png"
        with atomic_path(path) as tmp:
            PIL.Image.fromarray(canvas).save(tmp, format="PNG")
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _trainer_eval(pipeline_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``eval.json`` that ``diasr train`` wrote next to the pipeline folder, when it has a routing IoU."""
    path = Path(pipeline_dir).parent / "eval.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("routing_iou_mean"), int | float):
        return None
    return {"path": str(path), "routing_iou_mean": data["routing_iou_mean"], "eval_sigmas": data.get("eval_sigmas")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _sigma_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    if any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"noise levels must be in (0, 1], got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--routed", required=True, help="the DiasR pipeline folder (with a trained id_router)")
    parser.add_argument("--dense", default=None, help="the dense baseline's pipeline folder (omit: no dense rows)")
    parser.add_argument("--test-data", required=True, help="held-out make-synthetic folder (or its manifest.jsonl)")
    parser.add_argument("--train-data", default=None, help="the training make-synthetic folder (for novelty)")
    parser.add_argument("--clips", type=_positive_int, default=16, help="the first N held-out clips (default 16)")
    parser.add_argument("--sigmas", type=_sigma_list, default=SIGMAS, help="comma-separated noise levels")
    parser.add_argument("--steps", type=_positive_int, default=8, help="steps for σ=1; σ takes round(steps*σ)")
    parser.add_argument("--full-steps", type=_positive_int, default=8, help="steps of the from-noise runs")
    parser.add_argument("--no-full", action="store_true", help="skip the from-noise runs")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="the same for every method (1 = no CFG)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {list(METHODS)}")
    parser.add_argument("--num-frames", type=_positive_int, default=9, help="as the models were trained")
    parser.add_argument("--height", type=_positive_int, default=64)
    parser.add_argument("--width", type=_positive_int, default=64)
    parser.add_argument("--max-sequence-length", type=_positive_int, default=64, help="as the models were trained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=_positive_int, default=1000, help="bootstrap resamples")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="runs/toy_claim", help="folder for toy_claim.json and toy_claim.md")
    parser.add_argument("--out-md", default=None, help="update the toy_claim section of this markdown file")
    parser.add_argument("--strips", default=None, help="write example strips (PNG) into this folder")
    parser.add_argument("--num-strips", type=_positive_int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    settings = ClaimSettings(
        sigmas=args.sigmas, steps=args.steps, full_steps=args.full_steps, guidance_scale=args.guidance_scale,
        methods=methods, full_generation=not args.no_full, seed=args.seed, resamples=args.resamples,
        num_frames=args.num_frames, height=args.height, width=args.width, max_sequence_length=args.max_sequence_length,
    )  # fmt: skip
    try:
        settings.validate()
    except ValueError as err:
        parser.error(str(err))
    # Local folders only: a missing path must not turn into a Hub download attempt inside from_pretrained.
    for flag, value in (("--routed", args.routed), ("--dense", args.dense)):
        if value is not None and not (Path(value) / "model_index.json").is_file():
            parser.error(f"{flag} {value} is not a saved pipeline folder (no model_index.json)")
    for flag, value in (("--test-data", args.test_data), ("--train-data", args.train_data)):
        if value is not None and not (Path(value).is_file() or (Path(value) / "manifest.jsonl").is_file()):
            parser.error(f"{flag} {value} is neither a manifest nor a folder with manifest.jsonl")
    scorer = load_embedder()
    routed = DiasRPipeline.from_pretrained(args.routed)
    dense = DiasRPipeline.from_pretrained(args.dense) if args.dense else None
    result = run_claim(
        routed, dense, args.test_data, args.train_data, clips=args.clips, settings=settings, scorer=scorer,
        strip_clips=args.num_strips if args.strips else 0,
    )  # fmt: skip
    result["environment"] = environment()
    result["trainer_eval"] = _trainer_eval(args.routed)
    result["models"] = {"routed": str(args.routed), "dense": args.dense}
    command = "OMP_NUM_THREADS={} PYTHONPATH=src python benchmarks/toy_claim.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "?"), shlex.join(sys.argv[1:] if argv is None else argv)
    )
    result["command"] = command
    strip_paths = []
    if args.strips:
        strip_paths = write_strips(result, args.strips, routed.vae_scale_factor_temporal)
    md_links = []
    if args.out_md:
        md_links = [os.path.relpath(p, Path(args.out_md).resolve().parent) for p in map(Path.resolve, strip_paths)]
    markdown = render_markdown(result, command, md_links)
    out = Path(args.out)
    atomic_write_text(out / "toy_claim.json", json.dumps(_jsonable(result), indent=2) + "\n")
    atomic_write_text(out / "toy_claim.md", markdown)
    if args.out_md:
        update_marked_section(args.out_md, markdown)
    print(markdown)
    print(f"wrote {out / 'toy_claim.json'}, {out / 'toy_claim.md'}" + (f", {args.out_md}" if args.out_md else ""))


if __name__ == "__main__":
    main()
