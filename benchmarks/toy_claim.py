"""The toy-scale proof of DiasR's claim: routed references keep identities apart where dense references mix them.

**From noised clips.** For each held-out clip and each noise level σ, the clip's video is encoded to latents (as
``diasr train`` does), noised to σ with a seeded generator (the same noise for every method) and sampled back to
clean with the same steps by every method:

- ``router``: the DiasR model with its trained router,
- ``similarity``: the DiasR model with training-free similarity routing,
- ``masks``: the DiasR model routed by the clip's ground-truth layout masks,
- ``dense``: the Phantom-style dense baseline (its own pipeline folder: every video token sees every reference),
- ``no_refs``: the DiasR model without references (``dense_no_refs``: the dense model without them, opt-in).

Each subject's region in every decoded frame is cropped with its ground-truth mask and scored against every
reference of the clip by the sprite identity embedder (``diasr_diffusers.eval.sprites``): identity match, identity
similarity, attributes, leakage to the other subjects and attribute swaps between same-colour subjects; also the
routing IoU of the router and how many held-out subject combinations occur in the training set.

**From pure noise** (:func:`run_from_noise`). Every held-out clip of two or more subjects is generated from pure
noise (the same seeded noise for every method) given its caption and references, and for ``masks`` its layout; each
subject is scored with its frames pooled (:func:`score_subjects`) at the layout, at the method's own routing map
and located without masks, for own-reference-best, identity and leakage similarity, same-colour attribute swaps and
shape / colour accuracy, against issue 24's targets and paired with the dense baseline. Means carry 95% bootstrap
intervals over clips. Nothing depends on the VAE's channels or the transformer's patch size: latents come from the
routed model's VAE, token grids from :func:`~diasr_diffusers.routing.token_grid_factors`.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/toy_claim.py \\
        --routed runs/sprite_route/pipeline --dense runs/sprite_dense/pipeline \\
        --test-data runs/sprites_test --train-data runs/sprites_train --clips 16 \\
        --out runs/toy_claim --out-md docs/toy_model.md --strips docs/images/toy_claim

``--no-partial`` runs only the from-noise part, ``--no-full`` only the noised clips, ``--quick`` is a smoke test
of both (a few clips and steps). Deterministic given ``--seed`` and the thread count."""

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
from diasr_diffusers.eval.sprites import SpriteEmbedder, crop_subject, load_sprite_embedder, sliding_windows
from diasr_diffusers.routing import layout_labels, masks_to_token_grid, token_grid_factors
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
}
MARK_START, MARK_END = "<!-- toy_claim:start -->", "<!-- toy_claim:end -->"

# Generation from pure noise (issue 24, "the claim from noise"). Scored per subject (a subject's frames pooled), in
# two ways: at the clip's layout masks (what `masks` routing was asked for) and "located": each reference's best
# window in the frame found without masks, so a model given no layout is judged on what it drew, not where.
NOISE_METHODS = ("router", "similarity", "masks", "dense")
NOISE_METRICS = ("id_match", "id_match_same_colour", "id_sim", "leak_sim", "swap_rate", "shape_acc", "color_acc")
NOISE_HEADERS = {
    "id_match": "own ref best ↑",
    "id_match_same_colour": "own ref best, same-colour ↑",
    "id_sim": "identity sim ↑",
    "leak_sim": "leakage sim ↓",
    "swap_rate": "attribute swaps ↓",
    "shape_acc": "shape acc ↑",
    "color_acc": "colour acc ↑",
}
SCORINGS = ("layout", "located", "routed")
# Rows without generation that bound the metric: the clip's own frames, their VAE round trip, and another held-out
# clip's frames scored against this clip's references (what the metric gives when the subjects are not drawn).
NOISE_CALIBRATION = ("ground_truth", "reconstruction", "other_clip")
NOISE_LABELS = LABELS | {"other_clip": "another clip's frames (floor)"}
# (method, scoring, metric, threshold): the targets of issue 24 for the retrained model, all "at least".
NOISE_TARGETS = (
    ("masks", "layout", "id_match", 0.90),
    ("masks", "layout", "shape_acc", 0.5),
    ("router", "located", "id_match", 0.75),
    ("router", "routed", "id_match", 0.75),
)
NOISE_MARK_START, NOISE_MARK_END = "<!-- toy_claim_noise:start -->", "<!-- toy_claim_noise:end -->"


# ---------------------------------------------------------------------------------------------------------------------
# The embedder


@dataclass
class Scorer:
    """The pieces of :mod:`diasr_diffusers.eval.sprites` the benchmark uses: the embedder (``embed``, ``predict``;
    ``logits`` and ``embed_logits`` for the mask-free search) and ``crop_subject(frame, mask) -> (crop, crop_mask)``."""

    embedder: SpriteEmbedder
    crop_subject: Callable[..., tuple[np.ndarray, np.ndarray]] = crop_subject

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


def cluster_bootstrap(
    groups: Sequence[Sequence[float | None]], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float | int | None]:
    """Pooled mean of per-subject ``values`` grouped by clip, with a percentile bootstrap interval that resamples
    whole clips (a clip's subjects share its noise and its frames, so they are not independent).

    Returns ``{"mean", "low", "high", "n", "clips"}``: ``n`` values (``None`` entries left out) in ``clips`` clips;
    all ``None`` but the counts when there are none. The resamples depend only on ``seed`` and ``len(groups)``, so
    methods scored on the same clips are resampled alike (paired).
    """
    sums = np.asarray([sum(v for v in g if v is not None) for g in groups], dtype=np.float64)
    counts = np.asarray([sum(v is not None for v in g) for g in groups], dtype=np.float64)
    n, clips = int(counts.sum()), int((counts > 0).sum())
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "clips": 0}
    idx = np.random.default_rng(seed).integers(0, len(groups), size=(resamples, len(groups)))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[idx].sum(1) / counts[idx].sum(1)  # a resample of only empty clips is NaN, left out
    alpha = (1 - level) / 2
    low, high = np.nanquantile(means, [alpha, 1 - alpha])
    return {"mean": float(sums.sum() / n), "low": float(low), "high": float(high), "n": n, "clips": clips}


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
    frames: np.ndarray, clip: ClipData, scorer: Scorer, min_pixels: int = 32
) -> dict[str, float | int | None]:
    """Identity scores of one decoded video ``(F, H, W, 3)`` uint8 at the clip's ground-truth subject regions.

    Every (subject, frame) whose mask has at least ``min_pixels`` pixels is cropped and embedded; the clip's scores
    are means over those crops (``None`` where undefined: matching and leakage need two subjects, swaps a pair of
    subjects sharing a colour).
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


def subject_scores(
    sim: np.ndarray, preds: Sequence[dict[str, Any]], owners: Sequence[int], clip: ClipData
) -> list[dict[str, float | int | None] | None]:
    """Per-subject scores from scored crops: ``sim`` ``(K, N)`` cosines of ``K`` crops to the clip's ``N``
    references, ``preds`` the embedder's predictions and ``owners`` the subject each crop belongs to.

    A subject's frames are pooled: its mean cosine to each reference decides ``id_match`` (its own reference is
    strictly the most similar, as a person judges a whole video) with ``id_sim`` the own and ``leak_sim`` the best
    other of those means; ``id_match_same_colour`` is ``id_match`` for a subject sharing its colour with another
    (else ``None``); ``shape_acc`` / ``color_acc`` the fraction of its crops whose predicted shape / colour is its
    own; ``swap_rate`` the fraction of (crop, same-colour partner) pairs where the predicted shape or pattern is the
    partner's and not its own (``None`` without a partner). ``None`` for a subject without crops. Needs ``N >= 2``.
    """
    owners_arr = np.asarray(owners, dtype=np.int64)
    partners: dict[int, list[int]] = {}
    for i, j in clip.same_colour_pairs:
        partners.setdefault(i, []).append(j)
    rows: list[dict[str, float | int | None] | None] = []
    for s in range(clip.num_subjects):
        mine = np.flatnonzero(owners_arr == s)
        if len(mine) == 0:
            rows.append(None)
            continue
        mean_sim = sim[mine].mean(0)
        best_other = float(np.delete(mean_sim, s).max())
        match = float(mean_sim[s] > best_other)  # strictly: an embedder that cannot tell them apart scores 0
        own = clip.specs[s]
        swaps = [
            any(preds[k][a] == clip.specs[j][a] != own[a] for a in ("shape", "pattern"))
            for k in mine
            for j in partners.get(s, [])
        ]
        rows.append({
            "id_match": match,
            "id_match_same_colour": match if s in partners else None,
            "id_sim": float(mean_sim[s]),
            "leak_sim": best_other,
            "swap_rate": float(np.mean(swaps)) if swaps else None,
            "shape_acc": float(np.mean([preds[k]["shape"] == own["shape"] for k in mine])),
            "color_acc": float(np.mean([preds[k]["color"] == own["color"] for k in mine])),
            "crops": len(mine),
        })  # fmt: skip
    return rows


def score_subjects(
    frames: np.ndarray,
    clip: ClipData,
    scorer: Scorer,
    min_pixels: int = 32,
    located_every: int = 2,
    routed_masks: np.ndarray | None = None,
) -> dict[str, list[dict[str, float | int | None] | None]]:
    """:func:`subject_scores` of one decoded video ``(F, H, W, 3)`` uint8, scored two or three ways.

    - ``"layout"``: every (subject, frame) whose layout mask has at least ``min_pixels`` pixels, cropped with it;
    - ``"located"``: in every ``located_every``-th frame, without masks: every square window is embedded and the
      references claim windows one at a time, the best (reference, window) pair by cosine x objectness first, a
      window overlapping a claimed one being out (:func:`locate_exclusive`); so two references cannot both claim one
      blob, and each subject is judged on what the model drew, wherever it is;
    - ``"routed"`` (given ``routed_masks`` ``(N, F, H, W)``, the method's own routing map in pixels): where the model
      routed each subject. A subject routed fewer than ``min_pixels`` pixels in every frame was not drawn anywhere:
      its ``id_match`` is 0, its other scores ``None``.
    """
    if clip.num_subjects < 2:
        raise ValueError(f"clip {clip.clip_id} has {clip.num_subjects} subject; identity matching needs two")
    out = {"layout": _score_masked(frames, clip.masks.numpy(), clip, scorer, min_pixels, missing_is_miss=False)}
    found = [locate_exclusive(frame, clip.ref_embeddings, scorer.embedder) for frame in frames[::located_every]]
    logits = {k: torch.cat([f[1][k] for f in found]) for k in found[0][1]}
    owners = [s for _ in found for s in range(clip.num_subjects)]
    out["located"] = _score_logits(logits, owners, clip, scorer.embedder)
    if routed_masks is not None:
        out["routed"] = _score_masked(frames, routed_masks, clip, scorer, min_pixels, missing_is_miss=True)
    return out


def locate_exclusive(
    frame: np.ndarray, references: torch.Tensor, embedder: SpriteEmbedder, stride: int = 4, max_iou: float = 0.3
) -> tuple[list[tuple[int, int, int, int]], dict[str, torch.Tensor]]:
    """One window ``(x0, y0, x1, y1)`` per reference, found without masks, and the embedder's logits of those
    windows (one row per reference): ``locate_subject``'s windows and score (cosine x objectness), but claimed
    greedily, best pair first, and a window overlapping a claimed one by more than ``max_iou`` is out, so references
    compete for the sprites drawn instead of all finding the same one."""
    height, width = frame.shape[:2]
    sizes = sorted({max(8, round(f * min(height, width))) for f in (0.3, 0.42, 0.56)})  # as locate_subject
    boxes = np.asarray(sliding_windows(height, width, sizes, stride), dtype=np.float64)
    logits = embedder.logits([frame[int(y0) : int(y1), int(x0) : int(x1)] for x0, y0, x1, y1 in boxes])
    score = (references.float() @ embedder.embed_logits(logits).T * logits["objectness"].sigmoid()).numpy()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    free = np.ones(len(boxes), dtype=bool)
    chosen: dict[int, int] = {}
    while len(chosen) < len(score):
        masked = np.where(free[None], score, -np.inf)
        masked[list(chosen)] = -np.inf
        if not np.isfinite(masked).any():  # every window taken: the rest reuse their best window
            for n in range(len(score)):
                chosen.setdefault(n, int(score[n].argmax()))
            break
        n, w = np.unravel_index(int(masked.argmax()), masked.shape)
        chosen[int(n)] = int(w)
        ix = np.clip(np.minimum(boxes[:, 2], boxes[w, 2]) - np.maximum(boxes[:, 0], boxes[w, 0]), 0, None)
        iy = np.clip(np.minimum(boxes[:, 3], boxes[w, 3]) - np.maximum(boxes[:, 1], boxes[w, 1]), 0, None)
        inter = ix * iy
        free &= inter / (area + area[w] - inter) <= max_iou
    rows = [chosen[n] for n in range(len(score))]
    return [tuple(int(v) for v in boxes[w]) for w in rows], {k: v[rows] for k, v in logits.items()}


def _score_masked(
    frames: np.ndarray, masks: np.ndarray, clip: ClipData, scorer: Scorer, min_pixels: int, missing_is_miss: bool
) -> list[dict[str, float | int | None] | None]:
    crops, crop_masks, owners = [], [], []
    for s, f in itertools.product(range(clip.num_subjects), range(frames.shape[0])):
        if masks[s, f].sum() >= min_pixels:
            crop, crop_mask = scorer.crop_subject(frames[f], masks[s, f])
            crops.append(crop)
            crop_masks.append(crop_mask)
            owners.append(s)
    rows = _score_crops(crops, crop_masks, owners, clip, scorer)
    if missing_is_miss:
        partners = {i for i, _ in clip.same_colour_pairs}
        rows = [
            row if row is not None else dict.fromkeys(NOISE_METRICS) | {
                "id_match": 0.0, "id_match_same_colour": 0.0 if s in partners else None, "crops": 0
            }
            for s, row in enumerate(rows)
        ]  # fmt: skip
    return rows


def routed_pixel_masks(
    maps: torch.Tensor, num_subjects: int, num_frames: int, height: int, width: int, temporal_compression: int
) -> np.ndarray:
    """``(N, F, H, W)`` bool pixel masks of routing maps ``(F_lat, H_tok, W_tok)`` (``-1`` = null): each pixel
    takes its token's subject, latent frame 0 holding pixel frame 0 and each later one ``temporal_compression``
    frames (as ``overlay_routing_maps`` draws them)."""
    maps = maps.detach().cpu().numpy()
    rows = np.arange(height) * maps.shape[1] // height
    cols = np.arange(width) * maps.shape[2] // width
    lat = [min(0 if f == 0 else (f - 1) // temporal_compression + 1, maps.shape[0] - 1) for f in range(num_frames)]
    labels = maps[lat][:, rows][:, :, cols]  # (F, H, W)
    return np.stack([labels == s for s in range(num_subjects)])


def _score_crops(
    crops: list[np.ndarray], crop_masks: list[np.ndarray] | None, owners: list[int], clip: ClipData, scorer: Scorer
) -> list[dict[str, float | int | None] | None]:
    if not crops:
        return [None] * clip.num_subjects
    return _score_logits(scorer.embedder.logits(crops, crop_masks), owners, clip, scorer.embedder)


def _score_logits(
    logits: dict[str, torch.Tensor], owners: list[int], clip: ClipData, embedder: SpriteEmbedder
) -> list[dict[str, float | int | None] | None]:
    """:func:`subject_scores` from the embedder's logits of the crops (one forward for embedding and labels)."""
    sim = (embedder.embed_logits(logits).float() @ clip.ref_embeddings.float().T).numpy()
    probs = embedder.probabilities(logits)
    labels = {a: [embedder.labels[a][int(c)] for c in probs[a].argmax(-1)] for a in ("shape", "color", "pattern")}
    preds = [{a: labels[a][k] for a in labels} for k in range(len(owners))]
    return subject_scores(sim, preds, owners, clip)


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
    full_steps: int = 16  # steps of the runs from pure noise (linear schedule from σ = 1)
    guidance_scale: float = 1.0
    methods: tuple[str, ...] = DEFAULT_METHODS
    full_generation: bool = True
    noise_methods: tuple[str, ...] = NOISE_METHODS
    noise_guidance_scale: float | None = None  # None: `guidance_scale`
    located_every: int = 2  # the mask-free search embeds a few hundred windows a frame: every other frame
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
                     "min_pixels", "located_every"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {self.seed!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"`methods` must be a non-empty subset of {list(METHODS)}, got {list(self.methods)}")
        unknown = [m for m in self.noise_methods if m not in METHODS]
        if unknown:
            raise ValueError(f"`noise_methods` must be a subset of {list(METHODS)}, got {list(self.noise_methods)}")
        for name in ("guidance_scale", "noise_guidance_scale"):
            value = getattr(self, name)
            if name == "noise_guidance_scale" and value is None:
                continue
            if isinstance(value, bool) or not (isinstance(value, float | int) and math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")

    def steps_for(self, sigma: float) -> int:
        return max(1, round(self.steps * sigma))


def _load_clips(
    pipe: DiasRPipeline, test_data: str | os.PathLike, clips: int | None, s: ClaimSettings, multi_subject: bool = False
):
    """The dataset and the first ``clips`` held-out clips (``None``: all); with ``multi_subject`` only those of two or
    more subjects whose layout gives every subject a video token (``routing="masks"`` refuses the others), the
    others counted in ``dataset.layout_refused``."""
    path = Path(test_data)
    manifest = path / "manifest.jsonl" if path.is_dir() else path
    grid = token_grid_factors(pipe.transformer, pipe.vae)
    # As the trainer's held-out set: first frames, centre crop, no reference augmentation.
    dataset = MuSADataset(
        str(manifest), num_frames=s.num_frames, height=s.height, width=s.width, clip_sampling="start", crop="center",
        ref_augment=None, seed=0, **grid,
    )  # fmt: skip
    indices = [i for i in range(len(dataset)) if not multi_subject or len(dataset.records[i].subjects) >= 2]
    out = []
    dataset.layout_refused = []
    for i in indices:
        if clips is not None and len(out) >= clips:
            break
        item = dataset[i]
        record = dataset.records[i]
        if multi_subject:
            try:
                layout_labels(masks_to_token_grid(item["masks"][None].float(), **grid))
            except ValueError:
                dataset.layout_refused.append(item["clip_id"])
                continue
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
    sigmas: list[float], s: ClaimSettings, guidance_scale: float | None = None,
) -> tuple[np.ndarray, torch.Tensor | None]:  # fmt: skip
    kwargs: dict[str, Any] = {}
    if with_refs:
        kwargs.update(subject_images=clip.references, subject_phrases=clip.phrases, routing=routing)
        if routing == "masks":
            kwargs["subject_masks"] = clip.masks
        kwargs["return_routing_maps"] = routing != "dense"
    out = pipe(
        clip.caption, height=s.height, width=s.width, num_frames=s.num_frames, latents=latents.clone(),
        sigmas=sigmas, guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale,
        max_sequence_length=s.max_sequence_length,
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

        total = len(data) * len(s.sigmas) * len(methods)
        bar = tqdm(total=total, desc="toy_claim", file=sys.stderr)
    for clip in data:
        start = time.perf_counter()
        clip.ref_embeddings = embed_references(clip, dataset.records[clip.index].subjects, scorer)
        x0 = encode_latents(routed.vae, clip.video[None])
        row: dict[str, Any] = {
            "clip_id": clip.clip_id, "num_subjects": clip.num_subjects, "same_colour": bool(clip.same_colour_pairs),
            "partial": {}, "routing_iou": {},
        }  # fmt: skip
        gt_frames = _to_uint8((clip.video.movedim(0, -1).numpy() + 1) / 2)
        row["ground_truth"] = score_frames(gt_frames, clip, scorer, s.min_pixels)
        recon = _decode(routed, x0)
        row["reconstruction"] = score_frames(recon, clip, scorer, s.min_pixels)
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
        per_clip.append(row)
    if bar is not None:
        bar.close()

    result = summarize(per_clip, methods, s)
    result["config"] = {
        "clips": len(data), "clip_ids": [c.clip_id for c in data], "skipped_records": dataset.num_skipped,
        "sigmas": list(s.sigmas), "steps_per_sigma": {str(x): s.steps_for(x) for x in s.sigmas},
        "schedule": "linear in σ from σ to 0 (DiasRPipeline(sigmas=...))",
        "guidance_scale": s.guidance_scale, "methods": methods, "methods_left_out": skipped,
        "seed": s.seed, "resamples": s.resamples,
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


def summarize(per_clip: list[dict[str, Any]], methods: list[str], s: ClaimSettings) -> dict:
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
    ceilings = {
        name: {m: stats([r[name].get(m) for r in per_clip]) for m in METRICS}
        for name in ("ground_truth", "reconstruction")
    }
    return {"partial": partial, "paired_vs_dense": paired, "routing_iou_last_step": routing, "ceilings": ceilings}


# ---------------------------------------------------------------------------------------------------------------------
# Generation from pure noise

# (method, clip, initial noise latents, sigmas) -> (frames (F, H, W, 3) uint8, routing maps or None)
NoiseGenerator = Callable[[str, ClipData, torch.Tensor, list[float]], tuple[np.ndarray, torch.Tensor | None]]


def _check_same_latents(routed: DiasRPipeline, dense: DiasRPipeline) -> None:
    """Both models start from the same noise, so their latent spaces must have one shape."""
    keys = ("z_dim", "scale_factor_spatial", "scale_factor_temporal")
    a = {k: routed.vae.config.get(k) for k in keys} | {"patch_size": tuple(routed.transformer.config.patch_size)}
    b = {k: dense.vae.config.get(k) for k in keys} | {"patch_size": tuple(dense.transformer.config.patch_size)}
    if a != b:
        raise ValueError(
            f"`dense` must share the routed model's latent space and patching (same noise), got {b} vs {a}"
        )


def run_from_noise(
    routed: DiasRPipeline,
    dense: DiasRPipeline | None,
    test_data: str | os.PathLike,
    *,
    clips: int | None = 40,
    settings: ClaimSettings | None = None,
    scorer: Scorer | None = None,
    strip_clips: int = 0,
    progress: bool = True,
    generate: NoiseGenerator | None = None,
) -> dict[str, Any]:
    """Generate every held-out clip of two or more subjects from pure noise, given its captions, references and (for
    ``masks``) its layout, with each of ``settings.noise_methods`` and the same seeded noise; score every subject
    with :func:`score_subjects` (at the layout and located), plus the calibration rows; summarise with
    clip-resampled bootstrap intervals, the paired differences to ``dense`` and the issue's targets.

    Args:
        routed, dense: as in :func:`run_claim` (``dense`` may be ``None``: its rows are left out, and said so).
        clips: the first N held-out clips of two or more subjects (``None``: all of them).
        generate: replaces the pipelines (``(method, clip, noise, sigmas) -> (frames, maps)``), for tests.
    """
    s = settings or ClaimSettings()
    s.validate()
    if clips is not None and (isinstance(clips, bool) or not isinstance(clips, int) or clips < 1):
        raise ValueError(f"`clips` must be a positive integer or None, got {clips!r}")
    if "router" in s.noise_methods and routed.id_router is None and generate is None:
        raise ValueError("`routed` has no id_router: leave 'router' out of `noise_methods` or give one with a router")
    methods = [m for m in s.noise_methods if METHODS[m][0] == "routed" or dense is not None]
    skipped = [m for m in s.noise_methods if m not in methods]
    if dense is not None:
        _check_same_latents(routed, dense)
    scorer = scorer if scorer is not None else load_embedder()
    guidance = s.guidance_scale if s.noise_guidance_scale is None else s.noise_guidance_scale
    pipes = {"routed": routed, "dense": dense}
    for pipe in pipes.values():
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    if generate is None:

        def generate(method: str, clip: ClipData, noise: torch.Tensor, sigmas: list[float]):
            which, routing, with_refs = METHODS[method]
            return _generate(pipes[which], clip, routing, with_refs, noise, sigmas, s, guidance)

    t0 = time.perf_counter()
    dataset, data = _load_clips(routed, test_data, clips, s, multi_subject=True)
    if not data:
        raise ValueError(
            f"`test_data` {test_data} has no clip of two or more subjects whose layout gives each a video token"
        )
    timing: dict[str, float] = {"load_clips": time.perf_counter() - t0}
    schedule = np.linspace(1.0, 0.0, s.full_steps + 1)[:-1].tolist()
    temporal_compression = routed.vae_scale_factor_temporal
    strip_ids = _pick_strip_clips(data, strip_clips)
    strips: dict[str, dict[str, Any]] = {}
    per_clip: list[dict[str, Any]] = []

    def tick(key: str, start: float) -> None:
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - start

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data) * len(methods), desc="toy_claim from noise", file=sys.stderr)
    for k, clip in enumerate(data):
        start = time.perf_counter()
        clip.ref_embeddings = embed_references(clip, dataset.records[clip.index].subjects, scorer)
        x0 = encode_latents(routed.vae, clip.video[None])
        row: dict[str, Any] = {
            "clip_id": clip.clip_id, "num_subjects": clip.num_subjects, "same_colour": bool(clip.same_colour_pairs),
            "subjects": clip.phrases, "scores": {}, "routed_share": {},
        }  # fmt: skip

        def score(frames: np.ndarray, clip: ClipData = clip, routed_masks: np.ndarray | None = None) -> dict:
            return score_subjects(frames, clip, scorer, s.min_pixels, s.located_every, routed_masks)

        row["scores"]["ground_truth"] = score(_to_uint8((clip.video.movedim(0, -1).numpy() + 1) / 2))
        row["scores"]["reconstruction"] = score(_decode(routed, x0))
        if len(data) > 1:
            other = data[(k + 1) % len(data)]
            row["other_clip_id"] = other.clip_id
            row["scores"]["other_clip"] = score(_to_uint8((other.video.movedim(0, -1).numpy() + 1) / 2))
        tick("encode_and_calibration", start)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(_seed(s.seed, clip.index, 1_000)))
        keep = clip.clip_id in strip_ids
        if keep:
            strips[clip.clip_id] = {"clip": clip, "partial": {}, "full": {}, "sigma": None}
        for method in methods:
            start = time.perf_counter()
            frames, maps = generate(method, clip, noise, schedule)
            tick(f"generate:{method}", start)
            start = time.perf_counter()
            routed_masks = None
            if maps is not None:
                row["routed_share"][method] = [float((maps == i).float().mean()) for i in range(clip.num_subjects)]
                routed_masks = routed_pixel_masks(maps, clip.num_subjects, *frames.shape[:3], temporal_compression)
            row["scores"][method] = score(frames, routed_masks=routed_masks)
            tick("score", start)
            if keep:
                strips[clip.clip_id]["full"][method] = (frames, maps)
            if bar is not None:
                bar.update()
        per_clip.append(row)
    if bar is not None:
        bar.close()

    result = summarize_noise(per_clip, methods, s)
    result["config"] = {
        "clips": len(data), "clip_ids": [c.clip_id for c in data], "layout_refused": dataset.layout_refused,
        "selection": "first held-out clips of >= 2 subjects whose layout gives every subject a token",
        "subjects": sum(c.num_subjects for c in data),
        "same_colour_subjects": sum(len({i for i, _ in c.same_colour_pairs}) for c in data),
        "steps": s.full_steps, "schedule": "linear in σ from 1 to 0 (DiasRPipeline(sigmas=...))",
        "guidance_scale": guidance, "methods": methods, "methods_left_out": skipped, "seed": s.seed,
        "resamples": s.resamples, "min_pixels": s.min_pixels, "located_every": s.located_every,
        "max_sequence_length": s.max_sequence_length, "video": [s.num_frames, s.height, s.width],
        "embedder": scorer.name,
    }  # fmt: skip
    result["timing_s"] = {k: round(v, 2) for k, v in sorted(timing.items())} | {
        "total": round(time.perf_counter() - t0, 2)
    }
    result["per_clip"] = per_clip
    result["_strips"] = strips
    return result


def summarize_noise(per_clip: list[dict[str, Any]], methods: list[str], s: ClaimSettings) -> dict[str, Any]:
    """Pooled per-subject means with clip-resampled intervals (:func:`cluster_bootstrap`) for every method and
    calibration row, both scorings; the paired per-subject differences to ``dense``; the targets; routed shares."""

    def stats(groups: list[list[float | None]]) -> dict[str, Any]:
        return cluster_bootstrap(groups, s.resamples, s.seed)

    def values(name: str, scoring: str, metric: str) -> list[list[float | None]]:
        return [[None if v is None else v[metric] for v in r["scores"][name][scoring]] for r in per_clip]

    names = [*methods, *(c for c in NOISE_CALIBRATION if all(c in r["scores"] for r in per_clip))]

    def scorings(name: str) -> list[str]:
        return [sc for sc in SCORINGS if all(sc in r["scores"][name] for r in per_clip)]

    table = {
        name: {sc: {m: stats(values(name, sc, m)) for m in NOISE_METRICS} for sc in scorings(name)} for name in names
    }
    paired: dict[str, Any] = {}
    if "dense" in methods:
        for method in (m for m in methods if m != "dense"):
            paired[f"{method} - dense"] = {
                sc: {
                    m: stats([
                        [None if a is None or b is None else a - b for a, b in zip(ga, gb)]
                        for ga, gb in zip(values(method, sc, m), values("dense", sc, m))
                    ])
                    for m in NOISE_METRICS
                }
                for sc in scorings(method)
                if sc in scorings("dense")
            }  # fmt: skip
    targets = []
    for method, scoring, metric, threshold in NOISE_TARGETS:
        if scoring in table.get(method, {}):
            st = table[method][scoring][metric]
            met = st["mean"] is not None and st["mean"] >= threshold
            targets.append({
                "method": method, "scoring": scoring, "metric": metric, "threshold": threshold, "value": st,
                "met": met, "interval_above": st["low"] is not None and st["low"] >= threshold,
            })  # fmt: skip
    shares = {}
    for method in methods:
        if all(method in r["routed_share"] for r in per_clip):
            groups = [r["routed_share"][method] for r in per_clip]
            shares[method] = {
                "share": stats(groups),
                "below_1_percent": stats([[float(v < 0.01) for v in g] for g in groups]),
            }
    return {"table": table, "paired_vs_dense": paired, "targets": targets, "routed_share": shares}


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
        lines += [
            "",
            "Examples (references | ground truth | each method's frames at the highest σ and, when run, from pure "
            "noise | routing maps):",
            "",
        ]
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


def _noise_table(rows: list[tuple[str, dict[str, Any]]], signed: bool = False) -> str:
    lines = [
        "| | " + " | ".join(NOISE_HEADERS[m] for m in NOISE_METRICS) + " |",
        "|---" + "|---:" * len(NOISE_METRICS) + "|",
    ]
    for name, cells in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(cells[m], signed) for m in NOISE_METRICS) + " |")
    return "\n".join(lines)


def render_noise_markdown(
    result: dict[str, Any], command: str | None = None, strips: Sequence[str] = (), label: str | None = None
) -> str:
    """The from-noise section for ``docs/toy_model.md``: targets, both scorings and the paired differences."""
    cfg, env, table = result["config"], result.get("environment", {}), result["table"]
    lines = []
    if cfg["embedder"].startswith("STAND-IN"):
        lines += ["> **STAND-IN EMBEDDER (colour statistics only): these numbers are not a result.**", ""]
    if label:
        lines += [f"**Model: {label}**", ""]
    models = result.get("models", {})
    methods = cfg["methods"]
    every = "every frame" if cfg["located_every"] == 1 else f"one frame of every {cfg['located_every']}"
    lines += [
        f"**From pure noise.** {cfg['clips']} held-out clips of 2-4 subjects ({cfg['subjects']} subjects, "
        f"{cfg['same_colour_subjects']} of them sharing their colour with another subject of their clip; subject "
        "combinations never seen in training"
        + (
            f"; {len(cfg['layout_refused'])} clip(s) left out whose layout gives a subject no video token, which "
            '`routing="masks"` refuses'
            if cfg.get("layout_refused")
            else ""
        )
        + "), each generated from the same seeded noise by every method, "
        f"{cfg['steps']} steps on a linear schedule from σ = 1, guidance_scale={cfg['guidance_scale']}, given the "
        "clip's caption and references. `router` and `similarity` get no layout; `masks` gets the clip's layout "
        'masks (`routing="masks"`); the dense baseline has no layout input'
        + (f" (routed model `{models.get('routed')}`, dense `{models.get('dense')}`)" if models else "")
        + f". Every subject is scored by `{cfg['embedder']}` (trained apart from the generator) over its frames "
        "pooled, three ways (two for a method without routing maps):",
        "",
        f"- **at the layout**: cropped with its layout mask in every frame (≥ {cfg['min_pixels']} pixels): what "
        "`masks` was asked to draw there (the other methods were not told where, so this is near chance for them);",
        "- **routed**: cropped with the method's own routing map (the maps the call returns, last step, in pixels): "
        "where the model put each subject; a subject routed nowhere counts as not matched;",
        f"- **located**: in {every}, without any mask: every square window of the frame is embedded and the "
        "references claim windows one at a time, the best (reference, window) pair by cosine x objectness first "
        "(the score of the embedder's `locate_subject`), and a window overlapping a claimed one is out. It judges "
        "what was drawn wherever it is, but each window is picked *by* a reference, which flatters every row; the "
        "*another clip's frames* row (the next held-out clip's real frames, scored against this clip's references) "
        "shows how much, so located numbers compare methods, not against the targets' absolute levels.",
        "",
        "Own ref best: the subject's own reference is strictly the most similar of its clip's references (mean "
        "cosine over its frames); same-colour: the same for subjects sharing their colour; identity / leakage sim: "
        "that mean cosine to its own / the best other reference; attribute swaps: crops of a same-colour subject "
        "whose predicted shape or pattern is its partner's and not its own; shape / colour acc: the predicted shape "
        "/ colour is its own (chance 0.125 each). Cells: mean over subjects [95% bootstrap interval resampling "
        f"clips, {cfg['resamples']} resamples].",
        "",
    ]
    if result["targets"]:
        lines += ["**Targets** (issue 24, set for the retrained model):", ""]
        for tg in result["targets"]:
            st = tg["value"]
            verdict = "met" if tg["met"] else "**not met**"
            if tg["met"] and not tg["interval_above"]:
                verdict += " (its interval reaches below)"
            floor = table.get("other_clip", {}).get(tg["scoring"], {}).get(tg["metric"])
            if floor is not None and floor["mean"] is not None:
                verdict += f" (another clip's frames score {floor['mean']:.3f} here)"
            lines.append(
                f"- {LABELS[tg['method']]}, {tg['scoring']}: {NOISE_HEADERS[tg['metric']].rstrip(' ↑')} "
                f"{_cell(st)} against ≥ {tg['threshold']:g}: {verdict}."
            )
        lines.append("")
    calib = [c for c in NOISE_CALIBRATION if c in table]
    titles = {
        "layout": "At the layout masks",
        "routed": "Where each method routed each subject (its own routing map)",
        "located": "Located without masks (what each method drew, wherever it is)",
    }
    for scoring, title in titles.items():
        names = [n for n in (*methods, *calib) if scoring in table[n]]
        if not names:
            continue
        lines += [f"**{title}:**", "", _noise_table([(NOISE_LABELS[n], table[n][scoring]) for n in names]), ""]
        diffs = [(k, v[scoring]) for k, v in result["paired_vs_dense"].items() if scoring in v]
        if diffs:
            lines += [
                f"Paired difference to the dense baseline, {scoring} (same clips, subjects and noise):",
                "",
                _noise_table([(k.replace(" - dense", "") + " − dense", v) for k, v in diffs], signed=True),
                "",
            ]
    shares = result.get("routed_share", {})
    if shares:
        parts = [
            f"{m} {_cell(v['share'])} of the video tokens a subject, {_cell(v['below_1_percent'])} of subjects "
            "under 1%"
            for m, v in shares.items()
        ]
        lines += [f"Routing (the maps each call returns, last step): {'; '.join(parts)}.", ""]
    if cfg["methods_left_out"]:
        lines += [f"Left out (no dense pipeline given): {', '.join(cfg['methods_left_out'])}.", ""]
    if strips:
        lines += ["Examples (references | ground truth | each method from pure noise, with its routing maps):", ""]
        lines += [f"![toy claim from noise]({p})" for p in strips]
        lines.append("")
    timing = result["timing_s"]
    lines.append(
        f"Run: {env.get('device', '?')}, torch {env.get('torch', '?')}, diffusers {env.get('diffusers', '?')}, "
        f"{env.get('date', '?')}; {timing['total']:.0f} s in all."
    )
    if command:
        lines += ["", "```bash", command, "```"]
    return "\n".join(lines) + "\n"


def update_marked_section(
    path: str | os.PathLike, block: str, markers: tuple[str, str] = (MARK_START, MARK_END)
) -> None:
    """Replace what lies between the ``markers`` of ``path`` (the toy_claim ones by default; appending the markers
    at the end when absent, creating the file when missing); nothing else of the file changes. Written atomically."""
    path = Path(path)
    mark_start, mark_end = markers
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    section = f"{mark_start}\n{block.rstrip()}\n{mark_end}"
    start, end = text.find(mark_start), text.find(mark_end)
    if (start == -1) != (end == -1) or (start != -1 and end < start):
        raise ValueError(f"`--out-md` {path} has a broken {mark_start} section: one marker without the other")
    if start == -1:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section + "\n"
    else:
        text = text[:start] + section + text[end + len(mark_end) :]
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


# What --quick changes (a smoke test of every path in about a minute); explicit flags still win.
QUICK = {"clips": 2, "noise_clips": 3, "sigmas": (0.8,), "steps": 2, "full_steps": 2, "resamples": 200}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--routed", required=True, help="the DiasR pipeline folder (with a trained id_router)")
    parser.add_argument("--dense", default=None, help="the dense baseline's pipeline folder (omit: no dense rows)")
    parser.add_argument("--test-data", required=True, help="held-out make-synthetic folder (or its manifest.jsonl)")
    parser.add_argument("--train-data", default=None, help="the training make-synthetic folder (for novelty)")
    parser.add_argument("--clips", type=_positive_int, default=None, help="the first N held-out clips (default 16)")
    parser.add_argument("--sigmas", type=_sigma_list, default=None, help="comma-separated noise levels")
    parser.add_argument("--steps", type=_positive_int, default=None, help="steps for σ=1; σ takes round(steps*σ)")
    parser.add_argument("--no-partial", action="store_true", help="skip the runs from noised clips (σ < 1)")
    parser.add_argument("--no-full", action="store_true", help="skip the runs from pure noise")
    parser.add_argument("--noise-clips", type=_positive_int, default=None,
                        help="from pure noise: the first N held-out clips of >= 2 subjects (default 40)")  # fmt: skip
    parser.add_argument("--full-steps", type=_positive_int, default=None, help="steps from pure noise (default 16)")
    parser.add_argument("--noise-methods", default=",".join(NOISE_METHODS), help="methods run from pure noise")
    parser.add_argument("--noise-guidance-scale", type=float, default=None,
                        help="guidance from pure noise (default: --guidance-scale)")  # fmt: skip
    parser.add_argument("--located-every", type=_positive_int, default=2, help="mask-free search every N-th frame")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="the same for every method (1 = no CFG)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {list(METHODS)}")
    parser.add_argument("--num-frames", type=_positive_int, default=9, help="as the models were trained")
    parser.add_argument("--height", type=_positive_int, default=64)
    parser.add_argument("--width", type=_positive_int, default=64)
    parser.add_argument("--max-sequence-length", type=_positive_int, default=64, help="as the models were trained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=_positive_int, default=None, help="bootstrap resamples (default 1000)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK} unless given")
    parser.add_argument("--out", default="runs/toy_claim", help="folder for toy_claim.json and toy_claim.md")
    parser.add_argument("--out-json", default=None, help="also write the result JSON to this file")
    parser.add_argument("--out-md", default=None, help="update the toy_claim sections of this markdown file")
    parser.add_argument("--label", default=None, help="which model this is, printed above the from-noise tables")
    parser.add_argument("--strips", default=None, help="write example strips (PNG) into this folder")
    parser.add_argument("--num-strips", type=_positive_int, default=3)
    args = parser.parse_args(argv)
    defaults = {"clips": 16, "noise_clips": 40, "sigmas": SIGMAS, "steps": 8, "full_steps": 16, "resamples": 1000}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    if args.no_partial and args.no_full:
        parser.error("--no-partial and --no-full together leave nothing to run")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    noise_methods = tuple(m.strip() for m in args.noise_methods.split(",") if m.strip())
    settings = ClaimSettings(
        sigmas=args.sigmas, steps=args.steps, full_steps=args.full_steps, guidance_scale=args.guidance_scale,
        methods=methods, full_generation=not args.no_full, seed=args.seed, resamples=args.resamples,
        num_frames=args.num_frames, height=args.height, width=args.width, max_sequence_length=args.max_sequence_length,
        noise_methods=noise_methods, noise_guidance_scale=args.noise_guidance_scale, located_every=args.located_every,
    )  # fmt: skip
    try:
        settings.validate()
    except ValueError as err:
        parser.error(str(err))
    if not args.no_full and not noise_methods:
        parser.error("--noise-methods is empty")
    # Local folders only: a missing path must not turn into a Hub download attempt inside from_pretrained.
    for flag, value in (("--routed", args.routed), ("--dense", args.dense)):
        if value is not None and not (Path(value) / "model_index.json").is_file():
            parser.error(f"{flag} {value} is not a saved pipeline folder (no model_index.json)")
    for flag, value in (("--test-data", args.test_data), ("--train-data", args.train_data)):
        if value is not None and not (Path(value).is_file() or (Path(value) / "manifest.jsonl").is_file()):
            parser.error(f"{flag} {value} is neither a manifest nor a folder with manifest.jsonl")
    for flag, value in (("--out-md", args.out_md), ("--out-json", args.out_json)):
        if value is not None and Path(value).is_dir():
            parser.error(f"{flag} {value} is a folder; expected a file path")
    scorer = load_embedder()
    routed = DiasRPipeline.from_pretrained(args.routed)
    dense = DiasRPipeline.from_pretrained(args.dense) if args.dense else None
    if dense is not None:
        try:
            _check_same_latents(routed, dense)
        except ValueError as err:
            parser.error(f"--dense: {err}")
    strip_count = args.num_strips if args.strips else 0
    result: dict[str, Any] = {}
    if not args.no_partial:
        result = run_claim(
            routed, dense, args.test_data, args.train_data, clips=args.clips, settings=settings, scorer=scorer,
            strip_clips=strip_count,
        )  # fmt: skip
        result["trainer_eval"] = _trainer_eval(args.routed)
    strips: dict[str, Any] = result.pop("_strips", {})
    if not args.no_full:
        noise = run_from_noise(
            routed, dense, args.test_data, clips=args.noise_clips, settings=settings, scorer=scorer,
            strip_clips=strip_count,
        )  # fmt: skip
        for clip_id, entry in noise.pop("_strips").items():
            strips.setdefault(clip_id, entry)["full"] = entry["full"]
        result["from_noise"] = noise
    env = environment()
    result["environment"] = env
    result["models"] = {"routed": str(args.routed), "dense": args.dense, "label": args.label}
    command = "OMP_NUM_THREADS={} PYTHONPATH=src python benchmarks/toy_claim.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "?"), shlex.join(sys.argv[1:] if argv is None else argv)
    )
    result["command"] = command
    strip_paths = (
        write_strips({"_strips": strips}, args.strips, routed.vae_scale_factor_temporal) if args.strips else []
    )
    md_links = []
    if args.out_md:
        md_links = [os.path.relpath(p, Path(args.out_md).resolve().parent) for p in map(Path.resolve, strip_paths)]
    sections = []
    if not args.no_partial:
        sections.append(((MARK_START, MARK_END), render_markdown(result, command, md_links)))
    if not args.no_full:
        noise = result["from_noise"] | {"environment": env, "models": result["models"]}
        links = md_links if args.no_partial else []  # the strips are linked once, from the first section
        sections.append(((NOISE_MARK_START, NOISE_MARK_END), render_noise_markdown(noise, command, links, args.label)))
    markdown = "\n".join(block for _, block in sections)
    out = Path(args.out)
    text = json.dumps(_jsonable(result), indent=2) + "\n"
    atomic_write_text(out / "toy_claim.json", text)
    if args.out_json:
        atomic_write_text(args.out_json, text)
    atomic_write_text(out / "toy_claim.md", markdown)
    if args.out_md:
        for markers, block in sections:
            update_marked_section(args.out_md, block, markers)
    print(markdown)
    written = [out / "toy_claim.json", out / "toy_claim.md", args.out_json, args.out_md]
    print("wrote " + ", ".join(str(w) for w in written if w))


if __name__ == "__main__":
    main()
