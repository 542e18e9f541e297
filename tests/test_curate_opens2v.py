"""`diasr import-opens2v` on a fixture written in the exact published OpenS2V-5M layout (DATA_PIPELINE.md §1.2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ijson", reason="the curate extra (ijson) is not installed")
from pycocotools import mask as mask_utils  # noqa: E402

from diasr_diffusers.cli import main  # noqa: E402
from diasr_diffusers.data import validate_manifest  # noqa: E402
from diasr_diffusers.data._io import write_video  # noqa: E402
from diasr_diffusers.data.curate.opens2v import import_opens2v  # noqa: E402

H, W = 72, 112  # original size; the crop removes a 8 px subtitle band at the bottom and 16 px on the left
CROP = [16, 112, 0, 64]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.array(mask[:, :, None], order="F", dtype="uint8"))[0]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("utf-8"), "score": [0.98]}


def _video(path: Path, frames: int = 12) -> None:
    rng = np.random.default_rng(0)
    video = np.repeat(rng.integers(60, 120, (1, H, W, 3), dtype=np.uint8), frames, 0)
    for t in range(frames):
        video[t, 10:50, 20 + 2 * t : 60 + 2 * t] = (220, 40, 40)
        video[t, 10:50:4, 20 + 2 * t : 60 + 2 * t] = (250, 250, 0)
        video[t, 30:60, 80:108] = (40, 60, 220)
    write_video(path, video, fps=8)


def _record(path: str, caption: str, extra: dict | None = None) -> dict:
    ch, cw = CROP[3] - CROP[2], CROP[1] - CROP[0]
    red = np.zeros((ch, cw), bool)
    red[10:50, 4 + 4 : 44 + 4] = True  # frame 2 (ann_frame_idx) in cropped coordinates: x 24..64 -> 8..48
    red_twin = red.copy()
    red_twin[10:12] = False  # the same person found under a second tag: IoU > 0.8
    blue = np.zeros((ch, cw), bool)
    blue[30:60, 64:92] = True
    tiny = np.zeros((ch, cw), bool)
    tiny[0:4, 0:4] = True  # below 1/32 of the frame
    dets = [("red box", red, 5.1), ("red box", red_twin, 5.0), ("blue ball", blue, 4.9), ("lamp", tiny, 6.0)]
    return {
        "metadata": {"cut": [0, 12], "crop": CROP, "tech": 2.1, "motion": 0.012, "fps": 8.0, "num_frames": 12,
                     "resolution": {"height": H, "width": W}, "path": path, "aesthetic": 5.07, "face_cut": [2, 12],
                     "face_cap_qwen": caption},
        "word_tags": {"background": ["grey wall"], "subject": ["red box"], "object": ["blue ball", "lamp"],
                      "pre_define": ["person", "human head"]},
        "annotation": {
            "ann_frame_data": {
                "ann_frame_idx": 2,
                "annotations": [{"class_name": n, "bbox": [1.0, 2.0, 30.0, 40.0], "gme_score": 0.33, "aes_score": a}
                                for n, _, a in dets],
                "box_format": "xyxy", "img_width": cw, "img_height": ch,
                "foreground_ase_score": 4.9, "background_ase_score": 4.5,
            },
            "mask_map": {str(i + 1): {"class_name": n} for i, (n, _, _) in enumerate(dets)},
            "mask_annotation": {"2": {str(i + 1): _rle(m) for i, (_, m, _) in enumerate(dets)}},
        },
        **(extra or {}),
    }  # fmt: skip


@pytest.fixture()
def fixture(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "Videos"
    root.mkdir()
    _video(root / "gm1_part2.mp4")
    _video(root / "gm2_part2.mp4")
    data = {
        "gm1_part2_step1-0-12_step2-0-12_step3_step4_step5": _record(
            "gm1_part2.mp4", "A red box slides towards a blue ball in front of a grey wall."),
        "gm2_part2_step1-0-12_step2-0-12_step3_step4_step5": _record(
            "gm2_part2.mp4", "The red box rests near the blue ball.", extra={"new_field": 1}),
        "gm3_part2_step1": _record("missing.mp4", "A red box."),
        "gm4_part2_step1": _record("gm1_part2.mp4", "Nothing named here at all."),
    }  # fmt: skip
    (tmp_path / "total_part1.json").write_text(json.dumps(data))
    return tmp_path / "total_part1.json", root


def test_import_fixture(fixture, tmp_path):
    json_path, root = fixture
    pairs = tmp_path / "cross_video_pairs.json"
    pairs.write_text(json.dumps({"0": [{
        "cur_id": "total_part1/gm1_part2_step1-0-12_step2-0-12_step3_step4_step5", "cur_class_id": "1",
        "aft_id": "total_part1/gm2_part2_step1-0-12_step2-0-12_step3_step4_step5", "aft_class_id": "1",
        "cur_class_name": "red box", "aft_class_name": "red box", "text_similarity": 1.0, "image_similarity": 0.9,
        "cur_frame_idx": 2, "aft_frame_idx": 2}]}))  # fmt: skip
    report = import_opens2v(json_path, root, tmp_path / "ds", pairs=pairs, progress=False)
    by_key = {r["key"][:3]: r for r in report["results"]}
    assert report["kept"] == 2 and report["extra_references"] == 1
    assert "missing.mp4" in by_key["gm3"]["reason"]
    assert "does not occur in the caption" in by_key["gm4"]["reason"]
    assert validate_manifest(tmp_path / "ds").ok
    first, second = [json.loads(line) for line in (tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()]
    # Duplicate "red box" deduplicated (IoU > 0.8), the tiny "lamp" dropped (< 1/32), phrases in caption order.
    assert [s["phrase"] for s in first["subjects"]] == ["red box", "blue ball"]
    reasons = {d["tag"]: d["reason"] for d in first["meta"]["dropped_subjects"]}
    assert "duplicate of mask 1" in reasons["red box"] and "1/32" in reasons["lamp"]
    assert first["frame_end"] == 10 and first["meta"]["crop"] == CROP and "propagated" in first["meta"]["mask_source"]
    assert second["meta"]["unknown_keys"] == ["new_field"]
    masks = np.load(tmp_path / "ds" / "masks" / f"{first['id']}.npz")
    red = masks["s0"]
    assert red.shape == (10, 64, 96) and red[0, 10:50, 8:48].mean() > 0.99  # RLE decoded in the cropped frame
    # Propagation follows the box rightwards (2 px/frame in the source).
    xs = [np.nonzero(red[t].any(0))[0].mean() for t in (0, 9)]
    assert 12 < xs[1] - xs[0] < 24
    refs = first["subjects"][0]["references"]
    assert len(refs) == 2 and "gm2" in refs[1]["image"]  # the Nexus pair's reference from the other clip


def test_truncated_json_keeps_what_came_before(fixture, tmp_path, capsys):
    json_path, root = fixture
    text = json_path.read_text()
    cut = text.index('"gm2_part2')
    (tmp_path / "broken.json").write_text(text[: cut + 200])
    report = import_opens2v(tmp_path / "broken.json", root, tmp_path / "ds", progress=False)
    assert report["kept"] == 1 and "ends early" in report["stream_error"]
    assert "Stream stopped" in (tmp_path / "ds" / "report.md").read_text()
    assert main(["import-opens2v", str(json_path), "--videos-root", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2  # fmt: skip
    assert "--videos-root" in capsys.readouterr().err
