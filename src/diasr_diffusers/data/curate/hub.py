"""Hub-model stages, built on ``transformers`` classes and loaded from a Hub id or a local folder (``from_pretrained``),
the same code on a laptop and a GPU node. Each fills the same slot as an offline stage (see :class:`Stages`).

- :class:`ClipAesthetic`: LAION aesthetic predictor = ``CLIPVisionModelWithProjection`` (``openai/clip-vit-large-patch14``)
  image embeddings, L2-normalised, into the 768-1024-128-64-16-1 MLP (video-dataset-scripts
  ``modules/aesthetic_laion.py``; weights ``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``, which must be
  converted once to safetensors: this project never unpickles, see ``docs/data.md``).
- :class:`LaionWatermark`: the LAION watermark classifier (timm EfficientNet-B3 + MLP head, OpenS2V/video-dataset-
  scripts' watermark filter) as a transformers ``EfficientNetModel`` + head, from the folder
  :func:`~.convert.convert_laion_watermark` writes.
- :class:`ImageClassifierWatermark`: any ``AutoModelForImageClassification`` checkpoint with a watermark label.
- :class:`GroundingDinoGrounder`: ``GroundingDinoForObjectDetection`` (``IDEA-Research/grounding-dino-tiny`` or
  ``-base``), OpenS2V's box/text thresholds 0.25/0.25 and its ``"tag1. tag2."`` prompt.
- :class:`Sam2VideoSegmenter`: ``Sam2VideoModel`` (``facebook/sam2.1-hiera-large``, the SAM 2.1 OpenS2V uses), box
  prompts on frame 0, ``propagate_in_video_iterator`` over the clip.
- :class:`QwenVLCaptioner`: ``Qwen2_5_VLForConditionalGeneration`` (``Qwen/Qwen2.5-VL-7B-Instruct``, OpenS2V's
  captioner) on 16 frames, asked for a caption and its subject phrases as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .caption import VLM_CAPTION_PROMPT, Caption, CaptionError, ClipContext, SubjectHint, parse_caption_answer


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


def laion_watermark_head(in_features: int = 1536, hidden: tuple[int, int] = (625, 256)):
    """LAION's watermark head (keys ``{0,3,5}.{weight,bias}``, as in ``classifier.*`` of ``watermark_model_v1.pt``)."""
    from torch import nn

    return nn.Sequential(nn.Linear(in_features, hidden[0]), nn.ReLU(), nn.Dropout(p=0.3), nn.Linear(hidden[0], hidden[1]),
                         nn.ReLU(), nn.Linear(hidden[1], 2))  # fmt: skip


@dataclass
class LaionWatermark:
    """``score(images) -> [p(watermark)]`` with LAION's watermark classifier (LAION-5B-WatermarkDetection).

    LAION's model is timm's ``efficientnet_b3a`` with an MLP head, published as a pickle; convert it once with
    ``diasr convert-laion watermark watermark_model_v1.pt --out FOLDER`` (:func:`~.convert.convert_laion_watermark`)
    and give that folder. The body runs as transformers' ``EfficientNetModel`` (its config reproduces timm's
    padding and BatchNorm eps), the features are global-average pooled as timm does, and the head's softmax gives
    p(watermark) = class 0, LAION's order. Preprocessing is LAION's: resize to 256 x 256 (bilinear, PIL), ImageNet
    mean/std. video-dataset-scripts keeps a clip when the mean p(watermark) < 0.5.
    """

    model: str = ""
    device: str = "cpu"
    name: str = "laion-watermark"
    _parts: Any = field(default=None, repr=False)

    def _load(self):
        if self._parts is None:
            from safetensors.torch import load_file
            from torch import nn
            from transformers import AutoImageProcessor, EfficientNetModel

            from .convert import LAION_WATERMARK_HEAD

            head_file = Path(self.model) / LAION_WATERMARK_HEAD
            if not head_file.is_file():
                raise ValueError(f"`model`: {self.model} has no {LAION_WATERMARK_HEAD}; convert LAION's "
                                 "watermark_model_v1.pt first (diasr convert-laion watermark)")  # fmt: skip
            body = EfficientNetModel.from_pretrained(self.model)
            # timm pads its stride-2 stem on all sides (PyTorch style); transformers' stem pads right and bottom
            # only (TensorFlow style), which would shift every feature by a pixel.
            body.embeddings.padding = nn.ZeroPad2d((1, 1, 1, 1))
            weights = load_file(head_file)
            head = laion_watermark_head(weights["0.weight"].shape[1], (weights["0.weight"].shape[0], weights["3.weight"].shape[0]))
            head.load_state_dict(weights)
            processor = AutoImageProcessor.from_pretrained(self.model, backend="pil")
            device = _device(self.device)
            self._parts = (body.to(device).eval(), head.to(device).eval(), processor)
        return self._parts

    def logits(self, pixel_values):
        """The classifier's logits ``(N, 2)`` for preprocessed ``pixel_values`` ``(N, 3, H, W)``."""
        body, head, _ = self._load()
        features = body(pixel_values=pixel_values).last_hidden_state.mean(dim=(2, 3))
        return head(features)

    def score(self, images: list[np.ndarray]) -> list[float]:
        import torch

        _, _, processor = self._load()
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].to(_device(self.device))
        with torch.no_grad():
            probs = self.logits(pixels).float().softmax(-1)[:, 0]
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


def _frames_processor_class():
    """``Qwen2_5_VLProcessor`` without its video processor: sampled frames go in as a list of images.

    ``Qwen2_5_VLProcessor`` cannot be built without torchvision, even with ``video_processor=None`` (its class
    check looks the video-processor class up, and that class is a torchvision-only dummy). Its image path needs only
    the PIL ``Qwen2VLImageProcessorPil``, so this subclass declares image processor and tokenizer as its only parts
    and inherits everything else (image-token expansion, ``apply_chat_template``, decoding) unchanged.
    """
    from transformers import Qwen2_5_VLProcessor

    class _Qwen2_5_VLFramesProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return _Qwen2_5_VLFramesProcessor


@dataclass
class QwenVLCaptioner:
    """``caption(ctx) -> Caption``: Qwen2.5-VL describes the clip and names its subjects (as JSON).

    Settings follow OpenS2V's step 3-1 (Qwen2.5-VL-7B-Instruct, 16 frames sampled uniformly from the cropped clip,
    ``min_pixels = 16 * 28 * 28``, ``repetition_penalty=1.05``, at most 512 new tokens; its ``temperature=0.1,
    top_p=0.001`` is greedy decoding in effect, so decoding here is greedy and reproducible).

    The frames go to the model as 16 images (``Qwen2VLImageProcessorPil``, the PIL image processor), not as one
    video: the video processor needs torchvision (absent on the CPU machine this was built on), and one code path
    for every machine means a caption does not depend on what is installed. Cost: an image is its own temporal
    patch (the frame repeated), so 16 images cost twice the visual tokens of a 16-frame video at the same size;
    ``max_pixels`` per frame (default 256 * 28 * 28, 256 tokens) bounds it. The model's own chat template builds
    the prompt (:data:`~.caption.VLM_CAPTION_PROMPT`); the answer is parsed by
    :func:`~.caption.parse_caption_answer` and every phrase meets the project's phrase rules in the runner (a
    phrase that is not a whole-word span of the caption is dropped with its reason in ``meta.dropped_subjects``).
    ``meta.captioner`` keeps the raw answer, so a stricter parse can be re-applied without the model.

    Args:
        model: Hub id or folder of a ``Qwen2_5_VLForConditionalGeneration`` checkpoint with its tokenizer (and chat
            template) and image-processor config.
        frames: frames sampled uniformly from the clip.
        min_pixels, max_pixels: per-frame pixel budget of the image processor (each 28 x 28 pixels is a token).
        max_new_tokens: answer length cap.
        dtype: ``"auto"`` = bfloat16 on CUDA, float32 elsewhere.

    Example::

        from diasr_diffusers.data.curate import Stages, curate
        from diasr_diffusers.data.curate.hub import QwenVLCaptioner
        curate(["raw/"], "dataset/", stages=Stages(captioner=QwenVLCaptioner(device="cuda")))
    """

    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    frames: int = 16
    min_pixels: int = 16 * 28 * 28
    max_pixels: int = 256 * 28 * 28
    max_new_tokens: int = 512
    repetition_penalty: float = 1.05
    prompt: str = VLM_CAPTION_PROMPT
    device: str = "cpu"
    dtype: str = "auto"
    name: str = "qwen2.5-vl"
    _parts: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for key in ("frames", "min_pixels", "max_new_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{key}` must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels < self.min_pixels:
            raise ValueError(f"`max_pixels` must be an integer >= min_pixels ({self.min_pixels}), got {self.max_pixels!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"`dtype` must be 'auto', 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if "{frames}" not in self.prompt:
            raise ValueError("`prompt` must contain {frames} (the number of frames shown)")

    def _load(self):
        if self._parts is None:
            import torch
            from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
            from transformers.utils import cached_file

            if self.dtype == "auto":
                dtype = torch.bfloat16 if _device(self.device).type == "cuda" else torch.float32
            else:
                dtype = getattr(torch, self.dtype)
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model, dtype=dtype)
            model = model.to(_device(self.device)).eval()
            tokenizer = AutoTokenizer.from_pretrained(self.model)
            # PIL on every machine: the same pixels reach the model with or without torchvision.
            image_processor = AutoImageProcessor.from_pretrained(self.model, backend="pil")
            template = tokenizer.chat_template
            if template is None:  # the Hub checkpoints keep it beside the processor, not in the tokenizer config
                for name in ("chat_template.jinja", "chat_template.json"):
                    path = cached_file(self.model, name, _raise_exceptions_for_missing_entries=False)
                    if path is not None:
                        text = Path(path).read_text(encoding="utf-8")
                        template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                        break
            if template is None:
                raise ValueError(f"`model`: {self.model} has no chat template (tokenizer config, "
                                 "chat_template.jinja or chat_template.json)")  # fmt: skip
            processor = _frames_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                                  chat_template=template)  # fmt: skip
            self._parts = (model, processor)
        return self._parts

    def answer(self, frames: np.ndarray) -> tuple[str, list[int]]:
        """The model's decoded answer for a clip's frames (``(F, H, W, 3)`` uint8) and the frame indices shown."""
        import torch

        model, processor = self._load()
        picks = np.unique(np.linspace(0, len(frames) - 1, min(self.frames, len(frames))).round().astype(int))
        content = [{"type": "image"} for _ in picks] + [{"type": "text", "text": self.prompt.format(frames=len(picks))}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
        inputs = processor(images=[frames[i] for i in picks], text=[text], return_tensors="pt",
                           size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels})  # fmt: skip
        inputs = inputs.to(_device(self.device))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 repetition_penalty=self.repetition_penalty)  # fmt: skip
        answer = processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])[0]
        return answer, picks.tolist()

    def caption(self, ctx: ClipContext) -> Caption:
        answer, picks = self.answer(ctx.frames)
        meta = {"model": self.model, "answer": answer, "frames": picks}
        try:
            text, phrases = parse_caption_answer(answer)
        except CaptionError as err:
            raise CaptionError(err.reason, meta) from None
        return Caption(text, [SubjectHint(p) for p in phrases], f"{self.name}:{self.model}", meta)


HUB_STAGE_KEYS = ("aesthetic", "clip", "watermark", "grounding", "segmentation", "caption")


def hub_stages(stages: Any, specs: list[str], device: str = "cpu") -> Any:
    """Fill ``stages`` from ``STAGE=ID`` strings (the CLI's ``--models``): ``aesthetic=MLP.safetensors``,
    ``clip=ID`` (CLIP for the aesthetic MLP), ``watermark=ID`` (a converted LAION folder, or a transformers image
    classifier with a ``watermark`` label), ``grounding=ID``, ``segmentation=ID``, ``caption=ID`` (Qwen2.5-VL)."""
    values = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or key not in HUB_STAGE_KEYS or not value:
            raise ValueError(f"`--models`: expected STAGE=ID with STAGE in {', '.join(HUB_STAGE_KEYS)}; got {spec!r}")
        values[key] = value
    if "aesthetic" in values:
        stages.aesthetic = ClipAesthetic(clip=values.get("clip", ClipAesthetic.clip), mlp=values["aesthetic"],
                                         device=device)  # fmt: skip
    if "watermark" in values:
        from .convert import LAION_WATERMARK_HEAD

        # A folder written by `diasr convert-laion watermark` is LAION's classifier; anything else a transformers one.
        laion = (Path(values["watermark"]) / LAION_WATERMARK_HEAD).is_file()
        stages.watermark = (LaionWatermark if laion else ImageClassifierWatermark)(model=values["watermark"], device=device)
    if "grounding" in values:
        stages.grounder = GroundingDinoGrounder(model=values["grounding"], device=device)
    if "segmentation" in values:
        stages.segmenter = Sam2VideoSegmenter(model=values["segmentation"], device=device)
    if "caption" in values:
        stages.captioner = QwenVLCaptioner(model=values["caption"], device=device)
    return stages
