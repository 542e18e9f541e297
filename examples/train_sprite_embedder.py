"""Train the sprite identity embedder shipped as ``diasr_diffusers/assets/sprite_embedder`` (docs/toy_model.md).

The embedder scores generated sprite videos, so it must not learn from the generator: it trains on ``make-synthetic``
clips of seeds that neither the generator's training set (seed 1) nor its held-out set (seed 3) uses, with
augmentations that imitate a blurry generated video (blur, downscale-upscale, ghosting with the next frame, small
colour jitter, noise, misaligned or wrong-shaped masks, occlusion). It never sees the generator's weights; the toy
VAE is used only afterwards, to *measure* accuracy on VAE round-trips of the validation clips.

    diasr make-synthetic --out runs/embedder_train --num-clips 300 --seed 2000 --frames 9 --height 64 --width 64
    diasr make-synthetic --out runs/embedder_val --num-clips 100 --seed 2001 --frames 9 --height 64 --width 64
    OMP_NUM_THREADS=1 python examples/train_sprite_embedder.py --train runs/embedder_train --val runs/embedder_val \
        --out src/diasr_diffusers/assets/sprite_embedder

The first ``--calibration-clips`` validation clips fit the heads' softmax temperatures; the others are reported.
Deterministic for a given ``--seed`` and thread count (one thread by default).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from diasr_diffusers.data import load_manifest
from diasr_diffusers.data._io import read_video_frames
from diasr_diffusers.data.dataset import load_reference
from diasr_diffusers.data.synthetic import COLORS, SHAPES, shape_mask
from diasr_diffusers.eval.sprites import ATTRIBUTES, SpriteEmbedder, crop_subject, locate_subject
from diasr_diffusers.utils.io import atomic_dir, atomic_write_text


@dataclass
class Clip:
    frames: np.ndarray  # (F, H, W, 3) uint8, decoded from the mp4
    masks: np.ndarray  # (N, F, H, W) bool
    refs: list[np.ndarray]  # N x (R, R, 3) uint8
    ref_masks: list[np.ndarray]  # N x (R, R) bool
    labels: np.ndarray  # (N, 3) class indices of shape, colour, pattern


def load_clips(folder: str, labels: dict[str, list[str]]) -> list[Clip]:
    clips = []
    for rec in load_manifest(folder, check_media=False, skip_invalid=False).records:
        frames = read_video_frames(rec.video, range(rec.frame_start, rec.end))
        masks = np.stack([s.masks.load(range(rec.frame_start, rec.end)) for s in rec.subjects])
        refs = [load_reference(s.references[0]) for s in rec.subjects]
        ids = [[labels[k].index(s.meta[k]) for k in ATTRIBUTES] for s in rec.subjects]
        clips.append(Clip(frames, masks, [r for r, _ in refs], [m for _, m in refs], np.array(ids)))
    return clips


# -- augmentations ---------------------------------------------------------------------------------------------------


def shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def other_shape_mask(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """A random shape's mask at the mask's place and size: a layout mask need not match the generated sprite."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    radius = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / 2 / 0.85
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    a = math.radians(r.uniform(0, 360))
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    out = shape_mask(str(r.choice(SHAPES)), math.cos(a) * dx + math.sin(a) * dy, -math.sin(a) * dx + math.cos(a) * dy)
    return out if out.any() else mask


def perturb_mask(mask: np.ndarray, r: np.random.Generator, wrong_shape_p: float = 0.25, shift: int = 2) -> np.ndarray:
    if r.random() < wrong_shape_p:
        mask = other_shape_mask(mask, r)
    out = shifted(mask, *(int(v) for v in r.integers(-shift, shift + 1, size=2)))
    k = int(r.integers(-1, 2))
    if k:
        img = Image.fromarray(out.astype(np.uint8) * 255)
        out = np.asarray(img.filter(ImageFilter.MaxFilter(3) if k > 0 else ImageFilter.MinFilter(3))) > 127
    return out if out.any() else mask


def degrade(
    image: np.ndarray, r: np.random.Generator, neighbour: np.ndarray | None = None, always: bool = False
) -> np.ndarray:
    """Blur, resolution loss, ghosting, small colour shifts and noise, as a generator (and its VAE) blur frames."""

    def on(p: float) -> bool:
        return always or r.random() < p

    h, w = image.shape[:2]
    x = image.astype(np.float32)
    if neighbour is not None and on(0.3):  # a temporally compressed latent mixes neighbouring frames
        a = r.uniform(0.1, 0.4)
        x = (1 - a) * x + a * neighbour.astype(np.float32)
    img = Image.fromarray(x.round().clip(0, 255).astype(np.uint8))
    if on(0.5):
        f = int(r.integers(2, 5))
        img = img.resize((max(1, w // f), max(1, h // f)), Image.BOX).resize((w, h), Image.BICUBIC)
    if on(0.6):
        img = img.filter(ImageFilter.GaussianBlur(r.uniform(0.3, 1.8)))
    x = np.asarray(img, dtype=np.float32)
    if on(0.7):  # small amplitude: a large hue or gain change would turn one named colour into another
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = (x - mean) * r.uniform(0.85, 1.15) + mean  # contrast
        gray = x.mean(-1, keepdims=True)
        x = (x - gray) * r.uniform(0.8, 1.15) + gray  # saturation
        x = x * r.uniform(0.93, 1.07, size=3) + r.uniform(-12, 12)
    if on(0.5):
        x = x + r.normal(0, r.uniform(1, 7), size=x.shape)
    return x.round().clip(0, 255).astype(np.uint8)


def occlude(crop: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """A rectangle of another colour over a corner of the crop (a sprite or background passing in front)."""
    s = crop.shape[0]
    hh, ww = (r.uniform(0.25, 0.5, size=2) * s).astype(int) + 1
    y0 = 0 if r.random() < 0.5 else s - hh
    x0 = int(r.integers(0, s - ww + 1))
    if r.random() < 0.5:
        y0, x0, hh, ww = x0, y0, ww, hh  # left or right edge instead of top or bottom
    crop = crop.copy()
    colour = list(COLORS.values())[int(r.integers(len(COLORS)))] if r.random() < 0.5 else r.uniform(60, 200, size=3)
    crop[y0 : y0 + hh, x0 : x0 + ww] = np.asarray(colour).round().astype(np.uint8)
    return crop


# -- samples: (crop, mask or None, attribute labels (3,) or -1, objectness label) -------------------------------------


def frame_sample(clip: Clip, t: int, i: int, r: np.random.Generator, mode: str):
    """Subject ``i`` in frame ``t``: ``mode`` "train" (random augmentation), "clean" or "degraded" (validation)."""
    frame, mask = clip.frames[t], clip.masks[i, t]
    if mode == "clean":
        crop, crop_mask = crop_subject(frame, mask)
        return crop, crop_mask, clip.labels[i], 1.0
    neighbour = clip.frames[min(t + 1, len(clip.frames) - 1)]
    frame = degrade(frame, r, neighbour, always=mode == "degraded")
    mask = perturb_mask(mask, r, wrong_shape_p=0.25 if mode == "train" else 0.0)
    crop, crop_mask = crop_subject(frame, mask, pad=float(r.uniform(0.05, 0.6)) if mode == "train" else 0.15)
    if r.random() < 0.2:
        crop = occlude(crop, r)
    use_mask = mode != "train" or r.random() < 0.75
    return crop, crop_mask if use_mask else None, clip.labels[i], 1.0


def reference_sample(clip: Clip, i: int, r: np.random.Generator):
    ref, mask = clip.refs[i], clip.ref_masks[i]
    if r.random() < 0.5:
        ref = degrade(ref, r)
    if r.random() < 0.3:
        return ref, None, clip.labels[i], 1.0
    crop, crop_mask = crop_subject(ref, perturb_mask(mask, r, shift=4), pad=float(r.uniform(0.05, 0.6)))
    return crop, crop_mask if r.random() < 0.7 else None, clip.labels[i], 1.0


def negative_sample(clip: Clip, r: np.random.Generator):
    """A window that is not centred on a sprite of about its size: background, an edge of a sprite, a tiny one."""
    t = int(r.integers(len(clip.frames)))
    h, w = clip.frames.shape[1:3]
    frame = degrade(clip.frames[t], r)
    for _ in range(50):
        side = int(r.integers(round(0.25 * min(h, w)), round(0.6 * min(h, w)) + 1))
        y0, x0 = int(r.integers(0, h - side + 1)), int(r.integers(0, w - side + 1))
        near = False
        for m in clip.masks[:, t]:
            if m.any():
                ys, xs = np.nonzero(m)
                dist = math.hypot(
                    (ys.min() + ys.max() + 1) / 2 - (y0 + side / 2), (xs.min() + xs.max() + 1) / 2 - (x0 + side / 2)
                )
                ratio = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / side
                near |= dist <= 0.3 * side and 0.3 <= ratio <= 1.2  # positive, or too close to call
        if not near:
            return frame[y0 : y0 + side, x0 : x0 + side], None, np.full(3, -1), 0.0
    return None


def training_batch(clips: list[Clip], visible: list[tuple[int, int, int]], n: int, r: np.random.Generator,
                   hard_fraction: float = 1.0):  # fmt: skip
    """``n`` samples: a ``hard_fraction`` from the full mix (augmented subject crops, references, negatives), the
    rest clean subject crops with exact masks."""
    samples = []
    while len(samples) < n:
        u = r.random()
        if r.random() >= hard_fraction:
            c, t, i = visible[int(r.integers(len(visible)))]
            samples.append(frame_sample(clips[c], t, i, r, "clean"))
        elif u < 0.65:
            c, t, i = visible[int(r.integers(len(visible)))]
            samples.append(frame_sample(clips[c], t, i, r, "train"))
        elif u < 0.8:
            clip = clips[int(r.integers(len(clips)))]
            samples.append(reference_sample(clip, int(r.integers(len(clip.refs))), r))
        else:
            sample = negative_sample(clips[int(r.integers(len(clips)))], r)
            if sample is not None:
                samples.append(sample)
    crops, masks, labels, objectness = zip(*samples)
    return list(crops), list(masks), torch.as_tensor(np.stack(labels)), torch.tensor(objectness)


def visible_subjects(clips: list[Clip], min_pixels: int = 12) -> list[tuple[int, int, int]]:
    return [(c, t, i) for c, clip in enumerate(clips) for i in range(len(clip.refs)) for t in range(len(clip.frames))
            if clip.masks[i, t].sum() >= min_pixels]  # fmt: skip


# -- training and calibration -----------------------------------------------------------------------------------------


def train(model: SpriteEmbedder, clips: list[Clip], steps: int, batch_size: int, lr: float, r: np.random.Generator,
          max_hard_fraction: float = 0.8, log_every: int = 100) -> None:  # fmt: skip
    visible = visible_subjects(clips)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = min(50, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        # A curriculum: shape is learnt far faster from clean crops, so augmented ones come in gradually.
        hard = max_hard_fraction * min(1.0, step / (0.5 * steps))
        crops, masks, labels, objectness = training_batch(clips, visible, batch_size, r, hard)
        out = model(model.preprocess(crops, masks))
        losses = {k: F.cross_entropy(out[k], labels[:, j], ignore_index=-1) for j, k in enumerate(ATTRIBUTES)}
        losses["objectness"] = 0.5 * F.binary_cross_entropy_with_logits(out["objectness"], objectness)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            parts = " ".join(f"{k} {float(v.detach()):.3f}" for k, v in losses.items())
            print(
                f"step {step} loss {float(loss.detach()):.3f} ({parts}) {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    model.eval()


def calibrate(model: SpriteEmbedder, clips: list[Clip], r: np.random.Generator) -> list[float]:
    """Fit each head's softmax temperature on degraded crops (NLL, grid search) and store them in the config."""
    samples, _ = validation_samples(clips, "degraded", r)
    crops, masks, labels, _ = zip(*samples)
    labels = torch.as_tensor(np.stack(labels))
    logits = model.logits(list(crops), list(masks))
    temperatures = [temperature_fit(logits[k], labels[:, j]) for j, k in enumerate(ATTRIBUTES)]
    model.register_to_config(temperatures=temperatures)
    return temperatures


# -- validation -------------------------------------------------------------------------------------------------------


def vae_round_trip(clips: list[Clip]) -> list[Clip]:
    """The clips through the toy VAE (encode, decode): what the best generator on that VAE could show."""
    from diffusers import AutoencoderKLWan

    from diasr_diffusers.utils.tiny import toy_vae_path

    vae = AutoencoderKLWan.from_pretrained(toy_vae_path("sprites")).eval()
    out = []
    for clip in clips:
        x = torch.from_numpy(clip.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]
        frames = ((rec.permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        out.append(Clip(frames, clip.masks, clip.refs, clip.ref_masks, clip.labels))
    return out


def validation_samples(clips: list[Clip], mode: str, r: np.random.Generator):
    samples, owners = [], []
    for c, t, i in visible_subjects(clips):
        samples.append(frame_sample(clips[c], t, i, r, mode))
        owners.append((c, i))
    return samples, owners


def temperature_fit(logits: torch.Tensor, labels: torch.Tensor) -> float:
    grid = np.exp(np.linspace(math.log(0.5), math.log(8.0), 61))
    nll = [float(F.cross_entropy(logits / t, labels)) for t in grid]
    return float(grid[int(np.argmin(nll))])


def scores(model: SpriteEmbedder, clips: list[Clip], mode: str, r: np.random.Generator) -> dict[str, Any]:
    samples, owners = validation_samples(clips, mode, r)
    crops, masks, labels, _ = zip(*samples)
    labels = torch.as_tensor(np.stack(labels))
    logits = model.logits(list(crops), list(masks))
    result = {
        f"{k}_accuracy": float((logits[k].argmax(-1) == labels[:, j]).float().mean()) for j, k in enumerate(ATTRIBUTES)
    }
    result["all_three_accuracy"] = float(
        torch.stack([logits[k].argmax(-1) == labels[:, j] for j, k in enumerate(ATTRIBUTES)]).all(0).float().mean()
    )
    # make-synthetic's square and diamond are one shape turned by 45 degrees (2% apart in size): only a pattern's
    # orientation to the edges tells them apart, so their confusions are reported apart from the others.
    shapes = model.labels["shape"]
    same = {shapes.index("square"), shapes.index("diamond")}
    predicted = logits["shape"].argmax(-1)
    merged = [int(p) == int(t) or {int(p), int(t)} == same for p, t in zip(predicted, labels[:, 0])]
    result["shape_accuracy_square_is_diamond"] = float(np.mean(merged))
    confusion = torch.zeros(len(shapes), len(shapes), dtype=torch.long)
    confusion.index_put_((labels[:, 0], predicted), torch.ones(len(predicted), dtype=torch.long), accumulate=True)
    result["shape_confusion"] = {"rows_true_cols_predicted": shapes, "counts": confusion.tolist()}
    emb = model.embed_logits(logits)
    # References are clean (the user's images), cropped with their masks.
    refs = [model.embed([crop_subject(im, m)[0] for im, m in zip(clip.refs, clip.ref_masks)],
                        [crop_subject(im, m)[1] for im, m in zip(clip.refs, clip.ref_masks)]) for clip in clips]  # fmt: skip
    hits, same_colour_hits, margins, own_sims = [], [], [], []
    for row, (c, i) in enumerate(owners):
        if len(clips[c].refs) < 2:
            continue
        sims = refs[c] @ emb[row]
        hits.append(int(sims.argmax()) == i)
        own_sims.append(float(sims[i]))
        margins.append(float(sims[i] - torch.cat([sims[:i], sims[i + 1 :]]).max()))
        colours = clips[c].labels[:, 1]
        if (colours == colours[i]).sum() > 1:
            same_colour_hits.append(hits[-1])
    result.update(
        identity_match=float(np.mean(hits)), identity_match_same_colour=float(np.mean(same_colour_hits)),
        own_similarity=float(np.mean(own_sims)), mean_margin=float(np.mean(margins)),
        crops=len(samples), identity_crops=len(hits), same_colour_crops=len(same_colour_hits),
    )  # fmt: skip
    return result


def locate_accuracy(model: SpriteEmbedder, clips: list[Clip]) -> float:
    """Middle frame of each multi-subject clip: does ``locate_subject`` (no mask) put each reference's best window
    centre inside that subject's visible box?"""
    hits = []
    for clip in clips:
        t = len(clip.frames) // 2
        if len(clip.refs) < 2:
            continue
        crops = [crop_subject(im, m) for im, m in zip(clip.refs, clip.ref_masks)]
        refs = model.embed([c for c, _ in crops], [m for _, m in crops])
        for i, found in enumerate(locate_subject(clip.frames[t], refs, model)):
            if clip.masks[i, t].sum() < 12:
                continue
            ys, xs = np.nonzero(clip.masks[i, t])
            cx, cy = (found.box[0] + found.box[2]) / 2, (found.box[1] + found.box[3]) / 2
            hits.append(xs.min() <= cx <= xs.max() + 1 and ys.min() <= cy <= ys.max() + 1)
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="make-synthetic folder to train on (not seeds 1 or 3)")
    parser.add_argument("--val", required=True, help="make-synthetic folder of another seed: calibration and scores")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on the count)")
    parser.add_argument("--calibration-clips", type=int, default=30)
    parser.add_argument("--no-vae-check", action="store_true", help="skip the toy-VAE round-trip measurement")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = SpriteEmbedder()
    train_clips = load_clips(args.train, model.labels)
    val_clips = load_clips(args.val, model.labels)
    calibration_clips, report_clips = val_clips[: args.calibration_clips], val_clips[args.calibration_clips :]
    print(f"loaded {len(train_clips)} training and {len(val_clips)} validation clips in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip

    train_start = time.perf_counter()
    train(model, train_clips, args.steps, args.batch_size, args.lr, np.random.default_rng(args.seed))
    train_seconds = time.perf_counter() - train_start

    eval_rng = np.random.default_rng(args.seed + 1)
    temperatures = calibrate(model, calibration_clips, eval_rng)
    print(f"temperatures (shape, colour, pattern) fitted on degraded crops of {len(calibration_clips)} clips: "
          f"{[round(t, 3) for t in temperatures]}")  # fmt: skip
    report: dict[str, Any] = {
        "clean": scores(model, report_clips, "clean", eval_rng),
        "degraded": scores(model, report_clips, "degraded", eval_rng),
    }
    report["clean"]["locate_accuracy"] = locate_accuracy(model, report_clips)
    if not args.no_vae_check:
        vae_clips = vae_round_trip(report_clips)
        report["toy_vae_round_trip"] = scores(model, vae_clips, "clean", eval_rng)
        report["toy_vae_round_trip"]["locate_accuracy"] = locate_accuracy(model, vae_clips)
    report["meta"] = {
        "train": args.train, "val": args.val, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "training_seconds": round(train_seconds),
        "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters()),
        "temperatures": temperatures, "report_clips": len(report_clips), "calibration_clips": len(calibration_clips),
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    with atomic_dir(args.out) as tmp:  # written whole, then renamed into place
        model.save_pretrained(tmp)
        atomic_write_text(tmp / "training_report.json", json.dumps(report, indent=1) + "\n")
    print(f"saved {args.out} (total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
