"""How much sprite identity survives a toy VAE round trip? The ceiling any generator on that VAE can show.

Each clip of a ``make-synthetic`` folder goes through the VAE (encode, posterior mode, decode); every visible subject
(>= 12 pixels in a frame) is cropped with its ground-truth mask and classified by the shipped ``SpriteEmbedder``.
Reports reconstruction MSE (pixels in [-1, 1]) and the embedder's shape / colour / pattern accuracy on frame 0
(encoded alone by Wan's causal VAE) and on the later frames (encoded in groups of the temporal compression), next to
the same accuracy on the original frames.

    PYTHONPATH=src python benchmarks/toy_vae_shape.py --data runs/sprites_test --vae sprites [--vae runs/toy_vae_4k]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from diasr_diffusers.data import load_manifest
from diasr_diffusers.data._io import read_video_frames
from diasr_diffusers.eval.sprites import ATTRIBUTES, crop_subject, load_sprite_embedder
from diasr_diffusers.utils.tiny import toy_vae_path


def round_trip(vae: AutoencoderKLWan, frames: np.ndarray) -> tuple[np.ndarray, float]:
    """(F, H, W, 3) uint8 -> the VAE's reconstruction as uint8, and its MSE in [-1, 1]."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].clamp(-1, 1)
    mse = float(((rec - x[0]) ** 2).mean())
    return ((rec.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy(), mse


def accuracy(embedder, samples: list[tuple[np.ndarray, np.ndarray, dict[str, str]]]) -> dict[str, float]:
    crops = [crop_subject(frame, mask) for frame, mask, _ in samples]
    preds = embedder.predict([c for c, _ in crops], [m for _, m in crops])
    right = {k: [p[k] == meta[k] for p, (_, _, meta) in zip(preds, samples)] for k in ATTRIBUTES}
    out = {f"{k}_accuracy": round(float(np.mean(v)), 3) for k, v in right.items()}
    out["all_three_accuracy"] = round(float(np.mean([all(r) for r in zip(*right.values())])), 3)
    out["crops"] = len(samples)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a make-synthetic folder (seed not used to train the VAE)")
    parser.add_argument("--vae", action="append", required=True, help="'sprites' (shipped) or a saved VAE folder")
    parser.add_argument("--clips", type=int, default=64)
    args = parser.parse_args()

    embedder = load_sprite_embedder()
    records = load_manifest(args.data, check_media=False, skip_invalid=False).records[: args.clips]
    clips = []
    for rec in records:
        frames = read_video_frames(rec.video, range(rec.frame_start, rec.end))
        masks = np.stack([s.masks.load(range(rec.frame_start, rec.end)) for s in rec.subjects])
        metas = [{k: s.meta[k] for k in ATTRIBUTES} for s in rec.subjects]
        clips.append((frames, masks, metas))

    def samples(all_frames: list[np.ndarray], first: bool) -> list:
        return [(frames[t], masks[i, t], metas[i])
                for frames, (_, masks, metas) in zip(all_frames, clips)
                for t in (range(1) if first else range(1, len(frames)))
                for i in range(len(metas)) if masks[i, t].sum() >= 12]  # fmt: skip

    originals = [frames for frames, _, _ in clips]
    results = {"original": {"frame0": accuracy(embedder, samples(originals, True)),
                            "later": accuracy(embedder, samples(originals, False))}}  # fmt: skip
    for name in args.vae:
        vae = AutoencoderKLWan.from_pretrained(toy_vae_path(name)).eval()
        decoded, errors = zip(*(round_trip(vae, frames) for frames in originals))
        results[name] = {"mse": round(float(np.mean(errors)), 4),
                         "frame0": accuracy(embedder, samples(list(decoded), True)),
                         "later": accuracy(embedder, samples(list(decoded), False))}  # fmt: skip
    print(json.dumps({"data": args.data, "clips": len(clips), **results}, indent=1))


if __name__ == "__main__":
    main()
