"""``diasr import-opens2v``: OpenS2V-5M annotation JSON -> MuSA manifest, streamed record by record.

The released files are single JSON objects ``{clip_key: record}`` of up to 66 GB; ``ijson.kvitems`` yields one record
at a time, so memory stays flat. Per record (field meanings in ``shared/design/DATA_PIPELINE.md`` §1.2):

- the clip is ``metadata.face_cut`` of ``<videos_root>/<metadata.path>``, cropped to ``metadata.crop``
  (``[s_x, e_x, s_y, e_y]``); boxes and masks are in that cropped frame, so they map 1:1 onto the written clip;
- masks: COCO RLE of **one frame per clip**, ``ann_frame_idx`` (= ``face_cut[0]``). The choice made here (documented
  in ``docs/data.md``): the clip starts at the annotated frame and the masks are **propagated** over every frame by a
  video segmenter (default :class:`GrabCutFlowSegmenter.propagate`, flow-warp); ``meta.mask_source`` records this,
  so nothing downstream mistakes a propagated mask for an annotated one;
- subjects: masks below 1/32 of the frame dropped, duplicates (IoU > 0.8, "person" x3) removed keeping the larger,
  subject ``aes_score`` >= 4.5 (the high-quality subset's rules), then tags become caption phrases greedily by
  aesthetic under the project's phrase rules (whole words, no shared words), at most 6;
- Nexus cross-video pairs (``--pairs``) add the paired clip's cut-out as an extra reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_bytes, atomic_write_text, npz_bytes, write_video
from ..manifest import MANIFEST_NAME, _decode_rle
from .frames import BadVideoError, mask_iou, read_range
from .references import cutout_on_white
from .runner import _dump, _write_png
from .segmentation import GrabCutFlowSegmenter

RECORD_KEYS = {"metadata", "word_tags", "annotation"}


class _Skip(Exception):
    pass


def _convert(key: str, rec: Any, root: Path, out: Path, th: dict, segmenter: Any, refs: dict) -> dict:
    from ...routing.phrases import phrase_problems

    if not isinstance(rec, dict):
        raise _Skip(f"record is a {type(rec).__name__}, not an object")
    meta: dict[str, Any] = {"opens2v_key": key}
    unknown = sorted(set(rec) - RECORD_KEYS)
    if unknown:
        meta["unknown_keys"] = unknown  # newer releases may add fields: keep going, say so
    try:
        md = rec["metadata"]
        start, end = (int(v) for v in md.get("face_cut") or md["cut"])
        sx, ex, sy, ey = (int(round(v)) for v in md["crop"])
        fps, rel, caption = float(md["fps"]), md["path"], md["face_cap_qwen"]
        ann = rec["annotation"]
        frame_data = ann["ann_frame_data"]
        ann_idx = int(frame_data["ann_frame_idx"])
        dets = frame_data["annotations"]
        rles = ann["mask_annotation"][str(ann_idx)]
    except (KeyError, TypeError, ValueError) as err:
        raise _Skip(f"missing or malformed field ({type(err).__name__}: {err})") from None
    meta.update({k: md.get(k) for k in ("cut", "face_cut", "crop", "tech", "motion", "aesthetic", "fps", "path")})
    meta["ann_frame_idx"] = ann_idx
    if not start <= ann_idx < end:
        raise _Skip(f"ann_frame_idx {ann_idx} outside face_cut [{start}, {end})")
    video = root / rel
    try:
        # The clip starts at the annotated frame (= face_cut[0] in every release seen), so its masks are frame 0.
        frames = read_range(video, ann_idx, end)[:, sy:ey, sx:ex]
    except BadVideoError as err:
        raise _Skip(f"{rel}: {err}") from None
    h, w = frames.shape[1:3]
    h2, w2 = h - h % 2, w - w % 2
    subjects = []
    for i, det in enumerate(dets):
        rle = rles.get(str(i + 1))
        if rle is None:
            continue
        if [int(v) for v in rle["size"]] != [h, w]:
            raise _Skip(f"mask {i + 1} size {rle['size']} != cropped frame {h}x{w} (crop {md['crop']})")
        mask = _decode_rle(rle)
        subjects.append({"mask_id": str(i + 1), "tag": str(det.get("class_name", "")).strip(), "mask": mask,
                         "gme_score": det.get("gme_score"), "aes_score": det.get("aes_score"),
                         "sam_score": (rle.get("score") or [None])[0], "bbox": det.get("bbox"),
                         "area": float(mask.mean())})  # fmt: skip
    dropped, kept = [], []
    for s in sorted(subjects, key=lambda s: -s["area"]):
        if s["area"] < th["min_mask_fraction"]:
            dropped.append((s["tag"], f"mask area {s['area']:.4f} < 1/32"))
        elif s["aes_score"] is not None and s["aes_score"] < th["min_subject_aesthetic"]:
            dropped.append((s["tag"], f"aes_score {s['aes_score']:.3f} < {th['min_subject_aesthetic']}"))
        elif (twin := next((k for k in kept if mask_iou(k["mask"], s["mask"]) > th["dedupe_iou"]), None)) is not None:
            dropped.append((s["tag"], f"duplicate of mask {twin['mask_id']} (IoU > {th['dedupe_iou']})"))
        else:
            kept.append(s)
    for s in kept:
        if s["mask"].any():
            img, m = cutout_on_white(frames[0], s["mask"])
            name = f"refs/{key}_m{s['mask_id']}"
            _write_png(out / f"{name}.png", img)
            _write_png(out / f"{name}_mask.png", m)
            refs[(key, s["mask_id"])] = name
    chosen = []
    for s in sorted(kept, key=lambda s: -(s["aes_score"] or 0)):
        problems = phrase_problems(caption, [c["tag"] for c in chosen] + [s["tag"]], what="caption")
        if problems:
            dropped.append((s["tag"], problems[-1]))
        elif len(chosen) < th["max_subjects"]:
            chosen.append(s)
        else:
            dropped.append((s["tag"], f"more than {th['max_subjects']} subjects"))
    meta["dropped_subjects"] = [{"tag": t, "reason": r} for t, r in dropped]
    if not chosen:
        raise _Skip("no subject left: " + "; ".join(f"{t!r}: {r}" for t, r in dropped[:4]))
    chosen.sort(key=lambda s: caption.lower().find(s["tag"].lower()))
    tracks = segmenter.propagate(frames, np.stack([s["mask"] for s in chosen]))
    meta["mask_source"] = f"OpenS2V mask on frame 0 (ann_frame_idx {ann_idx}), propagated by {segmenter.name}"
    write_video(out / "videos" / f"{key}.mp4", frames[:, :h2, :w2], fps=fps, crf=18, pix_fmt="yuv420p")
    atomic_write_bytes(out / "masks" / f"{key}.npz", npz_bytes({f"s{j}": t[:, :h2, :w2] for j, t in enumerate(tracks)}))
    record_subjects = []
    for j, s in enumerate(chosen):
        name = refs[(key, s["mask_id"])]
        record_subjects.append({
            "phrase": s["tag"], "references": [{"image": f"{name}.png", "mask": f"{name}_mask.png"}],
            "masks": {"npz": f"masks/{key}.npz", "key": f"s{j}"},
            "meta": {k: s[k] for k in ("mask_id", "gme_score", "aes_score", "sam_score", "bbox")} | {"ann_frame_idx": 0},
        })  # fmt: skip
    return {"id": key, "video": f"videos/{key}.mp4", "caption": caption, "fps": fps, "frame_start": 0,
            "frame_end": int(len(frames)), "subjects": record_subjects, "meta": meta}  # fmt: skip


def import_opens2v(
    json_path: str | os.PathLike,
    videos_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    pairs: str | os.PathLike | None = None,
    limit: int | None = None,
    min_subject_aesthetic: float = 4.5,
    min_mask_fraction: float = 1 / 32,
    dedupe_iou: float = 0.8,
    max_subjects: int = 6,
    segmenter: Any = None,
    progress: bool = True,
) -> dict:
    """Stream an OpenS2V-5M JSON into ``out/manifest.jsonl``; returns the report (also ``out/report.json``/``.md``).

    A record that cannot be converted is reported with its reason and the run goes on; a truncated file keeps every
    record before the break and reports where it broke.
    """
    try:
        import ijson
    except ImportError as err:
        raise ImportError("import-opens2v streams JSON with ijson: pip install 'diasr-diffusers[curate]'") from err
    from tqdm.auto import tqdm

    json_path, root, out = Path(json_path), Path(videos_root), Path(out)
    if not json_path.is_file():
        raise FileNotFoundError(f"`json_path`: {json_path} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"`videos_root`: {root} is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / ".opens2v").is_dir():
        raise FileExistsError(f"`out`: {out} is not empty and was not written by import-opens2v; give a new folder")
    th = {"min_subject_aesthetic": min_subject_aesthetic, "min_mask_fraction": min_mask_fraction,
          "dedupe_iou": dedupe_iou, "max_subjects": max_subjects}  # fmt: skip
    segmenter = segmenter if segmenter is not None else GrabCutFlowSegmenter()
    (out / ".opens2v").mkdir(parents=True, exist_ok=True)
    records, results, refs, stream_error = [], [], {}, None
    bar = tqdm(desc="opens2v records", disable=not progress, unit="rec")
    with open(json_path, "rb") as f:
        try:
            for n, (key, rec) in enumerate(ijson.kvitems(f, "", use_float=True)):
                if limit is not None and n >= limit:
                    break
                safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)[:120]
                try:
                    record = _convert(safe, rec, root, out, th, segmenter, refs)
                    records.append(record)
                    results.append({"key": key, "status": "kept", "reason": None})
                except _Skip as skip:
                    results.append({"key": key, "status": "dropped", "reason": str(skip)})
                bar.update()
        except ijson.common.IncompleteJSONError as err:
            stream_error = f"JSON ends early or is malformed after {len(results)} records ({err})"
        except ijson.common.JSONError as err:
            stream_error = f"malformed JSON after {len(results)} records ({err})"
    bar.close()
    extra = 0
    if pairs is not None:
        # The pairs file is per cluster and small (kilobytes per cluster); stream it too for symmetry.
        by_id = {r["id"]: r for r in records}
        with open(pairs, "rb") as f:
            for _, cluster in ijson.kvitems(f, "", use_float=True):
                for pair in cluster:
                    cur = pair["cur_id"].split("/")[-1]
                    aft = pair["aft_id"].split("/")[-1]
                    rec = by_id.get(cur)
                    ref = refs.get((aft, str(pair["aft_class_id"])))
                    if rec is None or ref is None:
                        continue
                    for s in rec["subjects"]:
                        if s["meta"]["mask_id"] == str(pair["cur_class_id"]):
                            entry = {"image": f"{ref}.png", "mask": f"{ref}_mask.png"}
                            if entry not in s["references"]:
                                s["references"].append(entry)
                                s["meta"].setdefault("nexus_pairs", []).append(
                                    {"clip": aft, "mask_id": str(pair["aft_class_id"]),
                                     "image_similarity": pair.get("image_similarity"),
                                     "text_similarity": pair.get("text_similarity")})  # fmt: skip
                                extra += 1
    atomic_write_text(out / MANIFEST_NAME, "".join(_dump(r) + "\n" for r in records))
    report = {"records": len(results), "kept": len(records), "dropped": len(results) - len(records),
              "stream_error": stream_error, "extra_references": extra, "results": results}  # fmt: skip
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    lines = [f"# import-opens2v: {json_path}", "", f"{report['records']} records: {report['kept']} kept, "
             f"{report['dropped']} dropped; {extra} cross-video references.", ""]  # fmt: skip
    if stream_error:
        lines += [f"**Stream stopped**: {stream_error}", ""]
    lines += ["| key | status | reason |", "|---|---|---|"]
    lines += [f"| {r['key']} | {r['status']} | {(r['reason'] or '').replace('|', '/')} |" for r in results]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return report
