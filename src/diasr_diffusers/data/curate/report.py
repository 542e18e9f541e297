"""The curation report: kept/dropped counts per filter, every clip's reason, timings and histograms (PNG)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, atomic_write_text

HISTOGRAMS = {
    "duration_s": ("clip duration (s)", lambda r: r["meta"].get("duration_s")),
    "motion": ("motion (mean |Farneback flow|, px/frame at 256 px)", lambda r: r["meta"].get("motion")),
    "text_area": ("OCR text area (fraction of frame)", lambda r: (r["meta"].get("ocr") or {}).get("text_area")),
    "aesthetic": ("aesthetic (LAION MLP on CLIP-L/14)", lambda r: r["meta"].get("aesthetic")),
    "watermark": ("watermark probability", lambda r: r["meta"].get("watermark")),
    "num_subjects": ("subjects per kept clip", lambda r: len(r["record"]["subjects"]) if r.get("record") else None),
}


def funnel(results: list[dict], stages: tuple[str, ...]) -> list[dict]:
    """Per stage, in pipeline order: clips that reached it, were dropped by it, and went on."""
    dropped = Counter(r["stage"] for r in results if r["status"] != "kept")
    rows, remaining = [], len(results)
    for stage in (*stages, "error"):
        n = dropped.get(stage, 0)
        if stage == "error" and not n:
            continue
        rows.append({"stage": stage, "in": remaining, "dropped": n, "kept": remaining - n})
        remaining -= n
    return rows


def _histograms(out: Path, results: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, (label, get) in HISTOGRAMS.items():
        kept = [v for r in results if r["status"] == "kept" and (v := get(r)) is not None]
        dropped = [v for r in results if r["status"] != "kept" and (v := get(r)) is not None]
        if not kept and not dropped:
            continue
        fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
        values = np.asarray(kept + dropped, dtype=float)
        bins = np.histogram_bin_edges(values, bins=min(20, max(5, len(values))))
        ax.hist([kept, dropped], bins=bins, stacked=True, label=["kept", "dropped"], color=["#3a7", "#c55"])
        ax.set_xlabel(label)
        ax.set_ylabel("clips")
        ax.legend()
        fig.tight_layout()
        name = f"report_{key}.png"
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(name)
    return written


def build_report(out: Path, plans: list[dict], results: list[dict], stages: Any, options: Any, *, skipped: int,
                 seconds: dict[str, float]) -> dict:  # fmt: skip
    """Write ``report.json``, ``report.md`` and ``report_*.png`` into ``out``; return the report dict."""
    from .runner import STAGES

    results = sorted(results, key=lambda r: r["clip_id"])
    stage_time: dict[str, list[float]] = {}
    for r in results:
        for stage, t in (r["meta"].get("timing_s") or {}).items():
            stage_time.setdefault(stage, []).append(t)
    report = {
        "videos": len(plans),
        "videos_unreadable": [{"video": p["video"], "reason": p["error"]} for p in plans if p["error"]],
        "shots": sum(len(p["shots"]) for p in plans),
        "clips": len(results),
        "kept": sum(r["status"] == "kept" for r in results),
        "dropped": sum(r["status"] == "dropped" for r in results),
        "failed": sum(r["status"] == "failed" for r in results),
        "reused_from_earlier_run": skipped,
        "funnel": funnel(results, STAGES),
        "stages": stages.names(),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "seconds_per_clip": {k: round(float(np.mean(v)), 4) for k, v in stage_time.items()},
        "clips_detail": [{"clip_id": r["clip_id"], "status": r["status"], "stage": r["stage"], "reason": r["reason"],
                          "source": r["meta"].get("source")} for r in results],  # fmt: skip
    }
    report["histograms"] = _histograms(out, results)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str))
    lines = [
        f"# Curation report: {out}",
        "",
        f"{report['videos']} videos ({len(report['videos_unreadable'])} unreadable), {report['shots']} shots, "
        f"{report['clips']} clips: **{report['kept']} kept**, {report['dropped']} dropped, {report['failed']} failed "
        f"({skipped} reused from an earlier run).",
        "",
        "| stage | in | dropped | kept |",
        "|---|---:|---:|---:|",
        *(f"| {row['stage']} | {row['in']} | {row['dropped']} | {row['kept']} |" for row in report["funnel"]),
        "",
        "| clip | status | stage | reason |",
        "|---|---|---|---|",
        *(f"| {c['clip_id']} | {c['status']} | {c['stage'] or ''} | {(c['reason'] or '').replace('|', '/')} |"
          for c in report["clips_detail"]),  # fmt: skip
        "",
        *(f"![{name}]({name})" for name in report["histograms"]),
    ]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return report
