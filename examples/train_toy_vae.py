"""Train the toy sprite VAE shipped as ``diasr_diffusers/assets/toy_vae`` (``tiny_model: {vae: sprites}``).

A random toy VAE maps a reference image and the same sprite in a video to unrelated latents, so a router trained on
the toy model has nothing to match (docs/training.md). This trains a small ``AutoencoderKLWan`` (Wan2.1's
architecture at toy width, 4x spatial / 2x temporal compression) to reconstruct synthetic sprite clips and single
reference frames, then measures its ``latents_mean/std`` as Wan's were measured, and saves it.

Train it on clips from a seed the routing runs do not use, so the held-out routing clips stay unseen:

    diasr make-synthetic --out runs/synthetic_vae --num-clips 200 --seed 1000 --frames 9 --height 64 --width 64
    python examples/train_toy_vae.py --data runs/synthetic_vae --out src/diasr_diffusers/assets/toy_vae
"""

import argparse
import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from diasr_diffusers.data import MuSADataset
from diasr_diffusers.routing import pixels_to_token_grid
from diasr_diffusers.utils.io import atomic_dir
from diasr_diffusers.utils.latents import calibrate_latent_statistics

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True, help="a make-synthetic folder (64x64, 9 frames)")
parser.add_argument("--out", required=True, help="output folder (written atomically)")
parser.add_argument("--steps", type=int, default=2000)
parser.add_argument("--base-dim", type=int, default=12)
parser.add_argument("--clips", type=int, default=200)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--preview-weight", type=float, default=1.0, help="weight of the linear colour-preview loss")
args = parser.parse_args()

torch.manual_seed(0)
ds = MuSADataset(
    f"{args.data}/manifest.jsonl", num_frames=9, height=64, width=64, patch_size=(1, 1, 1),
    temporal_compression=2, spatial_compression=4, clip_sampling="start", crop="center",
)  # fmt: skip
items = [ds[i] for i in range(min(args.clips, len(ds)))]
clips = torch.stack([it["video"] for it in items])  # (N, 3, 9, 64, 64) in [-1, 1]
refs = torch.stack([r for it in items for r in it["ref_images"]])[:, :, None]  # (M, 3, 1, 64, 64)
vae = AutoencoderKLWan(
    base_dim=args.base_dim, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
    scale_factor_spatial=4, scale_factor_temporal=2,
)  # fmt: skip
# Real video VAEs keep each latent's local colour linearly readable (the "latent RGB factors" of preview tools): a
# 1x1 map from latents to the average colour of their pixels is a good preview. A random-init VAE trained only for
# reconstruction need not, and then a router must learn colour through a nonlinear code. This head asks for it.
preview = torch.nn.Conv3d(16, 3, 1)


def pooled_colour(x: torch.Tensor) -> torch.Tensor:
    """Pixels averaged onto the latent grid (frame 0 alone, then pairs of frames, 4x4 pixels): mask coverage's rule."""
    return pixels_to_token_grid(x, temporal_compression=2, spatial_compression=4, patch_size=(1, 1, 1))


opt = torch.optim.AdamW([*vae.parameters(), *preview.parameters()], lr=args.lr)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
gen = torch.Generator().manual_seed(0)
for step in range(args.steps):
    # Alternate clips and single reference frames so both paths of the causal encoder learn; flips add variety.
    x = clips[torch.randint(len(clips), (2,), generator=gen)] if step % 2 == 0 else refs[torch.randint(len(refs), (8,), generator=gen)]
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=gen)).sample
    kl = 0.5 * (post.mean.pow(2) + post.var - post.logvar - 1).mean()
    mse = F.mse_loss(rec, x)
    loss = mse + F.l1_loss(rec, x) + 1e-6 * kl + args.preview_weight * F.mse_loss(preview(post.mean), pooled_colour(x))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    sched.step()
    if step % 100 == 0 or step == args.steps - 1:
        print(f"step {step} reconstruction MSE {float(mse.detach()):.4f}", flush=True)
vae.eval()
with torch.no_grad():
    calibrate_latent_statistics(vae, [clips[i : i + 4] for i in range(0, min(len(clips), 32), 4)])
    rec = vae.decode(vae.encode(clips[:8]).latent_dist.mode()).sample
    print(f"final reconstruction MSE (8 clips, posterior mode): {float(F.mse_loss(rec, clips[:8])):.4f}")
with atomic_dir(args.out) as tmp:  # written whole, then renamed into place
    vae.save_pretrained(tmp)
print(f"saved {args.out}")
