"""Curation: raw videos (``diasr curate``) or OpenS2V-5M annotations (``diasr import-opens2v``) -> a MuSA manifest.

One small module per stage, each a class with one method, so a stage can be swapped for another implementation:

====================  ===================================================  ===========================================
stage                 offline default (models inside pip/Debian packages)  Hub model (:mod:`.hub`, same slot)
====================  ===================================================  ===========================================
shots                 :class:`ShotDetector` (PySceneDetect 27/15)           -
metadata              :class:`MetadataFilter` (2-10 s, short side >= 480)   -
motion                :class:`FarnebackMotion` (OpenCV)                     -
ocr                   :class:`RapidOCRText` (PP-OCRv4 ONNX) + crop-away     -
aesthetic             off                                                   ``ClipAesthetic`` (CLIP-L/14 + LAION MLP)
watermark             off                                                   ``LaionWatermark``, ``ImageClassifierWatermark``
caption               :class:`CaptionsFile`                                 ``QwenVLCaptioner`` (Qwen2.5-VL)
faces                 :class:`DlibFaces`                                    -
grounding             :class:`FaceBodyGrounder` (person phrases only)       ``GroundingDinoGrounder``
segmentation          :class:`GrabCutFlowSegmenter`                         ``Sam2VideoSegmenter``
====================  ===================================================  ===========================================

LAION's published pickles become the safetensors the Hub stages load with :mod:`.convert` (``diasr convert-laion``).
See ``docs/data.md``.
"""

from .caption import Caption, CaptionError, CaptionsFile, ClipContext, SubjectHint, parse_caption_answer
from .faces import DlibFaces
from .filters import MetadataFilter
from .frames import BadVideoError, VideoInfo, probe, read_range
from .grounding import FaceBodyGrounder, NoGrounder, names_a_person
from .motion import FarnebackMotion
from .ocr import RapidOCRText, text_area_fraction, text_free_crop
from .references import cutout_on_white
from .runner import ClipTask, CurateOptions, Stages, Thresholds, curate, find_videos, process_clip, video_id
from .segmentation import GrabCutFlowSegmenter
from .shots import ShotDetector

__all__ = [
    "BadVideoError",
    "Caption",
    "CaptionError",
    "CaptionsFile",
    "ClipContext",
    "ClipTask",
    "CurateOptions",
    "DlibFaces",
    "FaceBodyGrounder",
    "FarnebackMotion",
    "GrabCutFlowSegmenter",
    "MetadataFilter",
    "NoGrounder",
    "RapidOCRText",
    "ShotDetector",
    "Stages",
    "SubjectHint",
    "Thresholds",
    "VideoInfo",
    "curate",
    "cutout_on_white",
    "find_videos",
    "names_a_person",
    "parse_caption_answer",
    "probe",
    "process_clip",
    "read_range",
    "text_area_fraction",
    "text_free_crop",
    "video_id",
]
