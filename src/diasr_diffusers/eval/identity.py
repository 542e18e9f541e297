"""Identity metrics: embedders, per-frame matching of references to generated subjects, and leakage.

Three ways to score "does the video keep each identity", all from cosine similarities between reference
embeddings (one per subject) and the embeddings of the faces/subjects found in each frame:

- **one-to-one** (DiasR-style "each subject present and distinct"): per frame, references and detections are
  paired by the Hungarian algorithm; a reference left without a detection scores 0. Two copies of one person, or a
  missing person, lower the score.
- **max over pairs** (Ingredients' FaceSim): per frame, the best similarity over all (reference, detection) pairs.
  It does not notice a missing, duplicated or swapped identity; reported for comparison with that paper.
- **labeled**: when the caller knows which detection was meant to be which subject (from masks, routing maps or
  the layout the prompt asked for), each subject is scored against its own reference, so swapped identities score
  low.

The **leakage matrix** ``L[i, j]`` is the mean similarity of generated subject ``i`` (by label, else by the
Hungarian assignment) to reference ``j``. Subject ``i``'s **leakage margin** is ``max_{j != i} L[i, j] - L[i, i]``:
how much more it resembles another subject's reference than its own; the **leakage score** is the worst (largest)
margin, so one leaking subject is not averaged away by a well-separated one (> 0: an identity leaks, is copied or
swapped).

Embedders follow two small protocols so that any model can be plugged in: :class:`FaceEmbedder`
(``embed`` + ``detect_and_embed``) and :class:`SubjectEmbedder` (``embed``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ._deps import require

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


@runtime_checkable
class SubjectEmbedder(Protocol):
    """Anything that maps images to one embedding each."""

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``(n, d)`` float embeddings of ``n`` RGB uint8 images ``(H, W, 3)``."""
        ...


@runtime_checkable
class FaceEmbedder(Protocol):
    """A face detector + embedder."""

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``(n, d)`` embeddings of the largest face of each image; a row of NaN where no face is found."""
        ...

    def detect_and_embed(self, frame: np.ndarray) -> list[tuple[Box, np.ndarray]]:
        """Every face in an RGB uint8 frame as ``(box, embedding)``."""
        ...


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"`{name}` must be an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"`{name}` must be uint8 RGB, got {image.dtype}")
    return np.ascontiguousarray(image[..., :3])


def _largest(faces: list[tuple[Box, np.ndarray]]) -> tuple[Box, np.ndarray] | None:
    if not faces:
        return None
    return max(faces, key=lambda face: (face[0][2] - face[0][0]) * (face[0][3] - face[0][1]))


def face_recognition_models_dir() -> str:
    """Folder of dlib model files shipped by the PyPI package ``face-recognition-models``.

    The package is located without being imported: its ``__init__`` imports ``pkg_resources``, which recent
    setuptools no longer ships.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The offline dlib face embedder needs the model files of `face-recognition-models`: "
            "`pip install face-recognition-models dlib-bin` (or `pip install 'diasr-diffusers[eval]'`)."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


class DlibFaceEmbedder:
    """Offline face embeddings: dlib's HOG face detector + 5-point alignment + 128-d ResNet descriptor.

    The weights ship inside the PyPI package ``face-recognition-models``; nothing is downloaded. dlib descriptors
    are not centred: cosine similarity between two different people is typically 0.8-0.9 and between two photos of
    one person above 0.95, so compare dlib numbers only with dlib numbers.

    Args:
        model_dir: folder holding ``shape_predictor_5_face_landmarks.dat`` and
            ``dlib_face_recognition_resnet_model_v1.dat`` (default: the ``face-recognition-models`` package).
        upsample: times the detector upsamples the image (finds smaller faces, slower).
        num_jitters: dlib re-samples each face this many times and averages (1 = fastest).

    Example:
        >>> from skimage.data import astronaut
        >>> embedder = DlibFaceEmbedder()  # doctest: +SKIP
        >>> embedder.embed([astronaut()]).shape  # doctest: +SKIP
        (1, 128)
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, upsample: int = 1, num_jitters: int = 1) -> None:
        dlib = require("dlib")
        model_dir = os.fspath(model_dir) if model_dir is not None else face_recognition_models_dir()
        shape_path = os.path.join(model_dir, "shape_predictor_5_face_landmarks.dat")
        rec_path = os.path.join(model_dir, "dlib_face_recognition_resnet_model_v1.dat")
        for path in (shape_path, rec_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"`model_dir`: {path} is missing; `pip install face-recognition-models` ships it."
                )
        if upsample < 0 or num_jitters < 1:
            raise ValueError(f"`upsample` must be >= 0 and `num_jitters` >= 1, got {upsample}, {num_jitters}")
        self.upsample = upsample
        self.num_jitters = num_jitters
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(shape_path)
        self._rec = dlib.face_recognition_model_v1(rec_path)
        self.dim = 128

    def detect_and_embed(self, frame: np.ndarray) -> list[tuple[Box, np.ndarray]]:
        image = _check_image(frame, "frame")
        faces = []
        for rect in self._detector(image, self.upsample):
            landmarks = self._shape(image, rect)
            descriptor = np.asarray(self._rec.compute_face_descriptor(image, landmarks, self.num_jitters))
            box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
            faces.append((box, descriptor.astype(np.float32)))
        return faces

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        rows = []
        for index, image in enumerate(images):
            face = _largest(self.detect_and_embed(_check_image(image, f"images[{index}]")))
            rows.append(face[1] if face is not None else np.full(self.dim, np.nan, dtype=np.float32))
        return np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)


def _missing_weights(argument: str, path: str, what: str, example: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"`{argument}`: no model at {path!r}. This embedder never downloads at run time; fetch {what} first, e.g. "
        f"`{example}`, and pass that folder."
    )


def _transformers_checkpoint(model_path: str | os.PathLike, what: str, repo_id: str) -> str:
    """``model_path`` as a string if it holds a transformers checkpoint, else the clear missing-weights error."""
    model_path = os.fspath(model_path)
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise _missing_weights(
            "model_path", model_path, what, f"hf download {repo_id} --local-dir {model_path}"
        )
    return model_path


class InsightFaceEmbedder:
    """ArcFace (or CurricularFace) embeddings through insightface, from model files already on disk.

    Args:
        root: insightface's model root; the pack must be at ``root/models/<name>`` (e.g. ``antelopev2``, whose
            ``glintr100.onnx`` is an ArcFace R100, as used by ConsisID/OpenS2V-Eval for detection).
        name: model pack name.
        recognition_model: an ONNX recognition model to use instead of the pack's (e.g. a CurricularFace export, as
            OpenS2V-Eval's FaceSim-Cur uses); insightface's ``model_zoo`` loads any ArcFace-style ONNX model.
        det_size: detector input size.

    Example:
        >>> embedder = InsightFaceEmbedder("~/.insightface", name="antelopev2")  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike,
        name: str = "antelopev2",
        recognition_model: str | os.PathLike | None = None,
        det_size: tuple[int, int] = (640, 640),
    ) -> None:
        root = os.path.expanduser(os.fspath(root))
        pack = os.path.join(root, "models", name)
        if not os.path.isdir(pack):
            raise _missing_weights(
                "root",
                pack,
                f"the insightface model pack `{name}`",
                f"hf download <repo holding {name}> --local-dir {pack}",
            )
        if recognition_model is not None and not os.path.isfile(os.fspath(recognition_model)):
            raise _missing_weights(
                "recognition_model", os.fspath(recognition_model), "an ONNX face recognition model", "..."
            )
        insightface = require("insightface")
        from insightface.app import FaceAnalysis

        self._app = FaceAnalysis(name=name, root=root, providers=["CPUExecutionProvider"])
        self._app.prepare(ctx_id=-1, det_size=det_size)
        self._rec = None
        if recognition_model is not None:
            self._rec = insightface.model_zoo.get_model(os.fspath(recognition_model))
            self._rec.prepare(ctx_id=-1)
        self.dim = 512

    def detect_and_embed(self, frame: np.ndarray) -> list[tuple[Box, np.ndarray]]:
        bgr = np.ascontiguousarray(_check_image(frame, "frame")[..., ::-1])  # insightface expects BGR
        faces = []
        for face in self._app.get(bgr):
            if self._rec is not None:
                self._rec.get(bgr, face)  # overwrites face.embedding
            box = tuple(float(v) for v in face.bbox[:4])
            faces.append((box, np.asarray(face.embedding, dtype=np.float32)))
        return faces

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        rows = []
        for index, image in enumerate(images):
            face = _largest(self.detect_and_embed(_check_image(image, f"images[{index}]")))
            rows.append(face[1] if face is not None else np.full(self.dim, np.nan, dtype=np.float32))
        return np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)


class TransformersImageEmbedder:
    """Whole-image embeddings from a local CLIP or DINOv2 checkpoint (``transformers``), e.g. CLIP-I / DINO-I.

    Args:
        model_path: a folder saved with ``save_pretrained`` (``openai/clip-vit-large-patch14``,
            ``facebook/dinov2-base``...). Loaded with ``local_files_only=True``.
        device: torch device.

    Example:
        >>> embedder = TransformersImageEmbedder("weights/dinov2-base")  # doctest: +SKIP
        >>> embedder.embed([frame]).shape  # doctest: +SKIP
        (1, 768)
    """

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu") -> None:
        model_path = _transformers_checkpoint(model_path, "a CLIP or DINOv2 checkpoint", "facebook/dinov2-base")
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self._torch = torch
        self.device = device
        self.processor = AutoImageProcessor.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_path, local_files_only=True).to(device).eval()
        self.is_clip = hasattr(self.model, "get_image_features")

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        images = [_check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        if not images:
            raise ValueError("`images` is empty")
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        with self._torch.no_grad():
            if self.is_clip:
                features = self.model.get_image_features(pixel_values=inputs["pixel_values"])
                features = getattr(features, "pooler_output", features)
            else:
                out = self.model(**inputs)
                features = out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0][:, 0]
        return features.float().cpu().numpy()


class ClipTextScorer:
    """CLIP-T: mean cosine similarity between frames and the prompt, from a local CLIP checkpoint.

    The prompt is truncated to CLIP's 77 tokens (OpenS2V-Eval prompts are longer; say so when you report CLIP-T).

    Example:
        >>> scorer = ClipTextScorer("weights/clip-vit-large-patch14")  # doctest: +SKIP
        >>> scorer.score(frames, "a man and a woman dancing")  # doctest: +SKIP
        0.291
    """

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu") -> None:
        model_path = _transformers_checkpoint(model_path, "a CLIP checkpoint", "openai/clip-vit-large-patch14")
        import torch
        from transformers import AutoProcessor, CLIPModel

        self._torch = torch
        self.device = device
        self.processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
        self.model = CLIPModel.from_pretrained(model_path, local_files_only=True).to(device).eval()

    def score(self, frames: Sequence[np.ndarray], prompt: str) -> float:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("`prompt` must be a non-empty string")
        images = [_check_image(frame, f"frames[{i}]") for i, frame in enumerate(frames)]
        inputs = self.processor(
            text=[prompt], images=images, return_tensors="pt", padding=True, truncation=True, max_length=77
        ).to(self.device)
        with self._torch.no_grad():
            out = self.model(**inputs)
        image = self._torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = self._torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return float((image @ text.T).mean())


# --------------------------------------------------------------------------------------------------------------
# Matching and leakage
# --------------------------------------------------------------------------------------------------------------


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n, m)`` cosine similarities between the rows of ``a (n, d)`` and ``b (m, d)``."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[-1] != b.shape[-1] and a.size and b.size:
        raise ValueError(f"embedding sizes differ: {a.shape} vs {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


def match_one_to_one(similarity: np.ndarray) -> list[tuple[int, int]]:
    """Hungarian assignment maximising total similarity: ``[(reference, detection), ...]``, at most one each.

    Example:
        >>> match_one_to_one(np.array([[0.9, 0.8], [0.85, 0.1]]))
        [(0, 1), (1, 0)]
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2:
        raise ValueError(f"`similarity` must be 2-D (references x detections), got shape {similarity.shape}")
    if 0 in similarity.shape:
        return []
    linear_sum_assignment = require("scipy").optimize.linear_sum_assignment
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


@dataclass
class IdentityScores:
    """Per-video identity scores (means over frames; see the module docstring for the definitions)."""

    one_to_one: float
    max_over_pairs: float
    per_subject: list[float]
    presence: list[float]
    leakage_matrix: list[list[float]]
    leakage: float
    leakage_margins: list[float] = field(default_factory=list)
    labeled: float | None = None
    num_frames: int = 0

    def to_dict(self) -> dict:
        return {
            "one_to_one": self.one_to_one,
            "max_over_pairs": self.max_over_pairs,
            "labeled": self.labeled,
            "per_subject": self.per_subject,
            "presence": self.presence,
            "leakage_matrix": self.leakage_matrix,
            "leakage": self.leakage,
            "leakage_margins": self.leakage_margins,
            "num_frames": self.num_frames,
        }


def leakage_margins(leakage_matrix: np.ndarray) -> list[float]:
    """Per subject ``max_{j != i} L[i, j] - L[i, i]`` (NaN for a subject never generated; empty for one subject)."""
    matrix = np.asarray(leakage_matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"`leakage_matrix` must be square (subjects x references), got shape {matrix.shape}")
    n = matrix.shape[0]
    if n < 2:
        return []
    margins = []
    for i in range(n):
        row = matrix[i]
        margins.append(float(np.delete(row, i).max() - row[i]) if np.all(np.isfinite(row)) else float("nan"))
    return margins


def leakage_score(leakage_matrix: np.ndarray) -> float:
    """The worst subject's leakage margin (see :func:`leakage_margins`); NaN for fewer than 2 subjects.

    Positive: at least one generated subject looks more like another subject's reference than its own. The maximum
    rather than the mean, because when subject B is rendered with A's face, A's own margin is very negative and
    would cancel B's.

    Example:
        >>> round(leakage_score(np.array([[0.9, 0.5], [0.6, 0.8]])), 6)  # well separated
        -0.2
        >>> round(leakage_score(np.array([[0.9, 0.1], [0.9, 0.1]])), 6)  # subject 1 copies subject 0
        0.8
    """
    margins = [m for m in leakage_margins(leakage_matrix) if np.isfinite(m)]
    return float(max(margins)) if margins else float("nan")


def identity_scores(
    reference_embeddings: np.ndarray,
    frame_embeddings: Sequence[np.ndarray],
    frame_labels: Sequence[Sequence[int]] | None = None,
) -> IdentityScores:
    """Score how well a video keeps each reference identity.

    Args:
        reference_embeddings: ``(N, d)``, one embedding per subject.
        frame_embeddings: per frame, ``(M_t, d)`` embeddings of the faces/subjects detected in it (``M_t`` may
            be 0).
        frame_labels: optional, per frame, the subject index each detection was *meant* to be (``-1``: unknown).
            Enables the ``labeled`` score and makes the leakage matrix use these labels instead of the Hungarian
            assignment.

    Returns:
        :class:`IdentityScores`. Frames without any detection count 0 in every mode.

    Example:
        >>> refs = np.eye(2)
        >>> only_first = [np.array([[1.0, 0.0]])] * 4  # subject 1 never appears
        >>> s = identity_scores(refs, only_first)
        >>> s.one_to_one, s.max_over_pairs
        (0.5, 1.0)
    """
    refs = np.asarray(reference_embeddings, dtype=np.float64)
    if refs.ndim != 2 or refs.shape[0] == 0:
        raise ValueError(f"`reference_embeddings` must be (N, d) with N >= 1, got shape {refs.shape}")
    if not np.all(np.isfinite(refs)):
        raise ValueError("`reference_embeddings` has non-finite rows (a reference without a detectable face?)")
    if len(frame_embeddings) == 0:
        raise ValueError("`frame_embeddings` is empty: no frames to score")
    if frame_labels is not None and len(frame_labels) != len(frame_embeddings):
        raise ValueError(
            f"`frame_labels` has {len(frame_labels)} frames but `frame_embeddings` has {len(frame_embeddings)}"
        )
    n = refs.shape[0]
    one_to_one, max_pairs, labeled = [], [], []
    subject_sum = np.zeros(n)
    present = np.zeros(n)
    leak_sum = np.zeros((n, n))
    leak_count = np.zeros(n)
    for t, dets in enumerate(frame_embeddings):
        dets = np.asarray(dets, dtype=np.float64).reshape(-1, refs.shape[1]) if np.size(dets) else np.zeros((0, 0))
        if dets.shape[0] == 0:
            one_to_one.append(0.0)
            max_pairs.append(0.0)
            if frame_labels is not None:
                labeled.append(0.0)
            continue
        sim = cosine_similarity(refs, dets)  # (N, M)
        max_pairs.append(float(sim.max()))
        matched = np.zeros(n)
        assignment = {}  # subject -> detection
        for i, j in match_one_to_one(sim):
            matched[i] = sim[i, j]
            assignment[i] = j
        one_to_one.append(float(matched.mean()))
        if frame_labels is not None:
            labels = np.asarray(frame_labels[t], dtype=np.int64).reshape(-1)
            if labels.shape[0] != dets.shape[0]:
                raise ValueError(f"`frame_labels[{t}]` has {labels.shape[0]} labels for {dets.shape[0]} detections")
            if labels.size and labels.max() >= n:
                raise ValueError(f"`frame_labels[{t}]` names subject {labels.max()} but there are {n} references")
            own = np.zeros(n)
            assignment = {}
            for j, i in enumerate(labels.tolist()):
                if i >= 0 and i not in assignment:
                    assignment[i] = j
                    own[i] = sim[i, j]
            labeled.append(float(own.mean()))
            matched = own
        subject_sum += matched
        for i, j in assignment.items():
            present[i] += 1
            leak_sum[i] += sim[:, j]
            leak_count[i] += 1
    frames = len(frame_embeddings)
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = leak_sum / leak_count[:, None]
    matrix[leak_count == 0] = np.nan
    return IdentityScores(
        one_to_one=float(np.mean(one_to_one)),
        max_over_pairs=float(np.mean(max_pairs)),
        per_subject=(subject_sum / frames).tolist(),
        presence=(present / frames).tolist(),
        leakage_matrix=matrix.tolist(),
        leakage=leakage_score(matrix),
        leakage_margins=leakage_margins(matrix),
        labeled=float(np.mean(labeled)) if frame_labels is not None else None,
        num_frames=frames,
    )
