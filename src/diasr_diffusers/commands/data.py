"""``diasr make-synthetic``, ``diasr validate-data`` and ``diasr cache-latents``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import in_cli_words


def _subject_range(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI (e.g. 1-4), got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1] <= 4:
        raise argparse.ArgumentTypeError(f"subject counts must satisfy 1 <= LO <= HI <= 4, got {text!r}")
    return bounds


def _make_synthetic(args: argparse.Namespace) -> int:
    from ..data.synthetic import make_synthetic

    try:
        path = make_synthetic(
            args.out,
            args.num_clips,
            seed=args.seed,
            subjects=args.subjects,
            num_frames=args.frames,
            height=args.height,
            width=args.width,
            fps=args.fps,
            mask_format=args.mask_format,
            overwrite=args.overwrite,
        )
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_clips} clips: {path}")
    return 0


_FLAGS = (
    ("`path`", "manifest"),
    ("`num_workers`", "--workers"),
    ("`num_frames`", "--frames"),
    ("`frame_stride`", "--stride"),
    ("`height`", "--height"),
    ("`width`", "--width"),
    ("allow_outside_root=True (CLI: --allow-outside-root)", "--allow-outside-root"),
)


def _validate_data(args: argparse.Namespace) -> int:
    from ..data.manifest import validate_manifest

    try:
        report = validate_manifest(
            args.manifest,
            check_media=not args.quick,
            num_workers=args.workers,
            allow_outside_root=args.allow_outside_root,
        )
    except (OSError, ValueError) as err:
        print(f"error: {in_cli_words(err, _FLAGS)}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


def _cache_latents(args: argparse.Namespace) -> int:
    import torch

    from ..data.dataset import MuSADataset, cache_latents

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    from ..utils.output_paths import OutputPathError, check_writable_folder, disk_full_message

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file; give a folder for the cache", file=sys.stderr)
        return 2
    try:
        check_writable_folder(out, "--out")
    except OutputPathError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        # Validate the data before loading a model: a bad manifest should fail in seconds.
        dataset = MuSADataset(
            args.data,
            num_frames=args.frames,
            height=args.height,
            width=args.width,
            frame_stride=args.stride,
            clip_sampling="start",
            crop="center",
            ref_augment=None,
            num_workers=args.workers,
            allow_outside_root=args.allow_outside_root,
        )
    except (ValueError, OSError) as err:
        print(f"error: {in_cli_words(err, _FLAGS)}", file=sys.stderr)
        return 2
    if dataset.num_skipped:
        print(f"skipping {dataset.num_skipped} bad or too-short records (see `diasr validate-data {args.data}`)")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        print(f"error: --device: {err}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: this torch build sees no CUDA device", file=sys.stderr)
        return 2
    model = Path(args.model).expanduser()
    if model.is_dir() and not (model / "vae" / "config.json").is_file():
        print(
            f"error: --model: {model} has no vae/config.json (expected a Diffusers Wan model folder)", file=sys.stderr
        )
        return 2
    if not model.is_dir() and (model.exists() or args.model.startswith((".", "/", "~")) or args.model.count("/") != 1):
        print(
            f"error: --model: folder {model} not found (expected a Diffusers Wan model folder or a Hub id)",
            file=sys.stderr,
        )
        return 2
    from diffusers import AutoencoderKLWan

    try:
        vae = AutoencoderKLWan.from_pretrained(str(model) if model.is_dir() else args.model, subfolder="vae",
                                               torch_dtype=dtype)  # fmt: skip
    except (OSError, ValueError) as err:  # Hub errors (missing repo, no network) are OSErrors
        print(f"error: --model: cannot load the VAE of {args.model}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    vae = vae.to(device).eval()
    try:
        index = cache_latents(dataset, vae, args.out, storage_dtype=dtype, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"error: --out: {err}".replace("overwrite=True", "--overwrite"), file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, or a folder made read-only meanwhile: one line, the writes are atomic
        print(f"error: --out {out}: {disk_full_message(err) or err.strerror or err}", file=sys.stderr)
        return 2
    print(f"cached {len(dataset)} clips: {index}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("make-synthetic", help="write a synthetic multi-subject video dataset with exact masks")
    p.add_argument("--out", required=True, help="output folder (gets manifest.jsonl, videos/, masks/, refs/)")
    p.add_argument("--num-clips", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subjects", type=_subject_range, default=(1, 4), help="sprites per clip: N or LO-HI (1-4)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--mask-format", choices=("npz", "png"), default="npz")
    p.add_argument("--overwrite", action="store_true", help="replace an existing manifest in --out")
    p.set_defaults(func=_make_synthetic)

    p = subparsers.add_parser("validate-data", help="check a JSONL manifest; lists every bad record")
    p.add_argument("manifest", help="manifest.jsonl, or the folder holding it")
    p.add_argument("--quick", action="store_true", help="structure and file existence only (no video/mask decoding)")
    p.add_argument("--workers", type=int, default=0, help="threads for media checks")
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="accept paths leading outside the manifest's folder (../, absolute paths, symlinks)",
    )
    p.set_defaults(func=_validate_data)

    p = subparsers.add_parser("cache-latents", help="pre-compute VAE latents of a manifest's clips and references")
    p.add_argument("--data", required=True, help="manifest.jsonl, or the folder holding it")
    p.add_argument("--model", required=True, help="Diffusers Wan model folder or Hub id (VAE in its `vae` subfolder)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="threads for manifest validation")
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="accept paths leading outside the manifest's folder (../, absolute paths, symlinks)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cache_latents)
