"""Hub-model stages, built on ``transformers`` classes and loaded from a Hub id or a local folder (``from_pretrained``),
the same code on a laptop and a GPU node. Each fills the same slot as an offline stage (see :class:`Stages`).

- :class:`ClipAesthetic`: LAION aesthetic predictor = ``CLIPVisionModelWithProjection`` (``openai/clip-vit-large-patch14``)
  image embeddings, L2-normalised, into the 768-1024-128-64-16-1 MLP (video-dataset-scripts
  ``modules/aesthetic_laion.py``; weights ``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``, which must be
  converted once to safetensors: this project never unpickles, see ``docs/data.md``).
- :class:`ImageClassifierWatermark`: any ``AutoModelForImageClassification`` checkpoint with a watermark label.
- :class:`GroundingDinoGrounder`: ``GroundingDinoForObjectDetection`` (``IDEA-Research/grounding-dino-tiny`` or
  ``-base``), OpenS2V's box/text thresholds 0.25/0.25 and its ``"tag1. tag2."`` prompt.
- :class:`Sam2VideoSegmenter`: ``Sam2VideoModel`` (``facebook/sam2.1-hiera-large``, the SAM 2.1 OpenS2V uses), box
  prompts on frame 0, ``propagate_in_video_iterator`` over the clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _device(device: str):
    import torch

    return torch.device(device)


def laion_aesthetic_mlp(dim: int = 768):
    """The LAION aesthetic MLP (``improved-aesthetic-predictor``); state-dict keys ``layers.{0,2,4,6,7}.*``."""
    from torch import nn

    class AestheticMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
            )  # fmt: skip

        def forward(self, x):
            return self.layers(x)

    return AestheticMLP()


@dataclass
class ClipAesthetic:
    """``score(images) -> [float]``: LAION aesthetic score (about 1-10) of each RGB uint8 image.

    Args:
        clip: Hub id or folder of a CLIP model (its processor config alongside).
        mlp: a ``.safetensors`` file with the MLP's ``layers.*`` weights.
    """

    clip: str = "openai/clip-vit-large-patch14"
    mlp: str | None = None
    device: str = "cpu"
    name: str = "clip-laion-aesthetic"
    _parts: Any = field(default=None, repr=False)

    def _load(self):
        if self._parts is None:
            from safetensors.torch import load_file
            from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

            if self.mlp is None:
                raise ValueError("`mlp`: give the LAION aesthetic MLP weights as a .safetensors file (see docs/data.md)")
            model = CLIPVisionModelWithProjection.from_pretrained(self.clip).to(_device(self.device)).eval()
            processor = AutoImageProcessor.from_pretrained(self.clip)
            head = laion_aesthetic_mlp(model.config.projection_dim)
            head.load_state_dict(load_file(self.mlp))
            self._parts = (model, processor, head.to(_device(self.device)).eval())
        return self._parts

    def score(self, images: list[np.ndarray]) -> list[float]:
        import torch

        model, processor, head = self._load()
        inputs = processor(images=list(images), return_tensors="pt").to(_device(self.device))
        with torch.no_grad():
            emb = model(**inputs).image_embeds
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return [float(v) for v in head(emb.float()).squeeze(-1).cpu()]


@dataclass
class ImageClassifierWatermark:
    """``score(images) -> [p(watermark)]`` from an image classifier whose labels include ``label``."""

    model: str = ""
    label: str = "watermark"
    device: str = "cpu"
    name: str = "image-classifier-watermark"
    _parts: Any = field(default=None, repr=False)

    def _load(self):
        if self._parts is None:
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            model = AutoModelForImageClassification.from_pretrained(self.model).to(_device(self.device)).eval()
            labels = {v.lower(): int(k) for k, v in model.config.id2label.items()}
            if self.label.lower() not in labels:
                raise ValueError(f"`label`: {self.model} has no label {self.label!r} (labels: {sorted(labels)})")
            self._parts = (model, AutoImageProcessor.from_pretrained(self.model), labels[self.label.lower()])
        return self._parts

    def score(self, images: list[np.ndarray]) -> list[float]:
        import torch

        model, processor, index = self._load()
        inputs = processor(images=list(images), return_tensors="pt").to(_device(self.device))
        with torch.no_grad():
            probs = model(**inputs).logits.float().softmax(-1)[:, index]
        return [float(p) for p in probs.cpu()]


@dataclass
class GroundingDinoGrounder:
    """``ground(frame, phrases) -> [(box, score) | None per phrase]`` with GroundingDINO.

    All phrases go into one prompt, lower-cased and joined with ``". "`` (as OpenS2V's step 5-2); each phrase gets
    the highest-scoring box whose predicted label shares the most words with it.
    """

    model: str = "IDEA-Research/grounding-dino-tiny"
    box_threshold: float = 0.25
    text_threshold: float = 0.25
    device: str = "cpu"
    name: str = "grounding-dino"
    _parts: Any = field(default=None, repr=False)

    def _load(self):
        if self._parts is None:
            from transformers import AutoProcessor, GroundingDinoForObjectDetection

            model = GroundingDinoForObjectDetection.from_pretrained(self.model).to(_device(self.device)).eval()
            self._parts = (model, AutoProcessor.from_pretrained(self.model))
        return self._parts

    def ground(self, frame: np.ndarray, phrases: list[str]) -> list[tuple[tuple[float, ...], float] | None]:
        import torch
        from PIL import Image

        if not phrases:
            return []
        model, processor = self._load()
        text = ". ".join(p.lower().strip() for p in phrases) + "."
        inputs = processor(images=Image.fromarray(frame), text=text, return_tensors="pt").to(_device(self.device))
        with torch.no_grad():
            outputs = model(**inputs)
        result = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[frame.shape[:2]],
        )[0]  # fmt: skip
        best: list[tuple[tuple[float, ...], float] | None] = [None] * len(phrases)
        words = [set(p.lower().split()) for p in phrases]
        for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), result["text_labels"]):
            # A label is the run of prompt tokens above text_threshold: give the box to the phrase sharing the
            # most words with it (the first such phrase on a tie).
            overlap = [len(w & set(str(label).lower().split())) for w in words]
            i = int(np.argmax(overlap))
            if overlap[i] and (best[i] is None or score > best[i][1]):
                best[i] = (tuple(float(v) for v in box), float(score))
        return best


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Sam2VideoSegmenter:
    """``segment(frames, boxes) -> (masks (N, F, H, W) bool, scores)``: SAM 2.1 video, box prompts on frame 0.

    With torchvision installed the checkpoint's own ``Sam2VideoProcessor`` prepares the video and the boxes
    (``init_video_session``, ``add_inputs_to_inference_session``, ``post_process_masks``). Without it (its video
    processor needs torchvision) the same steps run here with the public session API: frames resized to the model's
    square ``image_size``, scaled to [0, 1] and normalised with ImageNet mean/std (SAM 2's preprocessing), boxes as
    corner points with labels 2/3 in that square, low-resolution logits resized to the frame and thresholded at 0.
    ``scores``: mean mask probability inside each frame-0 mask.
    """

    model: str = "facebook/sam2.1-hiera-large"
    device: str = "cpu"
    name: str = "sam2-video"
    _parts: Any = field(default=None, repr=False)

    def _load(self):
        if self._parts is None:
            from transformers import Sam2VideoModel

            model = Sam2VideoModel.from_pretrained(self.model).to(_device(self.device)).eval()
            try:
                from transformers import Sam2VideoProcessor

                processor = Sam2VideoProcessor.from_pretrained(self.model)
            except (ImportError, OSError, ValueError):  # no torchvision, or a checkpoint saved without a processor
                processor = None
            self._parts = (model, processor)
        return self._parts

    def _session(self, model, processor, frames: np.ndarray, boxes: list):
        import torch
        import torch.nn.functional as F

        h, w = frames.shape[1:3]
        ids = list(range(1, len(boxes) + 1))
        if processor is not None:
            session = processor.init_video_session(video=list(frames), inference_device=self.device)
            processor.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=ids,
                                                      input_boxes=[[list(map(float, b)) for b in boxes]])  # fmt: skip
            return session
        size = int(model.config.image_size)
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        video = F.interpolate(video, size=(size, size), mode="bilinear", align_corners=False)
        video = (video - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        from transformers import Sam2VideoInferenceSession

        session = Sam2VideoInferenceSession(video=video, video_height=h, video_width=w,
                                            inference_device=self.device, dtype=torch.float32)  # fmt: skip
        for obj_id, box in zip(ids, boxes):
            idx = session.obj_id_to_idx(obj_id)
            coords = torch.tensor(box, dtype=torch.float32).reshape(1, 1, 2, 2)
            coords[..., 0] *= size / w
            coords[..., 1] *= size / h
            session.add_point_inputs(idx, 0, {"point_coords": coords,
                                              "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32)})  # fmt: skip
            session.remove_mask_inputs(idx, 0)
        session.obj_with_new_inputs = ids
        return session

    def segment(self, frames: np.ndarray, boxes: list) -> tuple[np.ndarray, list]:
        import torch
        import torch.nn.functional as F

        model, processor = self._load()
        f, h, w = frames.shape[:3]
        session = self._session(model, processor, frames, boxes)
        masks = np.zeros((len(boxes), f, h, w), dtype=bool)
        probs0 = None
        with torch.no_grad():
            for out in model.propagate_in_video_iterator(session, start_frame_idx=0):
                logits = out.pred_masks.float()
                if processor is not None:
                    logits = processor.post_process_masks([logits], original_sizes=[[h, w]], binarize=False)[0]
                else:
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                masks[:, out.frame_idx] = (logits[:, 0] > 0).cpu().numpy()
                if out.frame_idx == 0:
                    probs0 = logits[:, 0].sigmoid().cpu().numpy()
        scores = [round(float(p[m].mean()), 4) if m.any() else 0.0 for p, m in zip(probs0, masks[:, 0])]
        return masks, scores


def hub_stages(stages: Any, specs: list[str], device: str = "cpu") -> Any:
    """Fill ``stages`` from ``STAGE=ID`` strings (the CLI's ``--models``): ``aesthetic=MLP.safetensors``,
    ``clip=ID`` (CLIP for the aesthetic MLP), ``watermark=ID``, ``grounding=ID``, ``segmentation=ID``."""
    values = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or key not in ("aesthetic", "clip", "watermark", "grounding", "segmentation"):
            raise ValueError(f"`--models`: expected STAGE=ID with STAGE in aesthetic, clip, watermark, grounding, segmentation; "
                             f"got {spec!r}")  # fmt: skip
        values[key] = value
    if "aesthetic" in values:
        stages.aesthetic = ClipAesthetic(clip=values.get("clip", ClipAesthetic.clip), mlp=values["aesthetic"],
                                         device=device)  # fmt: skip
    if "watermark" in values:
        stages.watermark = ImageClassifierWatermark(model=values["watermark"], device=device)
    if "grounding" in values:
        stages.grounder = GroundingDinoGrounder(model=values["grounding"], device=device)
    if "segmentation" in values:
        stages.segmenter = Sam2VideoSegmenter(model=values["segmentation"], device=device)
    return stages
