"""``diasr curate`` (raw videos -> MuSA manifest) and ``diasr import-opens2v`` (OpenS2V-5M JSON -> MuSA manifest)."""

from __future__ import annotations

import argparse
import sys

from . import in_cli_words

_FLAGS = (
    ("`videos`", "VIDEOS"),
    ("`out`", "--out"),
    ("`captions`", "--captions"),
    ("`workers`", "--workers"),
    ("`executor`", "--executor"),
    ("`json_path`", "JSON"),
    ("`videos_root`", "--videos-root"),
    ("`pairs`", "--pairs"),
    ("`checkpoint`", "CHECKPOINT"),
)


def _stages(args: argparse.Namespace):
    from ..data.curate import CaptionsFile, NoGrounder, Stages

    stages = Stages(captioner=CaptionsFile(args.captions) if args.captions else None)
    if args.no_ocr:
        stages.ocr = None
    if args.no_faces:
        stages.faces = None
    if args.grounder == "captions":
        stages.grounder = NoGrounder()
    if args.models:
        from ..data.curate import hub

        if args.captions and any(spec.startswith("caption=") for spec in args.models):
            raise ValueError("`captions`: give a captions file or a captioner model (--models caption=ID), not both")
        stages = hub.hub_stages(stages, args.models, device=args.device)
    return stages


def _curate(args: argparse.Namespace) -> int:
    from ..data.curate import CurateOptions, MetadataFilter, Thresholds, curate

    try:
        options = CurateOptions(
            metadata=MetadataFilter(min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                                    min_short_side=args.min_short_side, min_fps=args.min_fps),  # fmt: skip
            thresholds=Thresholds(min_motion=args.min_motion, max_text_area=args.max_text_area,
                                  min_mask_fraction=args.min_mask_fraction),  # fmt: skip
            max_output_side=args.max_output_side,
            max_clips_per_video=args.max_clips_per_video,
        )
        stages = _stages(args)
        if stages.captioner is None:
            print("error: --captions: give a captions file or a captioner model (--models caption=ID)", file=sys.stderr)
            return 2
        report = curate(args.videos, args.out, stages=stages, options=options, workers=args.workers,
                        executor=args.executor, progress=not args.quiet)  # fmt: skip
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {in_cli_words(err, _FLAGS)}", file=sys.stderr)
        return 2
    print(
        f"{report['clips']} clips: {report['kept']} kept, {report['dropped']} dropped, {report['failed']} failed; "
        f"manifest {args.out}/manifest.jsonl, report {args.out}/report.md"
    )
    return 0


def _import_opens2v(args: argparse.Namespace) -> int:
    from ..data.curate.opens2v import import_opens2v

    try:
        report = import_opens2v(args.json, args.videos_root, args.out, pairs=args.pairs, limit=args.limit,
                                min_subject_aesthetic=args.min_subject_aesthetic, progress=not args.quiet)  # fmt: skip
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {in_cli_words(err, _FLAGS)}", file=sys.stderr)
        return 2
    print(f"{report['records']} records: {report['kept']} kept, {report['dropped']} dropped; report {args.out}/report.md")
    return 0


def _convert_laion(args: argparse.Namespace) -> int:
    from ..data.curate.convert import convert_laion_aesthetic, convert_laion_watermark

    try:
        if args.model == "watermark":
            out = convert_laion_watermark(args.checkpoint, args.out, width_coefficient=args.width_coefficient,
                                          depth_coefficient=args.depth_coefficient)  # fmt: skip
            use = f"--models watermark={out}"
        else:
            out = convert_laion_aesthetic(args.checkpoint, args.out)
            use = f"--models aesthetic={out}"
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {in_cli_words(err, _FLAGS)}", file=sys.stderr)
        return 2
    print(f"wrote {out}; use it with: diasr curate ... {use}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("curate", help="raw videos -> MuSA manifest (shots, filters, captions, subjects, masks)")
    p.add_argument("videos", nargs="+", help="video files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="dataset folder (new, empty, or an earlier curate run to resume)")
    p.add_argument("--captions", help="captions file (JSON/JSONL with caption and subject phrases per video/shot)")
    p.add_argument("--models", action="append", default=[], metavar="STAGE=ID",
                   help="Hub id or folder for a model stage: aesthetic=MLP.safetensors, clip=, watermark=, grounding=, "
                        "segmentation=, caption= (Qwen2.5-VL, instead of --captions) (repeatable)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device for the Hub-model stages")
    p.add_argument("--grounder", choices=("faces", "captions"), default="faces",
                   help="offline boxes: dlib faces for person phrases, or only boxes from the captions file")  # fmt: skip
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--executor", choices=("process", "ray"), default="process")
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=10.0)
    p.add_argument("--min-short-side", type=int, default=480)
    p.add_argument("--min-fps", type=float, default=8.0)
    p.add_argument("--min-motion", type=float, default=0.05)
    p.add_argument("--max-text-area", type=float, default=0.005)
    p.add_argument("--min-mask-fraction", type=float, default=1 / 32)
    p.add_argument("--max-output-side", type=int, default=None)
    p.add_argument("--max-clips-per-video", type=int, default=None)
    p.add_argument("--no-ocr", action="store_true")
    p.add_argument("--no-faces", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_curate)

    p = subparsers.add_parser("import-opens2v", help="OpenS2V-5M annotation JSON (streamed) -> MuSA manifest")
    p.add_argument("json", help="an OpenS2V-5M JSON ({clip_key: record}); read as a stream, never loaded whole")
    p.add_argument("--videos-root", required=True, help="folder the records' metadata.path is relative to")
    p.add_argument("--out", required=True, help="dataset folder")
    p.add_argument("--pairs", help="cross_video_pairs JSON ({cluster: [pair, ...]}) for extra references")
    p.add_argument("--limit", type=int, default=None, help="stop after this many records")
    p.add_argument("--min-subject-aesthetic", type=float, default=4.5)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_import_opens2v)

    p = subparsers.add_parser("convert-laion", help="LAION watermark/aesthetic pickles -> the safetensors the curate "
                                                    "stages load (read once with torch.load(weights_only=True))")  # fmt: skip
    p.add_argument("model", choices=("watermark", "aesthetic"),
                   help="watermark: watermark_model_v1.pt (timm efficientnet_b3a + MLP head) -> a folder; "
                        "aesthetic: the CLIP-L/14 aesthetic MLP .pth -> one .safetensors file")  # fmt: skip
    p.add_argument("checkpoint", help="the published .pt/.pth file")
    p.add_argument("--out", required=True, help="new folder (watermark) or new .safetensors file (aesthetic)")
    p.add_argument("--width-coefficient", type=float, default=1.2, help="EfficientNet width (B3: 1.2)")
    p.add_argument("--depth-coefficient", type=float, default=1.4, help="EfficientNet depth (B3: 1.4)")
    p.set_defaults(func=_convert_laion)
