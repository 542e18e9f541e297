"""Hub-model stages, built on ``transformers`` classes and loaded from a Hub id or a local folder (``from_pretrained``),
the same code on a laptop and a GPU node. Each fills the same slot as an offline stage (see :class:`Stages`).

- :class:`ClipAesthetic`: LAION aesthetic predictor = ``CLIPVisionModelWithProjection`` (``openai/clip-vit-large-patch14``)
  image embeddings, L2-normalised, into the 768-1024-128-64-16-1 MLP (video-dataset-scripts
  ``modules/aesthetic_laion.py``; weights ``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``, which must be
  converted once to safetensors: this project never unpickles, see ``docs/data.md``).
- :class:`ImageClassifierWatermark`: any ``AutoModelForImageClassification`` checkpoint with a watermark label.
- :class:`GroundingDinoGrounder`: ``GroundingDinoForObjectDetection`` (``IDEA-Research/grounding-dino-tiny`` or
  ``-base``), OpenS2V's box/text thresholds 0.25/0.25 and its ``"tag1. tag2."`` prompt.
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


def hub_stages(stages: Any, specs: list[str], device: str = "cpu") -> Any:
    """Fill ``stages`` from ``STAGE=ID`` strings (the CLI's ``--models``): ``aesthetic=MLP.safetensors``,
    ``clip=ID`` (CLIP for the aesthetic MLP), ``watermark=ID``, ``grounding=ID``."""
    values = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or key not in ("aesthetic", "clip", "watermark", "grounding"):
            raise ValueError(f"`--models`: expected STAGE=ID with STAGE in aesthetic, clip, watermark, grounding; "
                             f"got {spec!r}")  # fmt: skip
        values[key] = value
    if "aesthetic" in values:
        stages.aesthetic = ClipAesthetic(clip=values.get("clip", ClipAesthetic.clip), mlp=values["aesthetic"],
                                         device=device)  # fmt: skip
    if "watermark" in values:
        stages.watermark = ImageClassifierWatermark(model=values["watermark"], device=device)
    if "grounding" in values:
        stages.grounder = GroundingDinoGrounder(model=values["grounding"], device=device)
    return stages
