"""``diasr eval`` (OpenS2V-Eval-style scoring of generated videos) and ``diasr eval-routing`` (routing IoU).

Exit codes: 0 = results written; 1 = nothing could be evaluated (every video missing or corrupt; results are still
written so the reasons are on disk); 2 = bad input (a message on stderr names the argument).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import in_cli_words

ROUTING_MAPS_KEY = "routing_maps"
MASKS_KEY = "masks"


class _InputError(Exception):
    """Bad command-line input: reported as ``error: <message>`` with exit code 2."""


def _error(message: str) -> int:
    print(f"diasr: error: {message}", file=sys.stderr)
    return 2


def _check_out(path: str, flag: str = "--out") -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _InputError(f"{flag}: folder {folder} does not exist")
    return path


def _plot_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".png"


def _eval_outputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    outputs = [("--out", args.out)]
    if not args.no_plot:
        outputs.append(("the bar chart (<name>.png beside --out)", _plot_path(args.out)))
    return outputs


def _check_eval_outputs(args: argparse.Namespace, cases: dict[str, Any] | None = None) -> None:
    """Every file ``diasr eval`` writes must be distinct from the others and from every input (the case file, the
    precomputed scores, the videos folder, each reference image), and replace only files diasr wrote."""
    from ..utils.output_paths import OutputPathError, check_outputs

    _check_out(args.out)
    inputs = [("--cases", args.cases), ("--videos", args.videos)]
    inputs += [("--precomputed", args.precomputed)] if args.precomputed else []
    for case in (cases or {}).values():
        inputs += [(f"reference image of case {case.case_id!r}", p) for p in case.img_paths]
    try:
        check_outputs(_eval_outputs(args), inputs, overwrite=args.overwrite)
    except OutputPathError as err:
        raise _InputError(str(err)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` and ``eval-routing`` to the ``diasr`` command line."""
    from ..eval.runner import METRIC_GROUPS, OFFLINE_DEFAULT_METRICS

    p = subparsers.add_parser(
        "eval",
        help="score generated videos on an OpenS2V-Eval case file",
        description=(
            "Score <case_id>.mp4 videos against an OpenS2V-Eval case file. Offline metrics: MotionAmplitude "
            "(OpenS2V's exact Farneback score), Flicker (warp residual), FaceSim (dlib, one-to-one + max-over-pairs "
            "+ leakage). CLIP-T and SubjectSim need local model folders. TotalScore needs the hub/GPT-4o scores "
            "passed with --precomputed."
        ),
    )
    p.add_argument(
        "--cases", required=True, help="OpenS2V-Eval case JSON ({case_id: {img_paths, prompt, class_label}})"
    )
    p.add_argument("--videos", required=True, help="folder holding <case_id>.mp4")
    p.add_argument("--out", required=True, help="results JSON; the bar chart goes next to it as <name>.png")
    p.add_argument(
        "--metrics",
        nargs="+",
        default=list(OFFLINE_DEFAULT_METRICS),
        choices=list(METRIC_GROUPS),
        help=f"metric groups (default: {' '.join(OFFLINE_DEFAULT_METRICS)})",
    )
    p.add_argument("--version", default="v1.1", choices=["v1.0", "v1.1"], help="TotalScore version")
    p.add_argument("--domain", default="open", choices=["open", "single", "human"], help="TotalScore domain")
    p.add_argument("--images-root", default=None, help="folder img_paths are relative to (default: the case file's)")
    p.add_argument(
        "--precomputed",
        default=None,
        help="JSON {case_id: {aes_score, motion_smoothness, facesim_cur, gme_score, nexus_score, natural_score}}",
    )
    p.add_argument("--face-embedder", default="dlib", choices=["dlib", "insightface"])
    p.add_argument("--face-model-root", default=None, help="insightface model root (for --face-embedder insightface)")
    p.add_argument("--face-frames", type=int, default=16, help="frames sampled for face / CLIP / subject metrics")
    p.add_argument("--clip-model", default=None, help="local CLIP folder (for CLIP-T)")
    p.add_argument("--subject-model", default=None, help="local CLIP or DINOv2 folder (for SubjectSim)")
    p.add_argument("--no-plot", action="store_true", help="do not write the bar chart")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files diasr did not write")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_eval)

    r = subparsers.add_parser(
        "eval-routing",
        help="IoU between routing maps and ground-truth subject masks",
        description=(
            f"--maps is an .npz with key '{ROUTING_MAPS_KEY}': int (B, F_lat, H_tok, W_tok) or (F_lat, H_tok, W_tok), "
            f"subject index per video token or -1 (as returned by DiasRPipeline(return_routing_maps=True)). --masks is "
            f"an .npz with key '{MASKS_KEY}': (B, N, F, H, W) or (N, F, H, W) pixel masks, one per subject, bool or "
            "0/1 or coverage in [0, 1]."
        ),
    )
    r.add_argument("--maps", required=True, help=f".npz with '{ROUTING_MAPS_KEY}'")
    r.add_argument("--masks", required=True, help=f".npz with '{MASKS_KEY}'")
    r.add_argument("--out", required=True, help="output JSON")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out that diasr did not write")
    r.add_argument("--temporal-compression", type=int, default=4)
    r.add_argument("--spatial-compression", type=int, default=8)
    r.add_argument("--patch-size", type=int, nargs=3, default=[1, 2, 2], metavar=("PT", "PH", "PW"))
    r.add_argument("--threshold", type=float, default=0.5, help="mask coverage that makes a token a subject's")
    r.set_defaults(func=run_eval_routing)


def _load_precomputed(path: str) -> dict[str, dict[str, float]]:
    if not os.path.isfile(path):
        raise _InputError(f"--precomputed: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _InputError(f"--precomputed: not valid JSON: {err}") from err
    except RecursionError as err:
        raise _InputError("--precomputed: not valid JSON: nested too deeply") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise _InputError("--precomputed: expected a JSON object {case_id: {score_name: number}}")
    for case_id, scores in data.items():
        bad = [k for k, v in scores.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
        if bad:
            raise _InputError(f"--precomputed: case {case_id!r}: non-numeric scores {bad}")
    return data


def _build_models(args: argparse.Namespace) -> dict[str, Any]:
    models: dict[str, Any] = {}
    try:
        if "FaceSim" in args.metrics:
            from ..eval.identity import DlibFaceEmbedder, InsightFaceEmbedder

            if args.face_embedder == "dlib":
                models["face_embedder"] = DlibFaceEmbedder()
            else:
                if not args.face_model_root:
                    raise _InputError("--face-model-root is required with --face-embedder insightface")
                models["face_embedder"] = InsightFaceEmbedder(args.face_model_root)
        if "CLIP-T" in args.metrics:
            if not args.clip_model:
                raise _InputError("--clip-model is required for the CLIP-T metric (a local CLIP folder)")
            from ..eval.identity import ClipTextScorer

            models["clip_scorer"] = ClipTextScorer(args.clip_model)
        if "SubjectSim" in args.metrics:
            if not args.subject_model:
                raise _InputError("--subject-model is required for the SubjectSim metric (a local CLIP/DINOv2 folder)")
            from ..eval.identity import TransformersImageEmbedder

            models["subject_embedder"] = TransformersImageEmbedder(args.subject_model)
    except (ImportError, FileNotFoundError) as err:
        raise _InputError(str(err)) from err
    return models


def run_eval(args: argparse.Namespace) -> int:
    from ..eval.cases import load_cases
    from ..eval.runner import atomic_write_json, evaluate_cases, plot_category_scores

    try:
        try:
            cases = load_cases(args.cases, images_root=args.images_root)
        except (FileNotFoundError, ValueError) as err:
            raise _InputError(str(err).replace("`cases`", "--cases", 1)) from err
        if not os.path.isdir(args.videos):
            raise _InputError(f"--videos: folder not found: {args.videos}")
        _check_eval_outputs(args, cases)
        if args.face_frames < 1:
            raise _InputError(f"--face-frames must be >= 1, got {args.face_frames}")
        precomputed = _load_precomputed(args.precomputed) if args.precomputed else None
        from ..eval._deps import require

        needed = (["cv2"] if {"MotionAmplitude", "Flicker"} & set(args.metrics) else []) + (
            ["scipy"] if "FaceSim" in args.metrics else []
        )
        for module in needed:
            try:
                require(module)
            except ImportError as err:
                raise _InputError(f"--metrics: {err}") from err
        models = _build_models(args)
    except _InputError as err:
        return _error(str(err))

    from ..utils.output_paths import claim_outputs

    claim_outputs(p for _, p in _eval_outputs(args))
    cases_path = os.path.abspath(args.cases)

    def save(partial: dict[str, Any]) -> None:
        # After every case: a crash or a kill later in the run keeps what was already scored.
        partial["config"]["cases"] = cases_path
        atomic_write_json(args.out, partial)

    results = evaluate_cases(
        cases,
        args.videos,
        metrics=args.metrics,
        face_embedder_name=args.face_embedder,
        precomputed=precomputed,
        version=args.version,
        domain=args.domain,
        face_frames=args.face_frames,
        progress=not args.no_progress,
        on_case_done=save,
        **models,
    )
    save(results)
    plot_path = None
    if not args.no_plot:
        plot_path = _plot_path(args.out)
        if not plot_category_scores(results, plot_path):
            plot_path = None

    summary = results["summary"]
    print(f"evaluated {summary['evaluated']}/{summary['num_cases']} cases; skipped {summary['skipped']}")
    for case_id, reason in results["skipped"].items():
        print(f"  skipped {case_id}: {reason}")
    total = results["overall"]["total_score"]
    if total["value"] is not None:
        print(f"TotalScore {total['version']} ({total['domain']}): {100 * total['value']:.2f}%")
    else:
        print(f"TotalScore {total['version']} ({total['domain']}): not computed, missing {total['missing']}")
    print(f"results: {args.out}" + (f"; chart: {plot_path}" if plot_path else ""))
    return 0 if summary["evaluated"] else 1


def _load_npz_array(path: str, key: str, flag: str):
    import numpy as np

    if not os.path.isfile(path):
        raise _InputError(f"{flag}: file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if key not in data.files:
                raise _InputError(f"{flag}: {path} has no array '{key}' (found: {sorted(data.files)})")
            return data[key]
    except _InputError:
        raise
    except Exception as err:  # zipfile / numpy raise several types for a file that is not an npz
        raise _InputError(f"{flag}: cannot read {path} as .npz: {err}") from err


def run_eval_routing(args: argparse.Namespace) -> int:
    from ..eval.routing import routing_iou
    from ..eval.runner import atomic_write_json

    try:
        maps = _load_npz_array(args.maps, ROUTING_MAPS_KEY, "--maps")
        masks = _load_npz_array(args.masks, MASKS_KEY, "--masks")
        _check_out(args.out)
        from ..utils.output_paths import OutputPathError, check_outputs

        try:
            check_outputs([("--out", args.out)], [("--maps", args.maps), ("--masks", args.masks)],
                          overwrite=args.overwrite)  # fmt: skip
        except OutputPathError as err:
            raise _InputError(str(err)) from None
        try:
            result = routing_iou(
                maps,
                masks,
                temporal_compression=args.temporal_compression,
                spatial_compression=args.spatial_compression,
                patch_size=tuple(args.patch_size),
                threshold=args.threshold,
            )
        except ValueError as err:
            flags = (
                ("`routing_maps`", "--maps"),
                ("`masks`", "--masks"),
                ("`temporal_compression`", "--temporal-compression"),
                ("`spatial_compression`", "--spatial-compression"),
                ("`patch_size`", "--patch-size"),
                ("`threshold`", "--threshold"),
            )
            raise _InputError(in_cli_words(err, flags)) from err
    except _InputError as err:
        return _error(str(err))
    result["config"] = {
        "maps": os.path.abspath(args.maps),
        "masks": os.path.abspath(args.masks),
        "temporal_compression": args.temporal_compression,
        "spatial_compression": args.spatial_compression,
        "patch_size": list(args.patch_size),
        "threshold": args.threshold,
    }
    from ..utils.output_paths import claim_outputs

    claim_outputs([args.out])
    atomic_write_json(args.out, result)
    mean = result["mean_iou"]
    print(f"routing mean IoU: {'n/a' if mean is None else f'{mean:.4f}'}; accuracy {result['accuracy']:.4f}")
    print(f"results: {args.out}")
    return 0
