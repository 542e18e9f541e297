"""How well can routing be learned on the synthetic sprites? Three reference points for issue 4's IoU target.

1. ``colour``: no learning. Each video token (its pixels averaged per latent frame, on the toy VAE's latent grid)
   goes to the subject whose reference has the nearest mean colour, or to null past a distance threshold (swept;
   best reported).
2. ``router-on-pixels``: an ``IDRouter`` trained with the routing loss on those oracle pixel features (its token
   LayerNorm off: see ``fit_router``), and on every pixel of each token (texture inside a token, e.g. stripes).
3. ``router-on-toy-model``: the same router trained on what it sees inside the toy Wan model (the layer-0
   attention inputs of video and reference tokens at ``--sigma``), as ``diasr train`` would.

Held-out routing IoU (mean over subjects present) for each. Prints a markdown table.

    PYTHONPATH=src python benchmarks/routing_ceiling.py --data runs/synthetic --clips 120 --epochs 15 [--tiny-vae sprites]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from diasr_diffusers.data import MuSADataset
from diasr_diffusers.eval import label_iou
from diasr_diffusers.routing import IDRouter, pixels_to_token_grid, routing_cross_entropy, token_grid_factors
from diasr_diffusers.utils.tiny import tiny_wan_components


def pixel_tokens(item, spatial: int, temporal: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(1, L, 3) mean colour of each token (``spatial``^2 pixels, Wan's frame grouping) and per-subject references."""
    grid = pixels_to_token_grid(item["video"], temporal_compression=temporal, spatial_compression=spatial, patch_size=(1, 1, 1))
    video = grid.flatten(1).T[None]  # (3, F_lat, h, w) -> (1, L, 3) in token order
    refs = [F.avg_pool2d(r[None], spatial)[0].flatten(1).T[None] for r in item["ref_images"]]
    return video, refs


def pixel_patch_tokens(item, spatial: int, temporal: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(1, L, 3 * spatial^2) every pixel of each token (averaged over its frames): colour plus in-token texture."""
    unshuffled = F.pixel_unshuffle(item["video"].transpose(0, 1), spatial).transpose(0, 1)  # (3 s^2, F, h, w)
    grid = pixels_to_token_grid(unshuffled, temporal_compression=temporal, spatial_compression=1, patch_size=(1, 1, 1))
    refs = [F.pixel_unshuffle(r[None], spatial)[0].flatten(1).T[None] for r in item["ref_images"]]
    return grid.flatten(1).T[None], refs


def colour_baseline(items, spatial: int, temporal: int) -> float:
    best = 0.0
    for thr in (0.1, 0.15, 0.2, 0.3, 0.5):
        ious = []
        for it in items:
            video, _ = pixel_tokens(it, spatial, temporal)
            cents = []
            for r in it["ref_images"]:
                p = r.flatten(1).T
                keep = (p < 0.9).any(-1)  # non-white reference pixels
                cents.append(p[keep].mean(0) if keep.any() else p.mean(0))
            d = torch.cdist(video[0], torch.stack(cents))
            dmin, arg = d.min(-1)
            pred = torch.where(dmin < thr * 2 * 3**0.5, arg, torch.full_like(arg, -1))
            ious += [u for u in label_iou(pred, it["token_labels"], len(cents))["per_subject_iou"] if u is not None]
        best = max(best, sum(ious) / len(ious))
    return best


def fit_router(samples, hidden_dim: int, epochs: int, seed: int = 0, pixels: bool = False) -> float:
    """Train a router on (video tokens, per-subject reference tokens, labels); held-out IoU on the last 20%."""
    torch.manual_seed(seed)
    router = IDRouter(hidden_dim=hidden_dim, text_dim=8, num_layers=1, router_dim=64, num_identity_queries=4, num_heads=2)
    if pixels:
        # A LayerNorm over 3 colour channels keeps only their zero-mean direction (1 of 3 degrees of freedom). The
        # transformer's tokens the router normally sees are wide and already LayerNorm-ed by the block.
        router.token_norm = torch.nn.Identity()
    opt = torch.optim.AdamW(router.parameters(), lr=1e-3)
    split = int(len(samples) * 0.8)
    for _ in range(epochs):
        for video, refs, labels in samples[:split]:
            logits = router(video, router.encode_anchors(refs), 0)
            target = torch.where(labels < 0, torch.full_like(labels, len(refs)), labels)
            loss = routing_cross_entropy(logits, target, ignore_index=-100, balanced=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
    ious = []
    with torch.no_grad():
        for video, refs, labels in samples[split:]:
            pred = IDRouter.buckets(router(video, router.encode_anchors(refs), 0))
            ious += [u for u in label_iou(pred[0], labels[0], len(refs))["per_subject_iou"] if u is not None]
    return sum(ious) / len(ious)


def toy_model_samples(items, data: str, size: int, tiny_vae: str | None = None, sigma: float = 0.3):
    from diasr_diffusers.training import DiasRTrainer, TrainConfig

    cfg = TrainConfig.from_dict(
        {
            "stage": "route", "allow_scratch": True, "train_data": data, "height": size, "width": size,
            "num_frames": 9, "eval_fraction": 0.0,
            "tiny_model": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "patch_size": [1, 1, 1], "ffn_dim": 64, "vae": tiny_vae},
        }
    )  # fmt: skip
    trainer = DiasRTrainer(cfg, "/tmp/routing_ceiling_unused")
    trainer.setup()
    captured = {}
    hook = trainer.transformer.blocks[0].attn1.register_forward_pre_hook(lambda m, a: captured.__setitem__("h", a[0]))
    samples = []
    for item in items:
        enc = trainer._encode(item)
        noise = torch.randn(enc["x0"].shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            trainer._forward(enc, torch.tensor(sigma), noise, trainer.model)
        lv = enc["labels"].shape[1]
        hidden = captured["h"]
        refs = list(hidden[:, lv:].split(enc["routing"]["ref_lengths"], dim=1))
        samples.append((hidden[:, :lv], refs, enc["labels"]))
    hook.remove()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="a make-synthetic folder")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--clips", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--tiny-vae", default=None, help="'sprites' (the shipped toy VAE) or a saved VAE folder; default random")
    parser.add_argument("--sigma", type=float, default=0.3, help="noise level of the toy model's video tokens")
    args = parser.parse_args()
    grid = token_grid_factors(vae=tiny_wan_components(vae=args.tiny_vae)["vae"])
    ds = MuSADataset(
        f"{args.data}/manifest.jsonl", num_frames=9, height=args.size, width=args.size, clip_sampling="start",
        crop="center", temporal_compression=grid["temporal_compression"], spatial_compression=grid["spatial_compression"],
        patch_size=(1, 1, 1),
    )  # fmt: skip
    items = [ds[i] for i in range(min(args.clips, len(ds)))]
    cs, ct = grid["spatial_compression"], grid["temporal_compression"]
    rows = [("colour (no learning, best threshold)", colour_baseline(items[int(len(items) * 0.8) :], cs, ct))]
    pixel_samples = [(*pixel_tokens(it, cs, ct), it["token_labels"][None]) for it in items]
    rows.append(("router on oracle pixel features (token LayerNorm off)", fit_router(pixel_samples, 3, args.epochs, pixels=True)))
    patch_samples = [(*pixel_patch_tokens(it, cs, ct), it["token_labels"][None]) for it in items]
    rows.append(
        (
            f"router on oracle {cs}x{cs} pixel patches (colour + in-token texture)",
            fit_router(patch_samples, 3 * cs * cs, args.epochs, pixels=True),
        )
    )
    toy = toy_model_samples(items, args.data, args.size, args.tiny_vae, args.sigma)
    rows.append((f"router on toy-model layer-0 features (sigma {args.sigma})", fit_router(toy, toy[0][0].shape[-1], args.epochs)))
    print(f"toy VAE: {args.tiny_vae or 'random'}; latent grid: {cs}x spatial, {ct}x temporal")
    print(f"| reference point ({len(items)} clips, 80/20 split, {args.epochs} epochs) | held-out routing IoU |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
