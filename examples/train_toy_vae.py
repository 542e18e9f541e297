"""Train the toy sprite VAE shipped as ``diasr_diffusers/assets/toy_vae`` (``tiny_model: {vae: sprites}``).

A random toy VAE maps a reference image and the same sprite in a video to unrelated latents, so a router trained on
the toy model has nothing to match (docs/training.md). This trains a small ``AutoencoderKLWan`` (Wan2.1's
architecture at toy width, 2x temporal compression; 4x spatial for the shipped ``toy_vae``, 2x for the shape-keeping
one of docs/toy_model.md) to reconstruct synthetic sprite clips and single reference frames, then measures its
``latents_mean/std`` as Wan's were measured, and saves it.

Train it on clips from a seed the routing runs do not use, so the held-out routing clips stay unseen:

    diasr make-synthetic --out runs/synthetic_vae --num-clips 200 --seed 1000 --frames 9 --height 64 --width 64
    python examples/train_toy_vae.py --data runs/synthetic_vae --out runs/toy_vae_s2 --spatial-compression 2 \
        --crop 32 --crop-frames 9 --clips 100 --steps 1200 --checkpointing-steps 100   # --resume continues an interrupted run

Every step's batch, flips and posterior noise are drawn from a generator seeded by ``(seed, step)`` and the learning
rate is a function of the step, so a run resumed from ``<out>.ckpt`` (weights, AdamW state, step; safetensors and
JSON) continues exactly as the uninterrupted one would, for the same thread count.
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file

from diasr_diffusers.data import MuSADataset
from diasr_diffusers.routing import pixels_to_token_grid
from diasr_diffusers.training.trainer import optimizer_state_from_safetensors, optimizer_state_to_safetensors
from diasr_diffusers.utils.io import atomic_dir
from diasr_diffusers.utils.latents import calibrate_latent_statistics


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True, help="a make-synthetic folder (64x64, 9 frames)")
parser.add_argument("--out", required=True, help="output folder (written atomically); checkpoints go to <out>.ckpt")
parser.add_argument("--steps", type=int, default=2000)
parser.add_argument("--base-dim", type=int, default=12)
parser.add_argument("--z-dim", type=positive_int, default=16, help="latent channels")
parser.add_argument(
    "--temporal-compression", type=int, default=2, choices=(1, 2), help="1: every latent frame codes one frame"
)
parser.add_argument("--spatial-compression", type=int, default=4, choices=(2, 4))
parser.add_argument("--clips", type=int, default=200)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument(
    "--crop", type=int, default=64, help="train on random crops of this size (the VAE is convolutional)"
)
parser.add_argument(
    "--crop-frames", type=int, default=9, help="train on the first N frames of each clip (1 + 4k, >= 9)"
)
parser.add_argument("--preview-weight", type=float, default=1.0, help="weight of the linear colour-preview loss")
parser.add_argument("--checkpointing-steps", type=int, default=0, help="save <out>.ckpt every N steps (0: never)")
parser.add_argument("--resume", action="store_true", help="continue from <out>.ckpt (same arguments)")
parser.add_argument("--export", action="store_true", help="write <out> from <out>.ckpt as it is (no training)")
parser.add_argument("--stop-after", type=int, default=None, help="end this invocation after N steps (checkpointed)")
args = parser.parse_args()
ckpt = Path(f"{args.out}.ckpt")
args.resume = args.resume or args.export
if args.resume and not (ckpt / "state.json").is_file():
    raise SystemExit(f"--resume / --export: no checkpoint at {ckpt}")
if not args.resume and ckpt.exists():
    raise SystemExit(f"{ckpt} holds an earlier run: pass --resume or remove it")

torch.manual_seed(args.seed)
sc = args.spatial_compression
# The decoded clips are kept next to the checkpoint: a resume or an export need not decode them again.
data_file = Path(f"{args.out}.data.safetensors")
if args.resume and data_file.is_file():
    loaded = load_file(str(data_file))
    clips, refs = loaded["clips"], loaded["refs"]
else:
    ds = MuSADataset(
        f"{args.data}/manifest.jsonl", num_frames=9, height=64, width=64, patch_size=(1, 1, 1),
        temporal_compression=2, spatial_compression=sc, clip_sampling="start", crop="center",
    )  # fmt: skip
    items = [ds[i] for i in range(min(args.clips, len(ds)))]
    clips = torch.stack([it["video"] for it in items])  # (N, 3, 9, 64, 64) in [-1, 1]
    refs = torch.stack([r for it in items for r in it["ref_images"]])[:, :, None]  # (M, 3, 1, 64, 64)
    if args.checkpointing_steps:
        tmp_file = data_file.with_name(f".{data_file.name}.tmp")
        save_file({"clips": clips.contiguous(), "refs": refs.contiguous()}, str(tmp_file))
        tmp_file.replace(data_file)
# 2x spatial: one downsampling stage (64 -> 32, temporal there); 4x: two (the shipped toy VAE).
dim_mult, temporal = ([1, 2], [True]) if sc == 2 else ([1, 2, 2], [False, True])
if args.temporal_compression == 1:
    temporal = [False] * len(temporal)
vae = AutoencoderKLWan(
    base_dim=args.base_dim, z_dim=args.z_dim,
    latents_mean=[0.0] * args.z_dim, latents_std=[1.0] * args.z_dim, dim_mult=dim_mult, num_res_blocks=1, temperal_downsample=temporal,
    scale_factor_spatial=sc, scale_factor_temporal=args.temporal_compression,
)  # fmt: skip
# Real video VAEs keep each latent's local colour linearly readable (the "latent RGB factors" of preview tools): a
# 1x1 map from latents to the average colour of their pixels is a good preview. A random-init VAE trained only for
# reconstruction need not, and then a router must learn colour through a nonlinear code. This head asks for it.
preview = torch.nn.Conv3d(args.z_dim, 3, 1)
params = [*vae.parameters(), *preview.parameters()]
opt = torch.optim.AdamW(params, lr=args.lr)
start = 0
if args.resume:
    vae.load_state_dict(load_file(str(ckpt / "vae.safetensors")))
    preview.load_state_dict(load_file(str(ckpt / "preview.safetensors")))
    opt.load_state_dict(optimizer_state_from_safetensors(ckpt))
    start = json.loads((ckpt / "state.json").read_text())["step"]
    print(f"resumed at step {start}", flush=True)


def lr_factor(step: int) -> float:
    return min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))


def pooled_colour(x: torch.Tensor) -> torch.Tensor:
    """Pixels averaged onto the latent grid (frame 0 alone, then pairs of frames): mask coverage's rule."""
    return pixels_to_token_grid(
        x, temporal_compression=args.temporal_compression, spatial_compression=sc, patch_size=(1, 1, 1)
    )


def save_checkpoint(step: int) -> None:
    with atomic_dir(ckpt) as tmp:
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp / "vae.safetensors"))
        save_file(preview.state_dict(), str(tmp / "preview.safetensors"))
        optimizer_state_to_safetensors(opt.state_dict(), tmp)
        (tmp / "state.json").write_text(json.dumps({"step": step, "args": vars(args)}))


end = start if args.export else min(args.steps, start + (args.stop_after or args.steps))
for step in range(start, end):
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    for group in opt.param_groups:
        group["lr"] = args.lr * lr_factor(step)
    # Alternate clips and single reference frames so both paths of the causal encoder learn; flips add variety.
    x = (
        clips[torch.randint(len(clips), (2,), generator=gen)]
        if step % 2 == 0
        else refs[torch.randint(len(refs), (8,), generator=gen)]
    )
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    # Spatial crops make a step several times cheaper on this shared CPU; the VAE is convolutional, so it applies at
    # full size after. Frames are cropped only from the end, and not below 9: Wan's VAE codes frame 0, then chunks of
    # 4 frames, each reading a causal cache left by the chunk before; 5-frame windows never train that cache (a VAE
    # trained on them decoded 9-frame clips' later frames with wrong colours: colour accuracy 0.48 after 600 steps).
    top, left = (int(v) for v in torch.randint(64 - args.crop + 1, (2,), generator=gen))
    x = x[:, :, : args.crop_frames, top : top + args.crop, left : left + args.crop]
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=gen)).sample
    kl = 0.5 * (post.mean.pow(2) + post.var - post.logvar - 1).mean()
    mse = F.mse_loss(rec, x)
    loss = mse + F.l1_loss(rec, x) + 1e-6 * kl + args.preview_weight * F.mse_loss(preview(post.mean), pooled_colour(x))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    if step % 100 == 0 or step == args.steps - 1:
        print(f"step {step} reconstruction MSE {float(mse.detach()):.4f}", flush=True)
    if (args.checkpointing_steps and (step + 1) % args.checkpointing_steps == 0) or step + 1 == end < args.steps:
        save_checkpoint(step + 1)
if end < args.steps and not args.export:
    raise SystemExit(f"stopped at step {end} of {args.steps}; continue with --resume")
vae.eval()
with torch.no_grad():
    calibrate_latent_statistics(vae, [clips[i : i + 4] for i in range(0, min(len(clips), 32), 4)])
    rec = vae.decode(vae.encode(clips[:8]).latent_dist.mode()).sample
    print(f"final reconstruction MSE (8 clips, posterior mode): {float(F.mse_loss(rec, clips[:8])):.4f}")
with atomic_dir(args.out) as tmp:  # written whole, then renamed into place
    vae.save_pretrained(tmp)
print(f"saved {args.out}")
