"""Face preprocessing as Ingredients does it (``models/utils.py: process_face_embeddings_split`` in its code).

Per identity image: resize so the long edge is at most 1024 (LANCZOS), detect the 5 landmarks with facexlib's
RetinaFace and warp the first face to an aligned 512x512 crop; the glintr100 (antelopev2) embedding of that crop
(512) and the L2-normalised EVA02-CLIP-L-14-336 embedding (768) are concatenated into ``id_cond`` (1280); the 5
EVA-CLIP hidden states (``(1, 577, 1024)`` each) are ``id_vit_hidden``. The aligned crops, resized to 360x360, are
pasted on a white 720x480 canvas at ``(360 * i, 60)``: the first frame of the image-to-video model.

Unlike Diffusers' ``consisid_utils.process_face_embeddings`` (ConsisID), Ingredients skips insightface detection
(the embedding is always taken on the facexlib crop), background whitening with the parsing model, and the grey
CLIP input. With more than 2 identities, the released canvas (two 360-pixel squares) has no room: faces are then
shrunk to ``720 // N`` squares in a row (our extension; the released code only handles 2).

Needs the optional packages of ``pip install "diasr-diffusers[ingredients]"`` (insightface, onnxruntime, facexlib,
consisid_eva_clip, opencv) and the ``face_encoder/`` folder of ``feizhengcong/Ingredients``. Nothing is
downloaded: a missing package or file is named in the error.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

FIRST_FRAME_SIZE = (720, 480)  # (width, height) of the released composite
FACE_SIZE = 360
# Import name -> pip name of what the preprocessing needs.
FACE_PACKAGES = {
    "insightface": "insightface",
    "onnxruntime": "onnxruntime",
    "facexlib": "facexlib",
    "consisid_eva_clip": "consisid_eva_clip",
    "cv2": "opencv-python-headless",
}
# Files read from the weights' `face_encoder/` folder. facexlib's parsing model, which the released code loads but
# never uses on this path, is not needed.
FACE_FILES = {
    "glintr100": "models/antelopev2/glintr100.onnx",
    "eva_clip": "EVA02_CLIP_L_336_psz14_s6B.pt",
    "retinaface": "detection_Resnet50_Final.pth",  # facexlib looks for it in its `model_rootpath`
}
EVA_CLIP_MODEL = "EVA02-CLIP-L-14-336"


def missing_face_packages() -> list[str]:
    """The pip names of the face-preprocessing packages that are not installed."""
    return [pip for module, pip in FACE_PACKAGES.items() if importlib.util.find_spec(module) is None]


def missing_face_files(face_encoder_dir: str | os.PathLike) -> list[Path]:
    """The files of :data:`FACE_FILES` absent from ``face_encoder_dir``. Checked before loading: facexlib would
    otherwise download its detector from the internet."""
    root = Path(face_encoder_dir)
    return [root / rel for rel in FACE_FILES.values() if not (root / rel).is_file()]


def compose_first_frame(aligned_faces: list[np.ndarray | PIL.Image.Image]) -> PIL.Image.Image:
    """The white 720x480 first frame with each aligned face (RGB) on it, as released for up to 2 faces: 360x360 at
    ``(360 * i, 60)``. With ``N > 2`` faces each is ``720 // N`` square, in a row, vertically centred."""
    if not aligned_faces:
        raise ValueError("`aligned_faces` is empty: at least one face is needed for the first frame")
    width, height = FIRST_FRAME_SIZE
    size = min(FACE_SIZE, width // len(aligned_faces))
    canvas = PIL.Image.new("RGB", (width, height), color=(255, 255, 255))
    for i, face in enumerate(aligned_faces):
        face = face if isinstance(face, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(face, dtype=np.uint8))
        canvas.paste(face.convert("RGB").resize((size, size), PIL.Image.BICUBIC), (size * i, (height - size) // 2))
    return canvas


def identity_condition(glint_embedding: torch.Tensor, clip_embedding: torch.Tensor) -> torch.Tensor:
    """``id_cond`` ``(1, 1280)``: the glintr100 embedding and the L2-normalised EVA-CLIP embedding, concatenated."""
    glint = glint_embedding.reshape(1, -1)
    clip = clip_embedding.reshape(1, -1)
    return torch.cat([glint.to(clip.dtype), clip / torch.norm(clip, 2, 1, True)], dim=-1)


def clip_input(face: torch.Tensor, size: int | tuple[int, int], mean: Any, std: Any) -> torch.Tensor:
    """EVA-CLIP's input from a ``(1, 3, H, W)`` RGB face in ``[0, 1]``: bicubic antialiased resize to ``size`` and
    mean/std normalisation. The same arithmetic as the released ``torchvision`` calls (``resize(..., BICUBIC)`` on a
    float tensor is ``interpolate(mode="bicubic", antialias=True)``, ``normalize`` is ``(x - mean) / std``)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    face = torch.nn.functional.interpolate(face, size=size, mode="bicubic", align_corners=False, antialias=True)
    mean = torch.as_tensor(mean, dtype=face.dtype, device=face.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=face.dtype, device=face.device).view(1, -1, 1, 1)
    return (face - mean) / std


@dataclass
class IngredientsFaces:
    """Face features of N identities, in the layout :class:`~diasr_diffusers.IngredientsPipeline` takes.

    Args:
        id_cond: one ``(1, 1280)`` tensor per identity.
        id_vit_hidden: one list of 5 ``(1, 577, 1024)`` EVA-CLIP hidden states per identity.
        first_frame: the white 720x480 composite of the aligned faces (the image-to-video first frame).
        aligned_faces: the aligned 512x512 RGB crops.
    """

    id_cond: list[torch.Tensor]
    id_vit_hidden: list[list[torch.Tensor]]
    first_frame: PIL.Image.Image
    aligned_faces: list[np.ndarray]


class IngredientsFaceEncoder:
    """Ingredients' face preprocessing (facexlib alignment, antelopev2 glintr100, EVA02-CLIP-L-14-336).

    Example:
        ```py
        >>> encoder = IngredientsFaceEncoder.from_pretrained("Ingredients/face_encoder", device="cuda")
        >>> faces = encoder([load_image("man.jpg"), load_image("woman.jpg")])
        >>> pipe(prompt=prompt, image=faces.first_frame, id_cond=faces.id_cond, id_vit_hidden=faces.id_vit_hidden)
        ```
    """

    def __init__(self, face_helper: Any, glint_model: Any, clip_model: Any, mean: Any, std: Any, device, dtype):
        self.face_helper = face_helper
        self.glint_model = glint_model
        self.clip_model = clip_model
        self.mean, self.std = mean, std
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(
        cls,
        face_encoder_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> IngredientsFaceEncoder:
        """Load the face models from the ``face_encoder/`` folder of the Ingredients weights.

        Raises:
            ImportError: naming every missing package (install ``diasr-diffusers[ingredients]``).
            FileNotFoundError: naming every missing file of the folder.
        """
        packages = missing_face_packages()
        if packages:
            raise ImportError(
                f"Ingredients face preprocessing needs {', '.join(packages)} (not installed): "
                'pip install "diasr-diffusers[ingredients]". Or pass precomputed `id_cond` / `id_vit_hidden`.'
            )
        root = Path(face_encoder_dir)
        files = missing_face_files(root)
        if files:
            raise FileNotFoundError(
                f"the Ingredients face encoder folder {root} lacks {', '.join(map(str, files))} (the `face_encoder/` "
                "folder of feizhengcong/Ingredients holds them)"
            )
        import insightface
        from consisid_eva_clip import create_model_and_transforms
        from consisid_eva_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from facexlib.utils.face_restoration_helper import FaceRestoreHelper

        device = torch.device(device)
        face_helper = FaceRestoreHelper(
            upscale_factor=1,
            face_size=512,
            crop_ratio=(1, 1),
            det_model="retinaface_resnet50",
            save_ext="png",
            device=device,
            model_rootpath=str(root),
        )
        face_helper.face_det.eval()
        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        glint = insightface.model_zoo.get_model(str(root / FACE_FILES["glintr100"]), providers=providers)
        glint.prepare(ctx_id=(device.index or 0) if device.type == "cuda" else -1)
        model, _, _ = create_model_and_transforms(
            EVA_CLIP_MODEL, str(root / FACE_FILES["eva_clip"]), force_custom_clip=True
        )
        clip = model.visual.eval().to(device, dtype=dtype)
        mean = getattr(clip, "image_mean", OPENAI_DATASET_MEAN)
        std = getattr(clip, "image_std", OPENAI_DATASET_STD)
        mean = mean if isinstance(mean, (list, tuple)) else (mean,) * 3
        std = std if isinstance(std, (list, tuple)) else (std,) * 3
        return cls(face_helper, glint, clip, mean, std, device, dtype)

    @torch.no_grad()
    def __call__(self, images: list[Any]) -> IngredientsFaces:
        """Features of one face per image (RGB: PIL images or ``(H, W, 3)`` uint8 arrays), in order."""
        import cv2  # Diffusers' consisid_utils has the same two image helpers but cannot be imported without insightface

        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("`images` must be a non-empty list with one face image per identity")
        id_cond, id_vit_hidden, aligned = [], [], []
        for n, image in enumerate(images):
            rgb = np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image, dtype=np.uint8)
            if rgb.ndim != 3 or rgb.shape[-1] != 3:
                raise ValueError(f"`images[{n}]` must be an RGB image, got an array of shape {rgb.shape}")
            if max(rgb.shape[:2]) > 1024:  # the long edge to 1024, LANCZOS (released `resize_numpy_image_long`)
                k = 1024 / max(rgb.shape[:2])
                size = (int(rgb.shape[1] * k), int(rgb.shape[0] * k))
                rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LANCZOS4)
            helper = self.face_helper
            helper.clean_all()
            helper.read_image(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            helper.get_face_landmarks_5(only_center_face=False)
            if len(helper.all_landmarks_5) < 1:
                raise ValueError(f"no face found in `images[{n}]`")
            helper.align_warp_face()
            if len(helper.cropped_faces) < 1:
                raise ValueError(f"facexlib could not align the face in `images[{n}]`")
            face_bgr = helper.cropped_faces[0]  # 512x512, BGR as facexlib and insightface use
            glint = torch.from_numpy(self.glint_model.get_feat(face_bgr))
            face_rgb = np.ascontiguousarray(face_bgr[..., ::-1])
            face = torch.from_numpy(face_rgb.transpose(2, 0, 1).astype(np.float32))[None].div(255.0).to(self.device)
            face = clip_input(face, self.clip_model.image_size, self.mean, self.std)
            clip_embed, hidden = self.clip_model(
                face.to(self.dtype), return_all_features=False, return_hidden=True, shuffle=False
            )
            id_cond.append(identity_condition(glint.to(self.device), clip_embed).to(self.dtype))
            id_vit_hidden.append(list(hidden))
            aligned.append(face_rgb)
        return IngredientsFaces(id_cond, id_vit_hidden, compose_first_frame(aligned), aligned)
