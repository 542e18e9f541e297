"""Shot splitting with PySceneDetect's ``ContentDetector`` (the setting of OpenS2V's stage-1 scripts).

``huggingface/video-dataset-scripts`` (``video_processing/scene_split.py``), which OpenS2V-Nexus' ``data_process``
points to for stage 1, runs ``ContentDetector(threshold=27, min_scene_len=15)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .frames import BadVideoError

#: ``ContentDetector`` defaults used by video-dataset-scripts (``scene_split.py:4-5``).
SHOT_THRESHOLD = 27.0
SHOT_MIN_FRAMES = 15


@dataclass
class ShotDetector:
    """Cut a video into shots: ``detect(path, num_frames) -> [(start, end), ...]`` (end exclusive, covering the video).

    Args:
        threshold: ``ContentDetector`` threshold on the weighted HSV/edge frame difference (27).
        min_scene_len: shortest shot in frames (15).

    Example::

        ShotDetector().detect("Megamind.avi", 270)   # [(0, 99), (99, 155), ...]
    """

    threshold: float = SHOT_THRESHOLD
    min_scene_len: int = SHOT_MIN_FRAMES
    name: str = "pyscenedetect-content"

    def detect(self, path: str | os.PathLike, num_frames: int) -> list[tuple[int, int]]:
        try:
            from scenedetect import ContentDetector, SceneManager, open_video
        except ImportError as err:
            raise ImportError(
                "shot splitting needs PySceneDetect: pip install scenedetect-headless (or 'diasr-diffusers[curate]')"
            ) from err
        try:
            video = open_video(os.fspath(path))
            manager = SceneManager()
            manager.add_detector(ContentDetector(threshold=self.threshold, min_scene_len=self.min_scene_len))
            manager.detect_scenes(video, show_progress=False)
            scenes = manager.get_scene_list(start_in_scene=True)
        except Exception as err:  # PySceneDetect raises its own VideoOpenFailure and OpenCV errors
            raise BadVideoError(f"shot detection failed ({type(err).__name__}: {err})") from None
        def frame(tc) -> int:  # `frame_num` since PySceneDetect 0.7; `get_frames()` before
            return int(tc.frame_num if hasattr(tc, "frame_num") else tc.get_frames())

        cuts = [(frame(s), frame(e)) for s, e in scenes]
        # PySceneDetect decodes with OpenCV, whose frame count can differ from ffmpeg's by a frame or two (AVI index);
        # clamp to ffmpeg's exact count, which is what the clip writer will decode.
        shots = [(min(s, num_frames), min(e, num_frames)) for s, e in cuts]
        shots = [(s, e) for s, e in shots if e > s]
        if not shots:
            shots = [(0, num_frames)]
        elif shots[-1][1] < num_frames:
            shots[-1] = (shots[-1][0], num_frames)
        return shots
