"""The curation runner: raw videos -> shots -> clips -> filters -> caption -> subjects -> manifest.

Work is split in two phases, each parallel over processes (``concurrent.futures``) or over a Ray cluster
(``ray.data``): phase 1 probes each video and cuts it into shots; phase 2 runs the per-clip stages. Every finished
clip leaves ``<out>/.curate/clips/<clip_id>.json`` (kept or dropped, with every score), written atomically after
its video, masks and references, so a crash, a full disk or Ctrl-C loses at most the clips in flight and a rerun
skips what is done. The manifest and the report are rebuilt from those files at the end of every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._io import atomic_path, atomic_write_bytes, atomic_write_text, npz_bytes, write_video
from ..manifest import MANIFEST_NAME
from .caption import CaptionError, CaptionsFile, ClipContext
from .faces import DlibFaces
from .filters import MetadataFilter
from .frames import BadVideoError, VideoInfo, mask_iou, probe, read_range
from .grounding import FaceBodyGrounder
from .motion import FarnebackMotion
from .ocr import RapidOCRText, text_area_fraction, text_free_crop
from .references import cutout_on_white
from .segmentation import GrabCutFlowSegmenter
from .shots import ShotDetector

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
STATE_DIR = ".curate"
#: The order in which a clip meets the filters; the report counts kept/dropped per stage in this order.
STAGES = ("metadata", "decode", "motion", "ocr", "aesthetic", "watermark", "caption", "phrases", "grounding",
          "segmentation", "subjects", "write")  # fmt: skip


@dataclass
class Thresholds:
    """Every decision threshold (each stored with the clip's scores in ``meta``, so it can be re-applied later).

    Sources: ``min_mask_fraction``, ``dedupe_iou``, ``max_subjects``, ``min_subject_aesthetic`` are OpenS2V-Nexus'
    high-quality-subset rules (``data_process/README.md`` Step 7); ``min_aesthetic`` 4.75 and
    ``max_crop_fraction`` 0.2 are Open-Sora Plan v1.3's; ``max_watermark`` 0.5 is video-dataset-scripts' example.
    ``min_motion``/``max_motion`` (mean Farneback magnitude, pixels per frame at 256 px width) and
    ``max_text_area`` have no published value; ours are set from the footage in ``docs/data.md``.
    """

    min_motion: float = 0.05
    max_motion: float = 20.0
    max_text_area: float = 0.005
    max_crop_fraction: float = 0.2
    min_aesthetic: float = 4.75
    max_watermark: float = 0.5
    min_mask_fraction: float = 1 / 32
    dedupe_iou: float = 0.8
    max_subjects: int = 6
    min_subject_aesthetic: float = 4.5


@dataclass
class Stages:
    """The stage implementations; ``None`` switches a stage off (recorded as ``"skipped"`` in ``meta``).

    Offline defaults: PySceneDetect, Farneback, RapidOCR, dlib, GrabCut + flow. Hub-model stages
    (:mod:`diasr_diffusers.data.curate.hub`) plug in the same slots. Stages load their models lazily, in the
    worker process, so a ``Stages`` object pickles cheaply.
    """

    shots: Any = field(default_factory=ShotDetector)
    motion: Any = field(default_factory=FarnebackMotion)
    ocr: Any = field(default_factory=RapidOCRText)
    faces: Any = field(default_factory=DlibFaces)
    aesthetic: Any = None
    watermark: Any = None
    captioner: Any = None
    grounder: Any = field(default_factory=FaceBodyGrounder)
    segmenter: Any = field(default_factory=GrabCutFlowSegmenter)

    def names(self) -> dict[str, str | None]:
        return {f.name: getattr(getattr(self, f.name), "name", type(getattr(self, f.name)).__name__)
                if getattr(self, f.name) is not None else None for f in dataclasses.fields(self)}  # fmt: skip


@dataclass
class ClipTask:
    clip_id: str
    video: str
    video_name: str
    shot: int
    start: int
    end: int
    info: dict


@dataclass
class CurateOptions:
    """How clips are analysed and written (not thresholds).

    Args:
        metadata: duration/fps/resolution rules and the shot-to-window cutting.
        thresholds: see :class:`Thresholds`.
        ocr_frames: frames read by OCR per clip (spread evenly; Open-Sora Plan reads 1 fps).
        score_frames: frames scored by the aesthetic and watermark models (first, middle, last).
        max_output_side: downscale the written clip (and masks) so its long side is at most this; None = as is.
        max_clips_per_video: process only the first N clip windows of each video (smoke tests, previews); the
            rest are reported as dropped at ``metadata`` with the reason "limit".
    """

    metadata: MetadataFilter = field(default_factory=MetadataFilter)
    thresholds: Thresholds = field(default_factory=Thresholds)
    ocr_frames: int = 3
    score_frames: int = 3
    max_output_side: int | None = None
    max_clips_per_video: int | None = None
    crf: int = 18

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def find_videos(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Video files named by ``inputs`` (files, or folders searched recursively by extension), sorted, unique."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found += [q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in VIDEO_EXTENSIONS]
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"`videos`: {p} does not exist")
    return sorted({q.resolve() for q in found})


def video_id(path: Path) -> str:
    """A stable, unique, file-name-safe id: the stem plus a hash of the absolute path (two ``clip.mp4`` differ)."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)[:48]
    return f"{stem}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_json_default)


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------------------------
# Phase 1: probe + shots


def plan_video(path: str, stages: Stages, state_dir: str) -> dict:
    """Probe one video and cut it into shots; cached in ``.curate/videos/<video_id>.json``."""
    vid = video_id(Path(path))
    cache = Path(state_dir) / "videos" / f"{vid}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    try:
        info = probe(path)
        shots = stages.shots.detect(path, info.num_frames)
        result = {"video": path, "video_id": vid, "info": dataclasses.asdict(info), "shots": shots, "error": None}
    except BadVideoError as err:
        result = {"video": path, "video_id": vid, "info": None, "shots": [], "error": str(err)}
    result["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(cache, _dump(result))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: one clip


class _Drop(Exception):
    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage, self.reason = stage, reason


def _mask_at(mask: np.ndarray, x: float, y: float) -> bool:
    h, w = mask.shape
    return bool(mask[min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)])


def _even(n: int) -> int:
    return n - (n % 2)


def _timed(meta: dict, stage: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    meta.setdefault("timing_s", {})[stage] = round(time.perf_counter() - t0, 4)
    return out


def process_clip(task: ClipTask, stages: Stages, options: CurateOptions, out_dir: str) -> dict:
    """Run every per-clip stage; write the clip's files and its result file. Returns the result."""
    from ...routing.phrases import phrase_problems

    out = Path(out_dir)
    th = options.thresholds
    meta: dict[str, Any] = {
        "source": {"video": task.video, "shot": task.shot, "frame_start": task.start, "frame_end": task.end},
        "thresholds": dataclasses.asdict(th),
        "stages": stages.names(),
    }
    meta.update(options.metadata.decide(VideoInfo(**task.info), task.start, task.end)[0])
    result: dict[str, Any] = {"clip_id": task.clip_id, "status": "kept", "stage": None, "reason": None, "meta": meta}
    try:
        frames = _timed(meta, "decode", lambda: read_range(task.video, task.start, task.end))
        if len(frames) != task.end - task.start:
            raise _Drop("decode", f"decoded {len(frames)} frames, expected {task.end - task.start}")
        height, width = frames.shape[1:3]

        if stages.motion is not None:
            meta.update(_timed(meta, "motion", lambda: stages.motion.score(frames)))
            if meta["motion"] < th.min_motion:
                raise _Drop("motion", f"static: motion {meta['motion']:.4f} < min_motion {th.min_motion}")
            if meta["motion"] > th.max_motion:
                raise _Drop("motion", f"jitter: motion {meta['motion']:.4f} > max_motion {th.max_motion}")

        crop = (0, width, 0, height)
        if stages.ocr is not None:
            picks = np.unique(np.linspace(0, len(frames) - 1, options.ocr_frames).round().astype(int))
            per_frame = _timed(meta, "ocr", lambda: [stages.ocr.boxes(frames[i]) for i in picks])
            boxes = [b for bs in per_frame for b in bs]
            area = max(text_area_fraction(bs, height, width) for bs in per_frame)
            found = text_free_crop(boxes, height, width, th.max_crop_fraction)
            meta["ocr"] = {"frames": picks.tolist(), "text_area": round(area, 5),
                           "texts": [b[4] for b in boxes][:20], "boxes": [[round(v, 1) for v in b[:4]] for b in boxes][:20]}  # fmt: skip
            if boxes and found is not None:
                crop = found
                meta["ocr"]["decision"] = "cropped"
            elif boxes:
                meta["ocr"]["decision"] = "text not croppable"
                if area > th.max_text_area:
                    raise _Drop("ocr", f"text on screen: area {area:.4f} > max_text_area {th.max_text_area}, "
                                       f"not within {th.max_crop_fraction:.0%} of an edge")  # fmt: skip
            else:
                meta["ocr"]["decision"] = "no text"
        sx, ex, sy, ey = crop
        ex, ey = sx + _even(ex - sx), sy + _even(ey - sy)
        meta["crop"] = [sx, ex, sy, ey]  # OpenS2V's [s_x, e_x, s_y, e_y] in source pixels
        frames = frames[:, sy:ey, sx:ex]
        if options.max_output_side and max(frames.shape[1:3]) > options.max_output_side:
            from .frames import resize_max_side

            frames = np.stack([resize_max_side(f, options.max_output_side) for f in frames])
            frames = frames[:, : _even(frames.shape[1]), : _even(frames.shape[2])]
        scale = frames.shape[2] / (ex - sx)
        meta["output_size"] = {"height": int(frames.shape[1]), "width": int(frames.shape[2])}
        picks = np.unique(np.linspace(0, len(frames) - 1, options.score_frames).round().astype(int))

        if stages.aesthetic is not None:
            scores = _timed(meta, "aesthetic", lambda: stages.aesthetic.score([frames[i] for i in picks]))
            meta["aesthetic"] = round(float(np.mean(scores)), 4)
            if meta["aesthetic"] < th.min_aesthetic:
                raise _Drop("aesthetic", f"aesthetic {meta['aesthetic']:.3f} < min_aesthetic {th.min_aesthetic}")
        if stages.watermark is not None:
            scores = _timed(meta, "watermark", lambda: stages.watermark.score([frames[i] for i in picks]))
            meta["watermark"] = round(float(np.mean(scores)), 4)
            if meta["watermark"] > th.max_watermark:
                raise _Drop("watermark", f"watermark {meta['watermark']:.3f} > max_watermark {th.max_watermark}")

        if stages.captioner is None:
            raise _Drop("caption", "no captioner: pass a captions file or a VLM captioner")
        ctx = ClipContext(Path(task.video).name, task.shot, task.start, frames, float(task.info["fps"]), (sx, sy))
        try:
            cap = _timed(meta, "caption", lambda: stages.captioner.caption(ctx))
        except CaptionError as err:
            meta["captioner"] = err.meta
            raise _Drop("caption", err.reason) from None
        if cap is None or not cap.text.strip():
            raise _Drop("caption", f"no caption for {Path(task.video).name} shot {task.shot}")
        meta["caption_source"] = cap.source
        if cap.meta:
            meta["captioner"] = cap.meta
        hints = [h for h in cap.subjects]
        if stages.captioner is not None and isinstance(stages.captioner, CaptionsFile):
            hints = [dataclasses.replace(h, box=None if h.box is None else tuple(v * scale for v in h.box))
                     for h in hints]  # fmt: skip
        problems = phrase_problems(cap.text, [h.phrase for h in hints], what="caption")
        dropped_subjects = [{"phrase": hints[int(p.split()[1].rstrip(":"))].phrase, "stage": "phrases", "reason": p}
                            for p in problems]  # fmt: skip
        bad = {d["phrase"] for d in dropped_subjects}
        hints = [h for h in hints if h.phrase not in bad]
        if not hints:
            reason = "; ".join(problems) if problems else "the caption names no subject"
            raise _Drop("phrases", reason)

        if stages.faces is not None:
            faces = _timed(meta, "faces", lambda: stages.faces.detect(frames[0]))
            meta["faces"] = [[round(v, 1) for v in f] for f in faces]
        need = [h.phrase for h in hints if h.box is None]
        found_boxes = _timed(meta, "grounding", lambda: stages.grounder.ground(frames[0], need)) if need else []
        by_phrase = dict(zip(need, found_boxes))
        subjects = []
        for h in hints:
            if h.box is not None:
                subjects.append({"phrase": h.phrase, "box": list(h.box), "box_score": None, "box_source": "captions"})
            elif by_phrase.get(h.phrase) is not None:
                box, score = by_phrase[h.phrase]
                subjects.append({"phrase": h.phrase, "box": [round(float(v), 1) for v in box],
                                 "box_score": round(float(score), 4), "box_source": stages.grounder.name})  # fmt: skip
            else:
                dropped_subjects.append({"phrase": h.phrase, "stage": "grounding", "reason": "no box found"})
        if not subjects:
            raise _Drop("grounding", "no subject was found on the annotated frame: "
                                     + ", ".join(repr(h.phrase) for h in hints))  # fmt: skip

        tracks, seg_scores = _timed(meta, "segmentation",
                                    lambda: stages.segmenter.segment(frames, [s["box"] for s in subjects]))  # fmt: skip
        frame_area = frames.shape[1] * frames.shape[2]
        for s, track, score in zip(subjects, tracks, seg_scores):
            s["track"], s["mask_score"] = track, score
            s["mask_fraction"] = round(float(track[0].sum() / frame_area), 5)
            s["track_coverage"] = round(float(np.mean([t.any() for t in track])), 4)
        kept = []
        for s in sorted(subjects, key=lambda s: -s["mask_fraction"]):
            if s["mask_fraction"] < th.min_mask_fraction:
                dropped_subjects.append({"phrase": s["phrase"], "stage": "subjects",
                                         "reason": f"mask area {s['mask_fraction']:.4f} < 1/{round(1 / th.min_mask_fraction)}"})  # fmt: skip
                continue
            twin = next((k for k in kept if mask_iou(k["track"][0], s["track"][0]) > th.dedupe_iou), None)
            if twin is not None:
                dropped_subjects.append({"phrase": s["phrase"], "stage": "subjects",
                                         "reason": f"duplicate of {twin['phrase']!r} (mask IoU > {th.dedupe_iou})"})  # fmt: skip
                continue
            if not s["track"].any(axis=(1, 2)).all():
                # A track that loses the subject would teach "this subject is absent" on those frames.
                lost = int((~s["track"].any(axis=(1, 2))).sum())
                dropped_subjects.append({"phrase": s["phrase"], "stage": "subjects",
                                         "reason": f"mask track empty on {lost} frames"})  # fmt: skip
                continue
            kept.append(s)
        if stages.aesthetic is not None:
            for s in kept:
                img, _ = cutout_on_white(frames[0], s["track"][0])
                s["aes_score"] = round(float(stages.aesthetic.score([img])[0]), 4)
            low = [s for s in kept if s["aes_score"] < th.min_subject_aesthetic]
            dropped_subjects += [{"phrase": s["phrase"], "stage": "subjects",
                                  "reason": f"subject aesthetic {s['aes_score']} < {th.min_subject_aesthetic}"} for s in low]  # fmt: skip
            kept = [s for s in kept if s not in low]
        kept = kept[: th.max_subjects]
        meta["dropped_subjects"] = dropped_subjects
        if not kept:
            raise _Drop("subjects", "no subject passed the mask rules: "
                                    + "; ".join(d["reason"] for d in dropped_subjects[-3:]))  # fmt: skip
        # Subjects in caption order, so the record reads like the caption.
        kept.sort(key=lambda s: cap.text.lower().find(s["phrase"].lower()))
        for s in kept:
            s["faces"] = [f for f in meta.get("faces", []) if _mask_at(s["track"][0], (f[0] + f[2]) / 2, (f[1] + f[3]) / 2)]

        record = _timed(meta, "write", lambda: _write_clip(out, task.clip_id, frames, float(task.info["fps"]),
                                                           cap.text, kept, options, meta))  # fmt: skip
        result["record"] = record
    except _Drop as drop:
        result.update(status="dropped", stage=drop.stage, reason=drop.reason)
    except BadVideoError as err:
        result.update(status="dropped", stage="decode", reason=str(err))
    except Exception as err:  # one broken clip must not stop a million-clip run; the report names it
        result.update(status="failed", stage="error", reason=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc(limit=5))  # fmt: skip
    state = Path(out_dir) / STATE_DIR / ("clips" if result["status"] != "failed" else "failed")
    atomic_write_text(state / f"{task.clip_id}.json", _dump(result))
    return result


def _write_clip(out: Path, clip_id: str, frames: np.ndarray, fps: float, caption: str, subjects: list[dict],
                options: CurateOptions, meta: dict) -> dict:  # fmt: skip
    """Video, masks, references; the record the manifest gets (paths relative to ``out``)."""
    write_video(out / "videos" / f"{clip_id}.mp4", frames, fps=fps, crf=options.crf, pix_fmt="yuv420p")
    arrays = {f"s{j}": s["track"] for j, s in enumerate(subjects)}
    atomic_write_bytes(out / "masks" / f"{clip_id}.npz", npz_bytes(arrays))
    record_subjects = []
    for j, s in enumerate(subjects):
        image, mask = cutout_on_white(frames[0], s["track"][0])
        _write_png(out / "refs" / f"{clip_id}_s{j}.png", image)
        _write_png(out / "refs" / f"{clip_id}_s{j}_mask.png", mask)
        sub_meta = {k: s[k] for k in ("box", "box_score", "box_source", "mask_score", "mask_fraction",
                                      "track_coverage", "faces", "aes_score") if k in s}  # fmt: skip
        sub_meta["ann_frame_idx"] = 0
        record_subjects.append({
            "phrase": s["phrase"],
            "references": [{"image": f"refs/{clip_id}_s{j}.png", "mask": f"refs/{clip_id}_s{j}_mask.png"}],
            "masks": {"npz": f"masks/{clip_id}.npz", "key": f"s{j}"},
            "meta": sub_meta,
        })
    return {"id": clip_id, "video": f"videos/{clip_id}.mp4", "caption": caption, "fps": round(fps, 4),
            "frame_start": 0, "frame_end": int(len(frames)), "subjects": record_subjects, "meta": meta}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Executors


def _run_local(fn: Callable, items: list, workers: int, desc: str, progress: bool) -> Iterable:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="it")
    try:
        if workers <= 1 or len(items) <= 1:  # a pool's start-up costs more than it saves here
            for item in items:
                yield fn(item)
                bar.update()
            return
        import concurrent.futures as cf
        import multiprocessing as mp

        # forkserver, not fork: torch, OpenCV and ONNX Runtime start threads that a fork of this process would copy
        # in a broken state. The server imports the heavy modules once, so each worker starts in milliseconds
        # instead of re-importing torch and diffusers (what spawn costs).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["diasr_diffusers.data.curate.runner", "diasr_diffusers.routing.phrases",
                                    "diffusers.pipelines.wan.pipeline_wan"])  # fmt: skip
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(fn, item) for item in items]
            try:
                for fut in cf.as_completed(futures):
                    yield fut.result()
                    bar.update()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        bar.close()


def _run_ray(fn: Callable, items: list, workers: int, desc: str, progress: bool) -> Iterable:
    """Ray Data: each item is one row, ``fn`` runs in the cluster's workers; the results stream back."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("`executor='ray'` needs Ray Data: pip install 'diasr-diffusers[ray]'") from err
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
    rows = [{"payload": json.dumps(dataclasses.asdict(i) if dataclasses.is_dataclass(i) else i)} for i in items]
    ds = ray.data.from_items(rows).map(_RayCall(fn), concurrency=max(1, workers))
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="it")
    try:
        for row in ds.iter_rows():
            yield json.loads(row["result"])
            bar.update()
    finally:
        bar.close()


class _RayCall:
    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, row: dict) -> dict:
        return {"result": _dump(self.fn(json.loads(row["payload"])))}


class _PlanCall:
    def __init__(self, stages: Stages, state_dir: str) -> None:
        self.stages, self.state_dir = stages, state_dir

    def __call__(self, path: str) -> dict:
        return plan_video(path, self.stages, self.state_dir)


class _ClipCall:
    def __init__(self, stages: Stages, options: CurateOptions, out_dir: str) -> None:
        self.stages, self.options, self.out_dir = stages, options, out_dir

    def __call__(self, task: ClipTask | dict) -> dict:
        if isinstance(task, dict):
            task = ClipTask(**task)
        return process_clip(task, self.stages, self.options, self.out_dir)


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def _check_out(out: Path, fingerprint: str, resume: bool) -> None:
    state = out / STATE_DIR / "state.json"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"`out`: {out} is a file; give a folder for the dataset")
    if state.is_file():
        old = json.loads(state.read_text())
        if old.get("options_fingerprint") != fingerprint and resume:
            raise ValueError(
                f"`out`: {out} was curated with other options (fingerprint {old.get('options_fingerprint')} != "
                f"{fingerprint}); finished clips would mix two settings. Use a new folder, or re-apply thresholds "
                "from each record's meta"
            )
        return
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"`out`: {out} is not empty and was not written by `diasr curate`; refusing to write into it "
            "(nothing a user wrote is overwritten). Give a new or empty folder"
        )


def curate(
    videos: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    stages: Stages | None = None,
    options: CurateOptions | None = None,
    workers: int = 1,
    executor: str = "process",
    progress: bool = True,
) -> dict:
    """Curate raw videos into a MuSA manifest at ``out/manifest.jsonl`` (+ ``videos/``, ``masks/``, ``refs/``).

    Args:
        videos: video files and/or folders (searched recursively).
        out: dataset folder; must be new, empty, or an earlier ``curate`` output with the same options (then
            finished clips are skipped).
        stages: stage implementations (default: the offline ones; a captioner must be given).
        options: thresholds and analysis options.
        workers: parallel workers (processes, or Ray tasks with ``executor="ray"``).
        executor: ``"process"`` (``concurrent.futures`` on this machine) or ``"ray"`` (Ray Data on the cluster
            ``RAY_ADDRESS`` names, or a local one).
        progress: tqdm progress bars.

    Returns:
        The report (also written to ``out/report.json``, ``out/report.md`` and ``out/report_*.png``).

    Example::

        from diasr_diffusers.data.curate import CaptionsFile, Stages, curate
        curate(["raw/"], "dataset/", stages=Stages(captioner=CaptionsFile("captions.jsonl")), workers=4)
    """
    from .report import build_report

    stages = stages if stages is not None else Stages()
    options = options if options is not None else CurateOptions()
    if executor not in ("process", "ray"):
        raise ValueError(f"`executor` must be 'process' or 'ray', got {executor!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1, got {workers!r}")
    paths = find_videos(videos)
    if not paths:
        raise ValueError(f"`videos`: no video files found in {list(map(str, videos))} (extensions {VIDEO_EXTENSIONS})")
    out = Path(out).expanduser().resolve()
    fingerprint = options.fingerprint()
    _check_out(out, fingerprint, resume=True)
    state_dir = out / STATE_DIR
    atomic_write_text(state_dir / "state.json", _dump({"options_fingerprint": fingerprint,
                                                       "options": dataclasses.asdict(options)}))  # fmt: skip
    run = _run_ray if executor == "ray" else _run_local
    t0 = time.perf_counter()
    plans = list(run(_PlanCall(stages, str(state_dir)), [str(p) for p in paths], workers, "shots", progress))
    plans.sort(key=lambda p: p["video"])
    tasks, early = [], []
    for plan in plans:
        if plan["error"]:
            early.append({"clip_id": plan["video_id"], "status": "dropped", "stage": "decode",
                          "reason": plan["error"], "meta": {"source": {"video": plan["video"]}}})  # fmt: skip
            continue
        info = VideoInfo(**plan["info"])
        windows = options.metadata.windows(info, [tuple(s) for s in plan["shots"]])
        for n, (shot, start, end) in enumerate(windows):
            clip_id = f"{plan['video_id']}_s{shot:03d}_{start:06d}"
            meta, reason = options.metadata.decide(info, start, end)
            if reason is None and options.max_clips_per_video is not None and n >= options.max_clips_per_video:
                reason = f"limit: max_clips_per_video {options.max_clips_per_video}"
            if reason is not None:
                meta["source"] = {"video": plan["video"], "shot": shot, "frame_start": start, "frame_end": end}
                early.append({"clip_id": clip_id, "status": "dropped", "stage": "metadata", "reason": reason,
                              "meta": meta})  # fmt: skip
            else:
                tasks.append(ClipTask(clip_id, plan["video"], Path(plan["video"]).name, shot, start, end, plan["info"]))
    done_dir = state_dir / "clips"
    todo = [t for t in tasks if not (done_dir / f"{t.clip_id}.json").is_file()]
    plan_seconds = time.perf_counter() - t0
    list(run(_ClipCall(stages, options, str(out)), todo, workers, "clips", progress))
    results = early + [json.loads((done_dir / f"{t.clip_id}.json").read_text()) for t in tasks
                       if (done_dir / f"{t.clip_id}.json").is_file()]  # fmt: skip
    results += [json.loads((state_dir / "failed" / f"{t.clip_id}.json").read_text()) for t in tasks
                if not (done_dir / f"{t.clip_id}.json").is_file() and (state_dir / "failed" / f"{t.clip_id}.json").is_file()]  # fmt: skip
    records = [r["record"] for r in sorted(results, key=lambda r: r["clip_id"]) if r["status"] == "kept"]
    atomic_write_text(out / MANIFEST_NAME, "".join(_dump(r) + "\n" for r in records))
    return build_report(out, plans, results, stages, options, skipped=len(tasks) - len(todo),
                        seconds={"plan": plan_seconds, "total": time.perf_counter() - t0})  # fmt: skip
