"""``diasr generate`` (a DiasR checkpoint or a stock one of any supported family: Wan2.1/2.2, LTX-Video, CogVideoX,
HunyuanVideo-1.5; or Phantom-Wan / SkyReels-V3 R2V weights) and ``diasr demo`` (the embedded toy model, offline).

The loading itself is library code (:mod:`diasr_diffusers.pipelines.loading`); this module parses and checks flags.

Everything a user typed is checked before any weights are loaded (and before torch is imported where possible);
a user mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..pipelines.loading import (  # noqa: F401 (the library's; re-exported here for their old import path)
    EXAMPLE_MODEL,
    UsageError,
    _first_line,
    _read_json,
    _shape_mismatch_sentence,
    check_lora,
    checkpoint_class,
    checkpoint_family,
    load_lora,
    load_public_pipeline,
    resolve_checkpoint,
)
from ..utils.io import write_video_atomic  # noqa: F401 (its old import path)
from ..utils.output_paths import claim_outputs
from ..utils.toy import (  # noqa: F401 (the library's; re-exported here for their old import path)
    DEMO_FILES,
    DEMO_GUIDANCE,
    DEMO_PROMPT,
    DEMO_STEPS,
    DEMO_SUBJECTS,
    DEMO_UPSCALE,
    demo_subjects,
)
from . import DefaultsHelpFormatter

# The routing modes of `SubjectRoutingState` plus "auto"; spelled out so that `--help` needs no torch import
# (tests/test_cli.py checks they match `processors.ROUTING_MODES`).
ROUTING_CHOICES = ("auto", "router", "similarity", "masks", "dense")


# -- argument types (argparse names the flag in its message) ----------------------------------------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _finite_float(low: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _seed(text: str) -> int:
    value = _int_at_least(0)(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be < 2**63, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="generate a multi-subject video",
        description=(
            "Generate a video from a prompt and reference images of its subjects. Needs a Diffusers checkpoint of a "
            "supported family, DiasR or stock: Wan2.1/2.2, LTX-Video, CogVideoX or HunyuanVideo-1.5 (e.g. "
            f"{EXAMPLE_MODEL}; the default 480x832, 81 frames are Wan2.1's sizes and fit every family's strides), or "
            "public reference-trained weights (--phantom, --skyreels-v3). Every argument is checked before the model "
            "loads."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        help="Diffusers checkpoint (DiasR, or stock Wan, LTX-Video, CogVideoX, HunyuanVideo-1.5): folder or Hub repo id",
    )
    source.add_argument(
        "--phantom",
        metavar="PATH_OR_REPO",
        help="Phantom-Wan transformer: Phantom-Wan-1.3B.pth, the 14B index/shards or their folder, or a Hub repo id "
        "(reference_style='phantom'; VAE and text encoder from --base)",
    )
    source.add_argument(
        "--skyreels-v3", metavar="PATH_OR_REPO", help="SkyReels-V3 R2V Diffusers folder or Hub repo id"
    )
    gen.add_argument(
        "--base",
        default=None,
        help=f"with --phantom: the Wan2.1 Diffusers pipeline giving VAE and text encoder (default {EXAMPLE_MODEL})",
    )
    gen.add_argument(
        "--phantom-size", default="1.3B", choices=["1.3B", "14B"], help="with --phantom REPO: which file to take"
    )
    gen.add_argument("--router", default=None, help="IDRouter folder or Hub repo id (replaces the model's own)")
    gen.add_argument(
        "--lora", default=None, help="LoRA weights for the transformer: .safetensors file, folder or Hub id"
    )
    gen.add_argument("--prompt", required=True, help="the text; each --subject phrase must occur in it as whole words")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt (Wan's default negative when omitted)")
    gen.add_argument(
        "--subject",
        action="append",
        default=[],
        metavar="PHRASE=IMAGE[,IMAGE...]",
        help='a subject: its phrase in the prompt and one or more images, e.g. "the man=man.png"; repeatable',
    )
    gen.add_argument(
        "--mask",
        action="append",
        default=[],
        metavar="PHRASE=PNG",
        help='layout mask of a subject (white = the subject; resized to the video), e.g. "the man=left.png"; one per '
        "subject; routes with the masks (--routing auto or masks)",
    )
    gen.add_argument("--frames", type=_int_at_least(1), default=81, help="frames; 4k+1 for Wan's VAE")
    gen.add_argument("--height", type=_int_at_least(1), default=480, help="pixels; a multiple of 16")
    gen.add_argument("--width", type=_int_at_least(1), default=832, help="pixels; a multiple of 16")
    gen.add_argument("--steps", type=_int_at_least(1), default=50, help="denoising steps")
    gen.add_argument(
        "--guidance-scale",
        type=_finite_float(0.0),
        default=None,
        help="text guidance (default: the model's: Wan's reference style 5.0, Phantom 7.5; LTX 3.0; CogVideoX 6.0; "
        "HunyuanVideo-1.5 its guider's)",
    )
    gen.add_argument(
        "--guidance-scale-ref",
        type=_finite_float(0.0),
        default=None,
        help="reference guidance: Phantom's three-way guidance when set (default: the model's reference style: "
        "none; Phantom 5.0)",
    )
    gen.add_argument(
        "--routing",
        default="auto",
        choices=ROUTING_CHOICES,
        help="auto: masks if given, else the router if loaded, else similarity; dense = every token sees every subject",
    )
    gen.add_argument(
        "--similarity-threshold",
        type=_finite_float(),
        default=0.0,
        help="null threshold of the training-free similarity router (mean cosine)",
    )
    gen.add_argument("--no-route-text", action="store_true", help="do not route text cross-attention")
    gen.add_argument(
        "--max-sequence-length",
        type=_int_at_least(1),
        default=None,
        help="prompt tokens (default: the model family's: Wan 512, LTX 128, CogVideoX 226, HunyuanVideo-1.5 1000)",
    )
    gen.add_argument("--seed", type=_seed, default=0, help="random seed")
    gen.add_argument("--fps", type=_int_at_least(1), default=16, help="frames per second of the written videos")
    gen.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    gen.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    gen.add_argument("--out", required=True, help="output video (.mp4)")
    gen.add_argument("--routing-maps", default=None, help="also write the routing-map overlay video (.mp4)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files diasr did not write")
    gen.set_defaults(func=run_generate)

    demo = subparsers.add_parser(
        "demo",
        help="offline two-subject demo on the embedded sprite model: moving layout, trained router and the dense "
        "baseline side by side (CPU, seconds)",
        formatter_class=DefaultsHelpFormatter,
    )
    demo.add_argument("--out", required=True, help="output folder (created if missing)")
    demo.add_argument("--seed", type=_seed, default=0, help="random seed of the generation")
    demo.add_argument("--steps", type=_int_at_least(1), default=DEMO_STEPS, help="denoising steps of every panel")
    demo.add_argument(
        "--dense",
        default=None,
        metavar="FOLDER",
        help="dense baseline pipeline folder for panel (c) (default: the shipped one, assets/sprite_dense)",
    )
    demo.add_argument("--overwrite", action="store_true", help="replace files in --out that diasr did not write")
    demo.set_defaults(func=run_demo)


# -- checks of what the user typed --------------------------------------------------------------------------------


def parse_subject(spec: str) -> tuple[str, list[Path]]:
    """``"the man=a.png,b.png"`` -> ``("the man", [a.png, b.png])``; files must exist."""
    phrase, sep, images = spec.partition("=")
    if not sep or not phrase.strip() or not images.strip():
        raise UsageError(f'--subject must look like "PHRASE=IMAGE[,IMAGE...]", got {spec!r}')
    paths = [Path(p.strip()).expanduser() for p in images.split(",") if p.strip()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(
            f"--subject {phrase.strip()!r}: not an image file (missing or a folder): {', '.join(missing)}"
        )
    return phrase.strip(), paths


def open_image(path: Path, flag: str):
    """A fully decoded PIL image, or a UsageError naming the flag and the file."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.copy()  # detached from the file; the pipeline converts modes itself
    except PIL.Image.DecompressionBombError:
        raise UsageError(f"{flag}: {path} claims a size so large it is refused as a decompression bomb") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for corrupt or unknown files
        raise UsageError(f"{flag}: cannot read {path} as an image ({_first_line(err)})") from None


def check_output(value: str, flag: str) -> Path:
    """An .mp4 path that can be written: not a folder, and its nearest existing parent is a writable folder."""
    from ..utils.output_paths import OutputPathError, check_path_text

    try:
        check_path_text(value, flag)
    except OutputPathError as err:
        raise UsageError(str(err)) from None
    path = Path(value).expanduser()
    if path.suffix.lower() != ".mp4":
        raise UsageError(f"{flag} must be an .mp4 path, got {value!r}")
    if path.is_dir():
        raise UsageError(f"{flag} {value!r} is a folder; give a file name such as {os.path.join(value, 'out.mp4')}")
    _check_writable_parent(path.absolute().parent, flag, value)
    return path


def guard_outputs(outputs: list[tuple[str, Any]], inputs: list[tuple[str, Any]], overwrite: bool) -> None:
    """:func:`~diasr_diffusers.utils.output_paths.check_outputs` with its error as a :class:`UsageError`."""
    from ..utils.output_paths import OutputPathError, check_outputs

    try:
        check_outputs(outputs, inputs, overwrite=overwrite, flag=outputs[0][0])
    except OutputPathError as err:
        raise UsageError(str(err)) from None


def _generate_outputs(args: argparse.Namespace) -> list[tuple[str, Any]]:
    return [("--out", args.out)] + ([("--routing-maps", args.routing_maps)] if args.routing_maps else [])


def _generate_inputs(args: argparse.Namespace, subjects: list[tuple[str, list[Path]]]) -> list[tuple[str, Any]]:
    inputs = [(f"--subject {phrase!r} image", p) for phrase, paths in subjects for p in paths]
    inputs += [("--mask", spec.partition("=")[2].strip()) for spec in args.mask]
    for flag in ("model", "phantom", "skyreels_v3", "base", "router", "lora"):
        value = getattr(args, flag, None)
        if value:
            inputs.append((f"--{flag.replace('_', '-')}", value))
    return inputs


def _check_writable_parent(parent: Path, flag: str, value: str) -> None:
    """The nearest existing ancestor of ``parent`` is a writable folder (missing folders below it get created)."""
    from ..utils.output_paths import OutputPathError, check_writable_folder

    try:
        check_writable_folder(parent, f"{flag} {value!r}")
    except OutputPathError as err:
        raise UsageError(str(err)) from None


def check_phrases(prompt: str, phrases: list[str]) -> None:
    """The pipeline's phrase rules (:mod:`diasr_diffusers.routing.phrases`): every phrase distinct, occurring in
    ``prompt`` as whole words, and no two subjects' phrases overlapping."""
    seen: set[str] = set()
    for phrase in phrases:
        key = " ".join(phrase.casefold().split())
        if key in seen:
            raise UsageError(f"--subject {phrase!r} is given twice (phrases must differ: one per subject)")
        seen.add(key)
    from ..routing.phrases import phrase_problems

    problems = phrase_problems(prompt, phrases, what="--prompt")
    if problems:
        raise UsageError(f"--subject: {'; '.join(problems)}")


def parse_mask(spec: str, phrases: list[str], height: int, width: int) -> tuple[str, np.ndarray]:
    """``"the man=left.png"`` -> ``("the man", (height, width) bool)``.

    The PNG is read as :func:`mask_from_image` says.
    """
    phrase, sep, file = spec.partition("=")
    phrase, file = phrase.strip(), file.strip()
    if not sep or not phrase or not file:
        raise UsageError(f'--mask must look like "PHRASE=PNG", got {spec!r}')
    if phrase not in phrases:
        raise UsageError(f"--mask {phrase!r}: not one of the --subject phrases {phrases}")
    path = Path(file).expanduser()
    if not path.is_file():
        raise UsageError(f"--mask {phrase!r}: file not found: {file}")
    image = open_image(path, f"--mask {phrase!r}")
    return phrase, mask_from_image(image, height, width, f"--mask {phrase!r}: {file}")


def mask_from_image(image: Any, height: int, width: int, what: str) -> np.ndarray:
    """A layout mask drawn as an image -> ``(height, width)`` bool: white (>= 128) is the subject; an image whose
    values are only 0 and 1 counts 1 as the subject. Resized to the video size (nearest neighbour). A mask with no
    subject pixel raises a :class:`UsageError` starting with ``what``."""
    import PIL.Image

    gray = np.asarray(image.convert("L").resize((width, height), PIL.Image.NEAREST))
    mask = gray == 1 if gray.max() == 1 else gray >= 128
    if not mask.any():
        raise UsageError(f"{what} has no white pixel (white = the subject), so it would route nothing")
    return mask


@dataclass
class GenerateInputs:
    """What ``diasr generate`` checked before loading the model."""

    out: Path
    maps_out: Path | None
    phrases: list[str] = field(default_factory=list)
    images: list[list[Any]] = field(default_factory=list)
    masks: np.ndarray | None = None


def check_arguments(args: argparse.Namespace) -> GenerateInputs:
    """Everything that does not need the model: outputs, prompt, subjects, images, masks, routing flags."""
    out = check_output(args.out, "--out")
    maps_out = check_output(args.routing_maps, "--routing-maps") if args.routing_maps else None
    if maps_out is not None and maps_out.absolute() == out.absolute():
        raise UsageError("--routing-maps must differ from --out (one would overwrite the other)")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.base is not None and args.phantom is None:
        raise UsageError("--base is only used with --phantom (it gives Phantom's VAE and text encoder)")
    if args.height % 16 or args.width % 16:
        raise UsageError(f"--height and --width must be multiples of 16, got {args.height}x{args.width}")
    subjects = [parse_subject(s) for s in args.subject]
    phrases = [p for p, _ in subjects]
    check_phrases(args.prompt, phrases)
    images = [[open_image(p, f"--subject {phrase!r}") for p in paths] for phrase, paths in subjects]

    masks = None
    if args.mask:
        if not subjects:
            raise UsageError("--mask needs --subject: a mask lays out a subject")
        if args.routing not in ("auto", "masks"):
            raise UsageError(f"--mask is used by --routing masks (or auto), not --routing {args.routing}")
        by_phrase: dict[str, np.ndarray] = {}
        for spec in args.mask:
            phrase, mask = parse_mask(spec, phrases, args.height, args.width)
            if phrase in by_phrase:
                raise UsageError(f"--mask {phrase!r} is given twice")
            by_phrase[phrase] = mask
        missing = [p for p in phrases if p not in by_phrase]
        if missing:
            raise UsageError(f"--mask: every subject needs a mask when masks are given; missing: {missing}")
        masks = np.stack([by_phrase[p] for p in phrases])
    elif args.routing == "masks":
        raise UsageError('--routing masks needs a --mask "PHRASE=PNG" for every subject')
    if args.routing != "auto" and not subjects:
        raise UsageError(f"--routing {args.routing} routes subjects: give at least one --subject")
    guard_outputs(_generate_outputs(args), _generate_inputs(args, subjects), getattr(args, "overwrite", False))
    return GenerateInputs(out=out, maps_out=maps_out, phrases=phrases, images=images, masks=masks)


def check_device(value: str | None) -> str:
    """The device to run on; one that this torch build or machine does not have is refused before loading."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError:
        raise UsageError(f"--device {value!r} is not a device name; expected e.g. cpu, cuda, cuda:0, mps") from None
    if device.type == "cpu":
        return value
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise UsageError(
                f"--device {value}: this torch build ({torch.__version__}) has no CUDA support; use --device cpu"
            )
        count = torch.cuda.device_count()
        if count == 0:
            raise UsageError(
                f"--device {value}: no CUDA device is visible (CUDA_VISIBLE_DEVICES or driver); use --device cpu"
            )
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {value}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
        return value
    backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise UsageError(f"--device {value}: not available on this machine; expected cpu or cuda")
    return value


def resolve_dtype(name: str, device: str):
    """``--dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"``, or ``"auto"`` (bfloat16 on CUDA, float32 elsewhere)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# -- the model ----------------------------------------------------------------------------------------------------


def check_model_fits(
    folder: Path, router_folder: Path | None, args: argparse.Namespace, inputs: GenerateInputs
) -> None:
    """:func:`diasr_diffusers.pipelines.loading.check_model_fits` for ``diasr generate``'s flags."""
    from ..pipelines.loading import check_model_fits as check

    check(
        folder, router_folder, num_frames=args.frames, height=args.height, width=args.width, routing=args.routing,
        num_references=sum(len(images) for images in inputs.images), num_subjects=len(inputs.phrases),
        has_masks=inputs.masks is not None, router_name=getattr(args, "router", None),
    )  # fmt: skip


def check_family_supports_generate(folder: Path, name: str, flag: str = "--model") -> None:
    """Refuse, by family and before any weights load, a checkpoint whose family cannot take these commands' inputs
    (Ingredients takes faces, not phrases with reference images)."""
    from ..families import UnsupportedFamilyError

    spec, _ = checkpoint_family(folder, flag)
    try:
        spec.check_supports("generate", f"{flag} {name!r}")
    except UnsupportedFamilyError as err:
        raise UsageError(str(err)) from None


def load_pipeline(*args: Any, **kwargs: Any) -> Any:
    """:func:`diasr_diffusers.pipelines.loading.load_pipeline` (imported on use: ``--help`` needs no torch)."""
    from ..pipelines.loading import load_pipeline as load

    return load(*args, **kwargs)


# -- outputs ------------------------------------------------------------------------------------------------------


def save_outputs(
    pipe_out,
    phrases: list[str],
    out: Path,
    maps_out: Path | None,
    fps: int,
    temporal_compression: int = 4,
    upscale: int = 1,
) -> dict[str, Any]:
    """Write the first video of ``pipe_out`` to ``out`` (and its routing-map overlay with a legend to ``maps_out``).

    Returns a summary: ``video``, ``frames``, and when ``pipe_out`` has routing maps the share of video tokens routed
    to each subject phrase and to ``"(null)"`` (``routing_share``), and the overlay's path (``routing_maps``).
    """
    from ..utils.visualization import overlay_routing_maps

    frames = np.asarray(pipe_out.frames[0])
    if upscale > 1:  # nearest neighbour: every generated pixel stays visible as is
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    write_video_atomic(frames, out, fps)
    summary: dict[str, Any] = {"video": str(out), "frames": int(len(frames))}
    maps = pipe_out.routing_maps
    if maps is not None:
        counts = {p: float((maps[0] == i).float().mean()) for i, p in enumerate(phrases)}
        counts["(null)"] = float((maps[0] == -1).float().mean())
        summary["routing_share"] = counts
        if maps_out is not None:
            overlay = overlay_routing_maps(frames, maps[0], temporal_compression=temporal_compression, phrases=phrases)
            write_video_atomic(overlay, maps_out, fps)
            summary["routing_maps"] = str(maps_out)
    return summary


# -- commands -----------------------------------------------------------------------------------------------------


def report_usage_error(command: str, err: UsageError) -> int:
    """Print ``diasr COMMAND: error: ...`` on stderr; the exit code 2."""
    print(f"diasr {command}: error: {err}", file=sys.stderr)
    return 2


def run_generate(args: argparse.Namespace) -> int:
    try:
        return _generate(args)
    except UsageError as err:
        return report_usage_error("generate", err)


def _generate(args: argparse.Namespace) -> int:
    inputs = check_arguments(args)  # no torch yet: the cheapest mistakes are reported at once
    check_lora(args.lora)
    import torch

    device = check_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    router_folder = resolve_checkpoint(args.router, "--router") if args.router else None
    if args.model is not None:
        folder = resolve_checkpoint(args.model, "--model")
        check_family_supports_generate(folder, args.model)
        check_model_fits(folder, router_folder, args, inputs)
        pipe = load_pipeline(folder, router_folder, dtype=dtype, lora=args.lora)
    else:
        # Public weights: their configs are fixed by the loaders, which check the files' shapes themselves.
        pipe = load_public_pipeline(
            args.phantom, args.skyreels_v3, args.base, args.phantom_size, router_folder, dtype=dtype
        )
        if args.lora is not None:
            load_lora(pipe, args.lora)
    pipe = pipe.to(device)
    result = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        subject_images=inputs.images or None,
        subject_phrases=inputs.phrases or None,
        subject_masks=inputs.masks,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale_ref=args.guidance_scale_ref,
        routing=args.routing,
        route_text=not args.no_route_text,
        similarity_threshold=args.similarity_threshold,
        # Left out when not given: each family's pipeline has its own default (LTX's is not Wan's).
        **{k: v for k, v in (("guidance_scale", args.guidance_scale), ("max_sequence_length", args.max_sequence_length)) if v is not None},  # fmt: skip
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        output_type="np",  # the writers take float frames; LTX and CogVideoX default to PIL as their stock pipelines
        return_routing_maps=inputs.maps_out is not None,
    )
    temporal = pipe.vae_scale_factor_temporal
    claim_outputs(p for _, p in _generate_outputs(args))
    summary = write_or_explain(save_outputs, result, inputs.phrases, inputs.out, inputs.maps_out, args.fps, temporal)
    print(json.dumps(summary, indent=2))
    return 0


def write_or_explain(write: Any, *args: Any, **kwargs: Any) -> Any:
    """``write(*args, **kwargs)``; a full disk or a file-size limit becomes a one-line :class:`UsageError` (the
    writers are atomic: nothing half-written is left)."""
    from ..utils.output_paths import disk_full_message

    try:
        return write(*args, **kwargs)
    except OSError as err:
        message = disk_full_message(err)
        if message is None:
            raise
        raise UsageError(f"could not write the outputs: {message}") from None


def run_demo(args: argparse.Namespace) -> int:
    try:
        return _demo(args)
    except UsageError as err:
        return report_usage_error("demo", err)


def _check_out_folder(value: str) -> Path:
    out_dir = Path(value).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {value!r} exists and is not a folder")
    _check_writable_parent(out_dir.absolute(), "--out", value)
    return out_dir


def _check_dense_folder(value: str, flag: str) -> str:
    folder = Path(value).expanduser()
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"{flag} {value!r}: expected a dense baseline pipeline folder (with model_index.json)")
    return str(folder)


def _demo(args: argparse.Namespace) -> int:
    out_dir = _check_out_folder(args.out)
    dense = _check_dense_folder(args.dense, "--dense") if args.dense else None
    demo_files = [("--out", out_dir / name) for name in DEMO_FILES]
    guard_outputs(demo_files, [("--dense", dense)] if dense else [], args.overwrite)
    if dense is None:  # the shipped baseline: a broken install is said before any model loads
        from ..utils.toy import sprite_dense_model_path

        _check_dense_folder(sprite_dense_model_path(), "the shipped dense baseline (--dense not given)")
    from ..eval.demo import run_demo as run

    out_dir.mkdir(parents=True, exist_ok=True)
    claim_outputs(p for _, p in demo_files)
    summary = write_or_explain(run, out_dir, seed=args.seed, dense_path=dense, num_inference_steps=args.steps)
    print(summary["report"])
    return 0
