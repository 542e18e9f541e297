"""Metadata filters (duration, frame rate, resolution) and the clip windows cut from each shot.

Defaults follow OpenS2V-Nexus' high-quality subset ("Step 7" of ``data_process/README.md``): clips of 2-10 s whose
shorter side is at least 480 pixels. No frame-rate threshold is published; ``min_fps`` (default 8) only drops
slide shows and broken headers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .frames import VideoInfo


@dataclass
class MetadataFilter:
    """Cut shots into clip windows and decide on each from metadata alone (no decoding).

    A shot longer than ``max_seconds`` is cut into consecutive windows of ``max_seconds`` (a long static take is
    several training clips, not none); a window, or a shot, shorter than ``min_seconds`` is dropped.
    """

    min_seconds: float = 2.0
    max_seconds: float = 10.0
    min_short_side: int = 480
    min_fps: float = 8.0
    skip_edge_frames: int = 2

    def windows(self, info: VideoInfo, shots: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """``(shot_index, start, end)`` windows; shot boundaries lose ``skip_edge_frames`` on each side (fades and
        the frame a detector places a cut on belong to neither shot)."""
        out = []
        max_len = max(1, int(round(self.max_seconds * info.fps)))
        for k, (start, end) in enumerate(shots):
            s = start + (self.skip_edge_frames if start > 0 else 0)
            e = end - (self.skip_edge_frames if end < info.num_frames else 0)
            if e <= s:
                continue
            while e - s > max_len:
                out.append((k, s, s + max_len))
                s += max_len
            out.append((k, s, e))
        return out

    def decide(self, info: VideoInfo, start: int, end: int) -> tuple[dict, str | None]:
        """``(meta, reason)``: the measured values, and why the window is dropped (None = kept)."""
        seconds = (end - start) / info.fps
        meta = {
            "duration_s": round(seconds, 3),
            "fps": round(info.fps, 3),
            "resolution": {"height": info.height, "width": info.width},
            "short_side": min(info.height, info.width),
        }
        if info.fps < self.min_fps:
            return meta, f"fps: {info.fps:.2f} < min_fps {self.min_fps}"
        if min(info.height, info.width) < self.min_short_side:
            return meta, f"resolution: short side {min(info.height, info.width)} < min_short_side {self.min_short_side}"
        if seconds < self.min_seconds:
            return meta, f"duration: {seconds:.2f} s < min_seconds {self.min_seconds}"
        if seconds > self.max_seconds + 1e-6:
            return meta, f"duration: {seconds:.2f} s > max_seconds {self.max_seconds}"
        return meta, None
