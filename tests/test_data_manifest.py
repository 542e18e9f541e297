import copy
import json

import numpy as np
import pytest
from _data_fixtures import square_clip, write_jsonl
from PIL import Image

from diasr_diffusers.data import load_manifest, validate_manifest
from diasr_diffusers.data._io import npz_bytes


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    record = square_clip(root)
    # The same masks as a PNG folder and as COCO RLE, to check every mask kind.
    masks = np.load(root / "clip_masks.npz")["red"]
    (root / "red_png").mkdir()
    for t, m in enumerate(masks):
        Image.fromarray(m.astype(np.uint8) * 255).save(root / "red_png" / f"{t}.png")
    from pycocotools import mask as mask_utils

    rle = []
    for m in masks:
        enc = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle.append({"size": list(enc["size"]), "counts": enc["counts"].decode("ascii")})
    (root / "rle.json").write_text(json.dumps(rle))
    (root / "bad_size.npz").write_bytes(npz_bytes({"m": np.ones((9, 32, 32), dtype=bool)}))
    (root / "empty.npz").write_bytes(npz_bytes({"m": np.zeros((9, 64, 96), dtype=bool)}))
    (root / "short.npz").write_bytes(npz_bytes({"m": masks[:4]}))
    return root, record, rle


def _variant(record, **changes):
    rec = copy.deepcopy(record)
    for path, value in changes.items():
        target = rec
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[int(k)] if k.isdigit() else target[k]
        last = keys[-1]
        if value is _DELETE:
            del target[last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return rec


_DELETE = object()


def test_good_manifest_all_mask_kinds(clip_dir):
    root, record, rle = clip_dir
    png = _variant(record, id="png", subjects__0__masks={"png_dir": "red_png"})
    coco = _variant(record, id="coco", subjects__0__masks={"rle": rle})
    coco_file = _variant(record, id="coco_file", subjects__0__masks={"rle": "rle.json"})
    # Uncompressed RLE: column-major run lengths starting with a background run.
    flat = np.load(root / "clip_masks.npz")["red"][0].flatten(order="F").astype(np.int8)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, flat, -1]) != 0)).tolist()
    uncompressed = [{"size": [64, 96], "counts": runs}] * 9
    raw = _variant(record, id="raw", subjects__0__masks={"rle": uncompressed})
    path = write_jsonl(root / "good.jsonl", [record, "", png, coco, coco_file, raw])
    report = validate_manifest(path)
    assert report.ok, report.format()
    assert report.num_records == 5 and len(report.records) == 5
    assert [r.line for r in report.records] == [1, 3, 4, 5, 6]
    first = report.records[0]
    assert first.num_video_frames == 9 and first.video_size == (64, 96)
    assert first.video == root / "clip.mp4"  # relative to the manifest's folder
    # The three mask kinds decode to the same masks.
    expected = np.load(root / "clip_masks.npz")["red"]
    for rec in report.records:
        np.testing.assert_array_equal(rec.subjects[0].masks.load(), expected)
    np.testing.assert_array_equal(report.records[1].subjects[0].masks.load([2, 0]), expected[[2, 0]])


def test_broken_manifest_reports_every_bad_record_with_its_line(clip_dir):
    root, record, _ = clip_dir
    lines = [
        record,  # 1 good
        '{"video": "clip.mp4", "caption": ',  # 2 malformed JSON
        _variant(record, video="missing.mp4"),  # 3 missing video
        _variant(record, subjects__1__phrase="a green circle"),  # 4 phrase not in caption
        _variant(record, subjects__0__masks={"npz": "bad_size.npz"}),  # 5 mask size != video size
        _variant(record, subjects__1__masks={"npz": "empty.npz"}),  # 6 empty mask track
        _variant(record, colour="red"),  # 7 unknown key
        _variant(record, subjects__1__references=["nope.png"]),  # 8 missing reference
        _variant(record, subjects__0__masks={"npz": "short.npz"}),  # 9 mask track shorter than the clip
        _variant(record, caption=_DELETE),  # 10 missing required key
        _variant(record, subjects__0__masks={"npz": "clip_masks.npz", "key": "red", "png_dir": "red_png"}),  # 11
        _variant(record, frame_start=4, frame_end=2),  # 12 empty frame range
        _variant(record, subjects__0__masks={"npz": "clip_masks.npz", "key": "nosuch"}),  # 13 missing npz key
        _variant(record, subjects__1__phrase="A red square"),  # 14 duplicate phrase (case-insensitive)
        _variant(record, id="clip_15"),  # 15 good
    ]
    path = write_jsonl(root / "broken.jsonl", lines)
    report = validate_manifest(path)
    assert not report.ok
    assert report.num_records == 15
    assert report.bad_lines == list(range(2, 15))
    assert [r.line for r in report.records] == [1, 15]
    expect = {
        2: "malformed JSON",
        3: "missing video file",
        4: "does not occur in the caption",
        5: "mask size 32x32 != video size 64x96",
        6: "empty mask track",
        7: "unknown keys ['colour']",
        8: "missing file",
        9: "mask track has 4 frames",
        10: "missing required key 'caption'",
        11: "exactly one of",
        12: "empty frame range",
        13: "has no array 'nosuch'",
        14: "used by another subject",
    }
    for line, words in expect.items():
        reasons = report.reasons(line)
        assert any(words in r for r in reasons), (line, reasons)
    text = report.format()
    assert "13 bad" in text and "line 8 (clip): subject 1" in text

    loaded = load_manifest(path)
    assert len(loaded.records) == 2 and loaded.num_skipped == 13
    with pytest.raises(ValueError, match="line 5"):
        load_manifest(path, skip_invalid=False)


def test_quick_validation_checks_files_but_not_media(clip_dir):
    root, record, _ = clip_dir
    path = write_jsonl(
        root / "quick.jsonl",
        [_variant(record, subjects__1__masks={"npz": "empty.npz"}), _variant(record, video="missing.mp4")],
    )
    quick = validate_manifest(path, check_media=False)
    assert quick.bad_lines == [2]
    full = validate_manifest(path, num_workers=2)
    assert full.bad_lines == [1, 2]


def test_missing_manifest_and_unreadable_video(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="`path`"):
        validate_manifest(tmp_path / "nope.jsonl")
    root, record, _ = clip_dir
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    rec = json.loads(json.dumps(record))
    rec["video"] = str(tmp_path / "junk.mp4")
    for s in rec["subjects"]:
        s["references"] = [str(root / "clip_blue.png")]
        s["masks"]["npz"] = str(root / "clip_masks.npz")
    report = validate_manifest(write_jsonl(tmp_path / "m.jsonl", [rec]), allow_outside_root=True)
    assert report.bad_lines == [1]
    reason = report.reasons(1)[0]
    assert "unreadable video" in reason
    # Regression: the reason carried ffmpeg's whole banner and build configuration over ~30 lines.
    assert "\n" not in reason and "configuration:" not in reason and len(reason) < 400, reason
    assert "Invalid data found" in reason


def test_non_utf8_line_is_one_bad_record(clip_dir):
    # Regression: one stray byte raised UnicodeDecodeError for the whole manifest (validate-data and training).
    root, record, _ = clip_dir
    good = json.dumps(record).encode()
    bad = json.dumps(_variant(record, id="latin1")).replace("grey", "gr\\u00e9y").encode().replace(b"\\u00e9", b"\xe9")
    path = root / "latin1.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n")
    report = validate_manifest(path, check_media=False)
    assert report.bad_lines == [2] and [r.line for r in report.records] == [1]
    assert "not valid UTF-8 (byte 0xe9" in report.reasons(2)[0]
    assert load_manifest(path, check_media=False).num_skipped == 1


def test_folder_duplicate_ids_and_deep_json(clip_dir, tmp_path):
    root, record, _ = clip_dir
    folder = tmp_path / "ds"
    folder.mkdir()
    # Regression: a folder was "does not exist" for validate-data while training accepted it.
    with pytest.raises(FileNotFoundError, match="holds no manifest.jsonl"):
        validate_manifest(folder)
    (folder / "manifest.jsonl").write_text("[" * 100000 + "\n")
    report = validate_manifest(folder, check_media=False)
    assert report.path == folder / "manifest.jsonl" and "nested too deeply" in report.reasons(1)[0]
    # Regression: two records with one id were both accepted (the cache and eval results are keyed by id).
    path = write_jsonl(root / "dup.jsonl", [record, _variant(record, id="other"), record])
    report = validate_manifest(path, check_media=False)
    assert report.bad_lines == [3] and "duplicate id 'clip' (first used on line 1)" in report.reasons(3)[0]


def test_paths_are_confined_to_the_dataset_root(clip_dir, tmp_path):
    # Regression: `../` and absolute paths were opened as given (ffmpeg probed /etc/passwd).
    root, record, _ = clip_dir
    ds = tmp_path / "ds"
    ds.mkdir()
    outside = tmp_path / "outside.mp4"
    outside.write_bytes((root / "clip.mp4").read_bytes())
    (ds / "link.mp4").symlink_to(outside)
    rec = _variant(record, video=str(root / "clip.mp4"))
    for s in rec["subjects"]:
        s["references"] = [str(root / "clip_blue.png")]
        s["masks"]["npz"] = str(root / "clip_masks.npz")
    lines = [
        _variant(record, id="up", video="../outside.mp4"),
        _variant(record, id="etc", video="/etc/passwd"),
        _variant(record, id="link", video="link.mp4"),
        _variant(rec, id="abs"),
    ]
    path = write_jsonl(ds / "manifest.jsonl", lines)
    report = validate_manifest(path, check_media=False)
    assert report.bad_lines == [1, 2, 3, 4]
    for line in (1, 2, 3):
        assert "leads outside the dataset root" in report.reasons(line)[0], report.reasons(line)
    assert "allow_outside_root=True" in report.reasons(2)[0]
    assert len(report.reasons(4)) == 5  # the video, both references and both mask files
    opted_in = validate_manifest(path, check_media=False, allow_outside_root=True)
    assert [r.line for r in opted_in.records] == [4]  # lines 1-3 keep their other problem: references not in ds/
    assert not any("outside" in p.reason for p in opted_in.problems)


def test_empty_manifest_is_not_ok(tmp_path):
    # Regression: an empty (or blank-only) manifest validated as "0 records, 0 bad" with exit code 0.
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n  \n")
    report = validate_manifest(tmp_path, check_media=False)
    assert not report.ok and "holds no records" in report.format()
    with pytest.raises(ValueError, match="invalid manifest"):
        load_manifest(path, skip_invalid=False)
