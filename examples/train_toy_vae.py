"""Train the toy Wan VAE (`AutoencoderKLWan`, random by default in `utils.tiny`) on synthetic sprite clips.

A random causal VAE maps a reference image and the same sprite in a video to unrelated latents, so a router trained
on the toy model has nothing to match (docs/training.md). Reconstruction training fixes that in part.

    diasr make-synthetic --out runs/synthetic --num-clips 160 --seed 1 --frames 9 --height 64 --width 64
    python examples/train_toy_vae.py --data runs/synthetic --steps 800 --base-dim 8 --out runs/toy_vae
    PYTHONPATH=src python benchmarks/routing_ceiling.py --data runs/synthetic --tiny-vae runs/toy_vae
"""

import argparse

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from diasr_diffusers.data import MuSADataset

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True, help="a make-synthetic folder (64x64, 9 frames)")
parser.add_argument("--steps", type=int, default=800)
parser.add_argument("--base-dim", type=int, default=8)
parser.add_argument("--clips", type=int, default=100)
parser.add_argument("--out", required=True)
args = parser.parse_args()

torch.manual_seed(0)
ds = MuSADataset(f"{args.data}/manifest.jsonl", num_frames=9, height=64, width=64, patch_size=(1, 1, 1))
clips = torch.stack([ds[i]["video"] for i in range(min(args.clips, len(ds)))])
refs = torch.stack([r for i in range(len(clips)) for r in ds[i]["ref_images"]])[:, :, None]
vae = AutoencoderKLWan(
    base_dim=args.base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)
opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
gen = torch.Generator().manual_seed(0)
for step in range(args.steps):
    # Alternate clips and single reference frames so both paths of the causal encoder learn.
    if step % 2 == 0:
        x = clips[torch.randint(len(clips), (2,), generator=gen)]
    else:
        x = refs[torch.randint(len(refs), (8,), generator=gen)]
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=gen)).sample
    kl = 0.5 * (post.mean.pow(2) + post.var - post.logvar - 1).mean()
    loss = F.mse_loss(rec, x) + 1e-5 * kl
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        print(f"step {step} reconstruction MSE {float(F.mse_loss(rec, x).detach()):.4f}")
vae.eval().save_pretrained(args.out)
