"""The evaluation loop behind ``diasr eval``: cases + videos -> per-case, per-category and overall results."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..utils.io import atomic_write_bytes
from .cases import EvalCase
from .flicker import warp_residual
from .identity import cosine_similarity, identity_scores
from .motion import motion_amplitude
from .scores import RAW_METRIC_KEYS, aggregate_video_scores, total_score, total_score_metrics
from .video import VideoReadError, read_video, sample_frame_indices

# Metric groups selectable with --metrics, and the values each one writes per case.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "MotionAmplitude": ("MotionAmplitude",),
    "Flicker": ("WarpResidual", "BrightnessFlicker"),
    "FaceSim": ("FaceSim-1to1", "FaceSim-MaxPairs", "FaceLeakage"),
    "CLIP-T": ("CLIP-T",),
    "SubjectSim": ("SubjectSim",),
}
OFFLINE_DEFAULT_METRICS = ("MotionAmplitude", "Flicker", "FaceSim")


def _jsonable(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), numpy scalars -> Python."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(payload), indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class ReferenceImageError(ValueError):
    """A case's reference image exists but cannot be used (not an image, truncated, or absurdly large)."""


def _load_rgb(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError, MemoryError) as err:
        # A header claiming 30000x30000 pixels raises DecompressionBombError (not an OSError); it must cost one
        # case, not the run.
        raise ReferenceImageError(f"{path}: {type(err).__name__}: {err}") from err


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else None


def _leaderboard_block(raw: Sequence[Mapping[str, float]], version: str, domain: str) -> dict[str, Any]:
    leaderboard = aggregate_video_scores(raw)
    needed = total_score_metrics(version, domain)
    if version == "v1.0" and "MotionAmplitude" in leaderboard:
        leaderboard["Motion"] = leaderboard.pop("MotionAmplitude")
    missing = [name for name in needed if name not in leaderboard]
    value = None if missing else total_score(leaderboard, version=version, domain=domain)
    return {
        "leaderboard": leaderboard,
        "total_score": {"value": value, "version": version, "domain": domain, "missing": missing},
    }


def evaluate_cases(
    cases: Mapping[str, EvalCase],
    videos_dir: str | os.PathLike,
    *,
    metrics: Sequence[str] = OFFLINE_DEFAULT_METRICS,
    face_embedder: Any = None,
    face_embedder_name: str = "dlib",
    clip_scorer: Any = None,
    subject_embedder: Any = None,
    precomputed: Mapping[str, Mapping[str, float]] | None = None,
    version: str = "v1.1",
    domain: str = "open",
    face_frames: int = 16,
    progress: bool = True,
    on_case_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Score every case whose video exists and decodes; report the others as skipped.

    A case whose video or reference image cannot be read, or whose metric computation fails, is skipped with the
    reason; the other cases are still scored.

    Args:
        cases: from :func:`~diasr_diffusers.eval.load_cases`.
        videos_dir: folder with ``<case_id>.mp4``.
        metrics: groups from :data:`METRIC_GROUPS`.
        face_embedder: a :class:`~diasr_diffusers.eval.FaceEmbedder` (needed for ``FaceSim``).
        face_embedder_name: recorded in the results so numbers from different embedders are not mixed up.
        clip_scorer: a :class:`~diasr_diffusers.eval.ClipTextScorer` (needed for ``CLIP-T``).
        subject_embedder: a :class:`~diasr_diffusers.eval.SubjectEmbedder` (needed for ``SubjectSim``: mean cosine
            between sampled frames and each reference image, CLIP-I / DINO-I style).
        precomputed: ``{case_id: {raw OpenS2V key: value}}`` for the scores that need hub weights or GPT-4o
            (``aes_score``, ``motion_smoothness``, ``facesim_cur``, ``gme_score``, ``nexus_score``,
            ``natural_score``); merged into the leaderboard aggregation so TotalScore can be computed.
        version, domain: TotalScore formula.
        face_frames: frames sampled evenly for face / CLIP / subject metrics (motion uses every frame).
        progress: show a tqdm progress bar on stderr.
        on_case_done: called after every case with the results so far (``"complete": False`` until the last
            case), e.g. to write them to disk so that a crash or a kill loses nothing.

    Returns:
        A JSON-ready dict with ``cases``, ``skipped``, ``categories``, ``overall``, ``summary`` and ``complete``.
    """
    from tqdm.auto import tqdm

    unknown = [m for m in metrics if m not in METRIC_GROUPS]
    if unknown:
        raise ValueError(f"`metrics`: unknown {unknown}; choose from {list(METRIC_GROUPS)}")
    if "FaceSim" in metrics and face_embedder is None:
        raise ValueError("`face_embedder` is required for the FaceSim metric")
    if "CLIP-T" in metrics and clip_scorer is None:
        raise ValueError("`clip_scorer` is required for the CLIP-T metric")
    if "SubjectSim" in metrics and subject_embedder is None:
        raise ValueError("`subject_embedder` is required for the SubjectSim metric")
    total_score_metrics(version, domain)  # validates version / domain before any video is read
    if isinstance(face_frames, bool) or not isinstance(face_frames, int) or face_frames < 1:
        raise ValueError(f"`face_frames` must be an integer >= 1, got {face_frames!r}")
    precomputed = precomputed or {}
    needs_refs = any(m in metrics for m in ("FaceSim", "SubjectSim"))

    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    raw_scores: dict[str, dict[str, float]] = {}

    def assemble(complete: bool) -> dict[str, Any]:
        return _assemble(
            cases,
            results,
            skipped,
            raw_scores,
            metrics,
            version,
            domain,
            face_embedder_name,
            face_frames,
            videos_dir,
            complete,
        )

    for case_id, case in tqdm(cases.items(), desc="diasr eval", unit="case", disable=not progress):
        _evaluate_case(
            case_id,
            case,
            videos_dir,
            metrics,
            needs_refs,
            face_frames,
            precomputed,
            face_embedder,
            clip_scorer,
            subject_embedder,
            results,
            skipped,
            raw_scores,
        )
        if on_case_done is not None:
            on_case_done(assemble(complete=False))
    return assemble(complete=True)


def _evaluate_case(
    case_id: str,
    case: EvalCase,
    videos_dir: str | os.PathLike,
    metrics: Sequence[str],
    needs_refs: bool,
    face_frames: int,
    precomputed: Mapping[str, Mapping[str, float]],
    face_embedder: Any,
    clip_scorer: Any,
    subject_embedder: Any,
    results: dict[str, Any],
    skipped: dict[str, str],
    raw_scores: dict[str, dict[str, float]],
) -> None:
    """Score one case into ``results`` / ``raw_scores``, or record why it was skipped in ``skipped``."""
    video_path = case.video_path(videos_dir)
    if not os.path.isfile(video_path):
        skipped[case_id] = f"missing video: {video_path}"
        return
    refs: list[np.ndarray] = []
    if needs_refs:
        missing_refs = [p for p in case.img_paths if not os.path.isfile(p)]
        if missing_refs:
            skipped[case_id] = f"missing reference image(s): {missing_refs}"
            return
        try:  # before the video: a bad reference is found without decoding anything
            refs = [_load_rgb(p) for p in case.img_paths]
        except ReferenceImageError as err:
            skipped[case_id] = f"unreadable reference image: {err}"
            return
    try:
        frames = read_video(video_path)
    except VideoReadError as err:
        skipped[case_id] = f"corrupt video: {err}"
        return
    try:
        values, details = _case_metrics(
            frames, refs, case, metrics, face_frames, face_embedder, clip_scorer, subject_embedder
        )
    except Exception as err:  # noqa: BLE001 - one case's failure must not cost the results of the others
        skipped[case_id] = f"metric failed: {type(err).__name__}: {err}"
        return
    raw = dict(precomputed.get(case_id, {}))
    if values.get("MotionAmplitude") is not None:
        raw["motion_amplitude"] = values["MotionAmplitude"]
    raw_scores[case_id] = {k: v for k, v in raw.items() if k in RAW_METRIC_KEYS or k.startswith("naturalscore_")}
    results[case_id] = {"category": case.category, "metrics": values, "details": details}


def _case_metrics(
    frames: np.ndarray,
    refs: list[np.ndarray],
    case: EvalCase,
    metrics: Sequence[str],
    face_frames: int,
    face_embedder: Any,
    clip_scorer: Any,
    subject_embedder: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(values, details)`` of one decoded case; raises whatever a metric raises (the caller skips the case)."""
    values: dict[str, Any] = {}
    details: dict[str, Any] = {
        "num_frames": int(frames.shape[0]),
        "size": [int(frames.shape[1]), int(frames.shape[2])],
    }
    sampled = frames[sample_frame_indices(len(frames), face_frames)]
    if "MotionAmplitude" in metrics:
        values["MotionAmplitude"] = motion_amplitude(frames) if len(frames) > 1 else None
    if "Flicker" in metrics:
        if len(frames) > 1:
            values.update(warp_residual(frames))
        else:
            values.update({"WarpResidual": None, "BrightnessFlicker": None})
    if "FaceSim" in metrics:
        ref_emb = np.asarray(face_embedder.embed(refs), dtype=np.float64)
        has_face = np.all(np.isfinite(ref_emb), axis=1)
        details["face_references"] = [i for i, ok in enumerate(has_face.tolist()) if ok]
        if has_face.any():
            dets = []
            for frame in sampled:
                found = face_embedder.detect_and_embed(frame)
                dets.append(np.stack([e for _, e in found]) if found else np.zeros((0, ref_emb.shape[1])))
            scores = identity_scores(ref_emb[has_face], dets)
            values["FaceSim-1to1"] = scores.one_to_one
            values["FaceSim-MaxPairs"] = scores.max_over_pairs
            values["FaceLeakage"] = scores.leakage
            details["face"] = scores.to_dict()
        else:  # no human face among the references: the metric does not apply
            values.update({"FaceSim-1to1": None, "FaceSim-MaxPairs": None, "FaceLeakage": None})
    if "CLIP-T" in metrics:
        values["CLIP-T"] = clip_scorer.score(list(sampled), case.prompt)
    if "SubjectSim" in metrics:
        sims = cosine_similarity(subject_embedder.embed(refs), subject_embedder.embed(list(sampled)))
        values["SubjectSim"] = float(sims.mean())
        details["subject_sim_per_reference"] = sims.mean(axis=1).tolist()
    return values, details


def _assemble(
    cases: Mapping[str, EvalCase],
    results: dict[str, Any],
    skipped: dict[str, str],
    raw_scores: dict[str, dict[str, float]],
    metrics: Sequence[str],
    version: str,
    domain: str,
    face_embedder_name: str,
    face_frames: int,
    videos_dir: str | os.PathLike,
    complete: bool,
) -> dict[str, Any]:
    """The results document: per-case values plus per-category and overall aggregates of the cases so far."""
    value_names = [name for group in metrics for name in METRIC_GROUPS[group]]
    categories: dict[str, Any] = {}
    for category in sorted({case["category"] for case in results.values()}):
        members = [cid for cid, case in results.items() if case["category"] == category]
        categories[category] = {
            "num_cases": len(members),
            "metrics": {n: _mean([results[c]["metrics"].get(n) for c in members]) for n in value_names},
            **_leaderboard_block([raw_scores[c] for c in members], version, domain),
        }
    overall = {
        "num_cases": len(results),
        "metrics": {n: _mean([case["metrics"].get(n) for case in results.values()]) for n in value_names},
        **_leaderboard_block(list(raw_scores.values()), version, domain),
    }
    return {
        "config": {
            "metrics": list(metrics),
            "version": version,
            "domain": domain,
            "face_embedder": face_embedder_name if "FaceSim" in metrics else None,
            "face_frames": face_frames,
            "videos": os.path.abspath(os.fspath(videos_dir)),
        },
        "complete": complete,
        "summary": {"num_cases": len(cases), "evaluated": len(results), "skipped": len(skipped)},
        "skipped": dict(skipped),
        "cases": dict(results),
        "categories": categories,
        "overall": overall,
    }


def plot_category_scores(results: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Bar chart of per-category metric means (one panel per metric), written atomically as PNG.

    Returns ``False`` (and writes nothing) when there is no category with a finite value to plot.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    categories = results.get("categories", {})
    panels = []
    names = sorted({name for block in categories.values() for name in block["metrics"]})
    for name in names:
        bars = [
            (cat, block["metrics"][name])
            for cat, block in categories.items()
            if block["metrics"].get(name) is not None
        ]
        if bars:
            panels.append((name, bars))
    total = [
        (cat, b["total_score"]["value"]) for cat, b in categories.items() if b["total_score"]["value"] is not None
    ]
    if total:
        panels.append((f"TotalScore ({results['config']['version']})", total))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.9 * len(categories) + 2), 2.6 * len(panels)))
    axes = np.atleast_1d(axes)
    for ax, (name, bars) in zip(axes, panels):
        labels, heights = zip(*bars)
        ax.bar(range(len(labels)), heights, color="#4C72B0")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True
