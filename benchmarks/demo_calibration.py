"""Calibrate ``diasr demo``'s "is a sprite drawn at all?" rule on frames whose answer is known.

The demo finds each subject by the sprite embedder's mask-free search (the window that best matches its reference
in every frame) and calls it a *sprite-like object* when the embedder's objectness there, averaged over the frames,
reaches ``diasr_diffusers.eval.demo.OBJECTNESS_THRESHOLD``. The same search runs here, per subject of two-sprite
clips rendered by ``make-synthetic``'s renderer (a seed no model trained on), on:

- ``sprites``: the clean clips (the answer is yes);
- ``sprites_vae``: the clips after the sprite model's VAE round trip (what a perfect generator on it could show;
  reported, not used for the threshold);
- ``blob_textures``: the frame filled with smooth random blobs in the two sprites' colours and patterns, as the
  router and dense panels draw (no);
- ``blobs``: each sprite replaced, in place, by an irregular smooth blob of its colour and about its area (no);
- ``noise``: uniform noise (no).

For each candidate statistic (``candidates``: mean objectness; the shape head's median top probability,
:func:`~diasr_diffusers.eval.demo.shape_confidence`; the mean probability of the most frequent / the true shape) the
report gives its AUC (sprites against blobs and noise), the value at most 5% of blob and noise subjects reach
(``neg_p95``) and the share of sprites that reach it (``pos_reach``); the shipped threshold is mean objectness's
``neg_p95``. Per kind: percentiles of the shape statistic and the mean objectness. (The keys
``calibrated_threshold`` and ``reach_*`` are the shape statistic's: at its ``neg_p95``, and at 0.8.)

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/demo_calibration.py --clips 8 \\
        --out benchmarks/results/demo_calibration.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from diasr_diffusers.data.synthetic import COLORS, pattern_mask, render_clip
from diasr_diffusers.eval.demo import search_subjects, shape_confidence
from diasr_diffusers.eval.sprites import load_sprite_embedder
from diasr_diffusers.utils.toy import load_sprite_model

NEGATIVES = ("blob_textures", "blobs", "noise")
SHAPE_CUT = 0.8  # a first guess at a shape rule, reported for comparison


def _smooth_blob(rng: np.random.Generator, height: int, width: int, fraction: float, sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.normal(size=(height, width)), sigma)
    return field > np.quantile(field, 1 - fraction)


def _paint(frame: np.ndarray, mask: np.ndarray, sprite, radius: float) -> None:
    """Fill ``mask`` with the sprite's colour and, on its pattern's pixels (at a sprite's scale ``radius``), the
    renderer's dark shade."""
    colour = np.asarray(COLORS[sprite.color], np.float32)
    u = np.broadcast_to(np.arange(frame.shape[1])[None] / radius, mask.shape)
    v = np.broadcast_to(np.arange(frame.shape[0])[:, None] / radius, mask.shape)
    frame[mask] = colour
    frame[mask & pattern_mask(sprite.pattern, u, v)] = colour * 0.4


def negatives(clip, rng: np.random.Generator) -> dict[str, np.ndarray]:
    frames = clip.frames.astype(np.float32)
    f, h, w, _ = frames.shape
    textures = np.full_like(frames, 128.0)
    blobs = frames.copy()
    for t in range(f):
        for i, sprite in enumerate(clip.sprites):
            _paint(textures[t], _smooth_blob(rng, h, w, 0.3, 3.0), sprite, float(clip.radii[i]))
            mask = clip.masks[i, t]
            if mask.any():  # an irregular blob over the sprite's box, about the sprite's area
                ys, xs = np.nonzero(mask)
                y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                box = np.zeros((h, w), bool)
                box[y0:y1, x0:x1] = True
                local = _smooth_blob(rng, h, w, 0.5, 2.0) & box
                blobs[t][mask] = np.median(frames[t][~clip.masks[:, t].any(0)], axis=0)  # background where it was
                _paint(blobs[t], local, sprite, float(clip.radii[i]))
    smooth = [gaussian_filter(x, (0, 0.8, 0.8, 0)) for x in (textures, blobs)]
    return {
        "blob_textures": smooth[0].clip(0, 255).astype(np.uint8),
        "blobs": smooth[1].clip(0, 255).astype(np.uint8),
        "noise": rng.integers(0, 256, frames.shape).astype(np.uint8),
    }


def vae_round_trip(vae, frames: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].clamp(-1, 1)
    return ((rec.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=16, help="two-sprite clips of 9 frames")
    parser.add_argument("--seed", type=int, default=7777, help="make-synthetic seed (no model trained on it)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    start = time.perf_counter()
    embedder = load_sprite_embedder()
    vae = load_sprite_model().vae
    rng = np.random.default_rng(args.seed)
    stats: dict[str, list[dict[str, float]]] = {}
    with torch.no_grad():
        for index in range(args.clips):
            clip = render_clip(args.seed, index, num_subjects=2, num_frames=9, height=64, width=64)
            refs = embedder.embed(clip.references)
            kinds = {"sprites": clip.frames, "sprites_vae": vae_round_trip(vae, clip.frames), **negatives(clip, rng)}
            for kind, frames in kinds.items():
                for i, found in enumerate(search_subjects(frames, refs, embedder)):
                    shape = found["probs"]["shape"]  # (F, C)
                    modal = np.bincount(shape.argmax(-1), minlength=shape.shape[1]).argmax()
                    own = embedder.labels["shape"].index(clip.sprites[i].shape)
                    stats.setdefault(kind, []).append({
                        "shape_confidence": shape_confidence(shape),
                        "modal_shape_prob": float(shape[:, modal].mean()),
                        "own_shape_prob": float(shape[:, own].mean()),
                        "objectness": float(found["objectness"].mean()),
                    })  # fmt: skip
    candidates = {}
    for stat in ("shape_confidence", "modal_shape_prob", "own_shape_prob", "objectness"):
        pos = np.array([s[stat] for s in stats["sprites"]])
        neg = np.array([s[stat] for k in NEGATIVES for s in stats[k]])
        auc = float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
        cut = float(np.quantile(neg, 0.95))
        candidates[stat] = {
            "auc": round(auc, 3),
            "neg_p95": round(cut, 3),
            "pos_reach": round(float((pos >= cut).mean()), 3),
        }
    negative = np.array([s["shape_confidence"] for k in NEGATIVES for s in stats[k]])
    threshold = float(np.ceil(np.quantile(negative, 0.95) * 100) / 100)
    summary = {
        kind: {
            "subjects": len(rows),
            "shape_confidence_p10_p50_p90": np.percentile([r["shape_confidence"] for r in rows], [10, 50, 90])
            .round(3)
            .tolist(),
            "objectness_mean": round(float(np.mean([r["objectness"] for r in rows])), 3),
            "reach_calibrated_threshold": round(float(np.mean([r["shape_confidence"] >= threshold for r in rows])), 3),
            "reach_shipped_threshold": round(float(np.mean([r["shape_confidence"] >= SHAPE_CUT for r in rows])), 3),
        }
        for kind, rows in stats.items()
    }
    result = {
        "calibrated_threshold": threshold,
        "shipped_threshold": SHAPE_CUT,
        "kinds": summary,
        "candidates": candidates,
        "clips": args.clips,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
