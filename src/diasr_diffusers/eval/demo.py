"""``diasr demo``'s library: three ways to generate the same two subjects on the embedded sprite model, scored by
the independent sprite embedder, side by side in one video and one PNG strip.

The panels (:data:`PANELS`), one seed and one prompt for all:

- ``masks``: the DiasR model routed by a moving layout (:func:`moving_layout`: each subject's box travels across
  the frames), ``routing="masks"``;
- ``router``: the DiasR model routed by its trained router, no layout;
- ``dense``: the dense (Phantom-style) baseline, ``routing="dense"``: every video token sees every reference.

Each subject of each panel is scored by :class:`~diasr_diffusers.eval.sprites.SpriteEmbedder`, which never sees
the generator: in every frame the window that best matches its reference (mask-free search), the attributes the
embedder reads there (shape, colour, pattern), and whether a *sprite-like object* is there at all (the embedder's
objectness against :data:`OBJECTNESS_THRESHOLD`, calibrated by ``benchmarks/demo_calibration.py`` on real sprite
frames against coloured blob textures and noise). A subject whose colour is found but no sprite-like object is
reported as a blob, because that is what a person sees. In the ``masks`` panel the layout box is also read directly (is the right
colour in the right box?).

Usage::

    from diasr_diffusers.eval.demo import generate_panels, score_panels
    from diasr_diffusers.utils.toy import demo_subjects, load_sprite_dense_model, load_sprite_model

    phrases, images = demo_subjects()
    panels = generate_panels(load_sprite_model(), load_sprite_dense_model(), phrases, images, seed=0)
    scores = score_panels(panels, images)  # per panel, per subject: verdict, attributes, similarities
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from ..utils.io import atomic_path, atomic_write_text, write_video_atomic
from ..utils.toy import (
    DEMO_GUIDANCE,
    DEMO_PROMPT,
    DEMO_STEPS,
    DEMO_SUBJECTS,
    DEMO_UPSCALE,
    SPRITE_MODEL_SIZE,
)
from ..utils.visualization import dominant_color, overlay_routing_maps, routing_legend, tint_colors
from .sprites import ATTRIBUTES, SpriteEmbedder, crop_subject, load_sprite_embedder, locate_subject

# name -> (title, routing, which model)
PANELS: dict[str, tuple[str, str, str]] = {
    "masks": ("(a) DiasR, moving layout", "masks", "routed"),
    "router": ("(b) DiasR, trained router", "router", "routed"),
    "dense": ("(c) dense baseline", "dense", "dense"),
}
# A subject is drawn as a sprite-like object when the embedder's objectness (is a sprite centred in this window?) in
# its best-matching window, averaged over the frames, reaches this. Calibrated by `benchmarks/demo_calibration.py`
# (benchmarks/results/demo_calibration.json, 8 clips): the 95th percentile of the same statistic on sprite-coloured
# blob textures, irregular blobs and noise (n = 48), which 15 of 16 subjects of clean rendered sprite clips reach.
# Objectness is near 1 on every window the search picks, so only its mean over frames separates (AUC 0.95; the shape
# head's confidence separates less, AUC 0.88, and is reported beside it).
OBJECTNESS_THRESHOLD = 0.994
# The layout's boxes: this fraction of the frame's shorter side (make-synthetic sprites are 26-44% wide).
LAYOUT_BOX = 0.375
_TEXT = (240, 240, 240)
_DIM_TEXT = (170, 170, 170)
_BACKGROUND = (24, 24, 24)
_LINE = 12  # pixels per text line of PIL's default font
_GAP = 16  # between panels; a multiple of 16 keeps the video's width one (ffmpeg's macro block)


@dataclass
class DemoPanel:
    """One generation: ``frames`` ``(F, H, W, 3)`` uint8, the routing maps ``(F_lat, H_tok, W_tok)`` (``-1`` =
    null; ``None`` for dense), the layout masks ``(N, F, H, W)`` bool (``masks`` panel only), wall seconds."""

    name: str
    title: str
    routing: str
    frames: np.ndarray
    routing_maps: np.ndarray | None
    masks: np.ndarray | None
    temporal_compression: int
    seconds: float


@dataclass
class SubjectScore:
    """What the embedder finds of one subject in one panel (see :func:`score_subject`)."""

    phrase: str
    verdict: str
    found: bool  # a sprite-like object with the reference's three attributes
    color_found: bool
    sprite_like: bool  # mean objectness >= OBJECTNESS_THRESHOLD
    shape_confidence: float
    attributes: dict[str, dict[str, Any]]  # attribute -> {"expected", "predicted", "frames", "prob"}
    similarity_to_own_reference: float
    similarity_to_other_references: float
    own_reference_best: float  # share of frames
    objectness: float
    in_layout_box: dict[str, float] = field(default_factory=dict)  # masks panel: share of frames, per attribute

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def moving_layout(num_frames: int, height: int, width: int, num_subjects: int = 2) -> np.ndarray:
    """Layout masks ``(N, F, H, W)`` bool: each subject a square box travelling across the frames, even subjects left
    to right, odd ones right to left, each in its own horizontal band (so boxes never overlap)."""
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width), ("num_subjects", num_subjects)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    side = max(4, round(LAYOUT_BOX * min(height, width)))
    band = height // num_subjects
    if band < side // 2:
        raise ValueError(f"`num_subjects` {num_subjects}: too many bands of {side}-pixel boxes for height {height}")
    masks = np.zeros((num_subjects, num_frames, height, width), dtype=bool)
    margin = max(1, width // 32)
    travel = width - side - 2 * margin
    for i in range(num_subjects):
        top = min(max(0, i * band + (band - side) // 2), height - side)
        for t in range(num_frames):
            step = t / max(1, num_frames - 1)
            x = margin + round(travel * (step if i % 2 == 0 else 1 - step))
            masks[i, t, top : top + side, x : x + side] = True
    return masks


def _uint8(frames: Any) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:  # the pipeline's "np" output: float in [0, 1]
        frames = (frames.clip(0.0, 1.0) * 255.0).round().astype(np.uint8)
    return frames


def generate_panel(
    pipe: Any,
    name: str,
    phrases: Sequence[str],
    images: Sequence[Any],
    seed: int = 0,
    num_inference_steps: int = DEMO_STEPS,
    guidance_scale: float = DEMO_GUIDANCE,
    prompt: str = DEMO_PROMPT,
) -> DemoPanel:
    """Generate panel ``name`` (a key of :data:`PANELS`) on ``pipe`` at the sprite model's sizes."""
    if name not in PANELS:
        raise ValueError(f"`name` must be one of {sorted(PANELS)}, got {name!r}")
    title, routing, _ = PANELS[name]
    size = SPRITE_MODEL_SIZE
    masks = (
        moving_layout(size["num_frames"], size["height"], size["width"], len(phrases)) if routing == "masks" else None
    )
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    out = pipe(
        prompt=prompt,
        subject_images=list(images),
        subject_phrases=list(phrases),
        routing=routing,
        subject_masks=masks,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        return_routing_maps=routing != "dense",
        **size,
    )
    maps = None if out.routing_maps is None else out.routing_maps[0].cpu().numpy()
    return DemoPanel(
        name, title, routing, _uint8(out.frames[0]), maps, masks, pipe.vae_scale_factor_temporal,
        time.perf_counter() - start,
    )  # fmt: skip


def generate_panels(
    routed: Any, dense: Any | None, phrases: Sequence[str], images: Sequence[Any], seed: int = 0, **kwargs: Any
) -> list[DemoPanel]:
    """The three panels: ``masks`` and ``router`` on ``routed`` (the DiasR sprite model), ``dense`` on ``dense``
    (the dense baseline; left out when ``None``). ``kwargs`` go to :func:`generate_panel`."""
    models = {"routed": routed, "dense": dense}
    return [
        generate_panel(models[model], name, phrases, images, seed, **kwargs)
        for name, (_, _, model) in PANELS.items()
        if models[model] is not None
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


def _modal(labels: Sequence[str], probs: Sequence[float]) -> tuple[str, float, float]:
    """The most frequent label, the share of frames it wins and its mean probability there."""
    label, count = Counter(labels).most_common(1)[0]
    return label, count / len(labels), float(np.mean([p for lab, p in zip(labels, probs) if lab == label]))


def _predictions(embedder: SpriteEmbedder, crops: list[np.ndarray], masks: list[np.ndarray] | None = None):
    """Per crop: each attribute's calibrated probabilities ``(N, C)`` and the embeddings ``(N, D)``."""
    logits = embedder.logits(crops, masks)
    probs = embedder.probabilities(logits)
    return {k: v.numpy() for k, v in probs.items()}, embedder.embed_logits(logits)


def _labels(embedder: SpriteEmbedder, probs: dict[str, np.ndarray]) -> dict[str, list[str]]:
    return {k: [embedder.labels[k][int(c)] for c in probs[k].argmax(-1)] for k in ATTRIBUTES}


def shape_confidence(shape_probs: np.ndarray) -> float:
    """How surely one shape is read in every frame: the median over frames of the shape head's top probability
    (``shape_probs`` ``(F, C)``; reported beside the verdict)."""
    return float(np.median(np.asarray(shape_probs, dtype=np.float64).max(-1)))


def search_subjects(frames: np.ndarray, ref_embeddings: torch.Tensor, embedder: SpriteEmbedder) -> list[dict]:
    """Per subject, the mask-free search over ``frames``: in every frame the window that best matches its reference,
    the attributes read there (``labels``: per attribute, a label per frame; ``probs``: per attribute, ``(F, C)``
    calibrated probabilities), its embedding's cosine to every reference (``sims`` ``(F,
    N)``) and its objectness ``(F,)``."""
    found = [locate_subject(frame, ref_embeddings, embedder) for frame in frames]  # F x N
    results = []
    for i in range(len(ref_embeddings)):
        crops = [f[loc[i].box[1] : loc[i].box[3], loc[i].box[0] : loc[i].box[2]] for f, loc in zip(frames, found)]
        probs, emb = _predictions(embedder, crops)
        results.append({
            "labels": _labels(embedder, probs), "probs": probs, "sims": (emb @ ref_embeddings.T).numpy(),
            "objectness": np.array([loc[i].objectness for loc in found]),
        })  # fmt: skip
    return results


def _verdict(
    expected: dict[str, str], attributes: dict[str, dict[str, Any]], sprite_like: bool
) -> tuple[str, bool, bool]:
    colour = attributes["color"]["predicted"]
    colour_found = colour == expected["color"] and attributes["color"]["frames"] >= 0.5
    if sprite_like:
        drawn = f"the {attributes['pattern']['predicted']} {colour} {attributes['shape']['predicted']}"
        if all(attributes[k]["predicted"] == expected[k] for k in ATTRIBUTES):
            return f"found: {drawn}", True, colour_found
        return f"a sprite, but {drawn}", False, colour_found
    if colour_found:
        return f"a {colour} blob, not a sprite-like object", False, True
    return f"not found: no {expected['color']} object", False, False


def score_subject(
    index: int,
    phrase: str,
    search: dict,
    expected: dict[str, str],
    in_box: dict[str, float] | None = None,
) -> SubjectScore:
    """Summarise one subject's :func:`search_subjects` result against the attributes the embedder reads on its
    reference (``expected``)."""
    attributes = {}
    for k in ATTRIBUTES:
        label, share, prob = _modal(search["labels"][k], search["probs"][k].max(-1))
        attributes[k] = {"expected": expected[k], "predicted": label, "frames": share, "prob": prob}
    objectness = float(search["objectness"].mean())
    sprite_like = objectness >= OBJECTNESS_THRESHOLD
    verdict, found, colour_found = _verdict(expected, attributes, sprite_like)
    sims = search["sims"]
    others = np.delete(sims, index, axis=1)
    return SubjectScore(
        phrase=phrase, verdict=verdict, found=found, color_found=colour_found, sprite_like=sprite_like,
        shape_confidence=shape_confidence(search["probs"]["shape"]), attributes=attributes,
        similarity_to_own_reference=float(sims[:, index].mean()),
        similarity_to_other_references=float(others.mean()) if others.size else float("nan"),
        own_reference_best=float((sims.argmax(axis=1) == index).mean()), objectness=objectness,
        in_layout_box=in_box or {},
    )  # fmt: skip


def score_in_boxes(
    frames: np.ndarray, masks: np.ndarray, ref_embeddings: torch.Tensor, expected: list[dict[str, str]], embedder
) -> list[dict[str, float]]:
    """Read each subject's layout box directly (``crop_subject`` with the box): per subject, the share of frames
    whose box shows the reference's colour, pattern, shape, all three, and where the own reference matches best."""
    results = []
    for i in range(len(masks)):
        present = [t for t in range(len(frames)) if masks[i, t].any()]
        cut = [crop_subject(frames[t], masks[i, t]) for t in present]
        probs, emb = _predictions(embedder, [c for c, _ in cut], [m for _, m in cut])
        labels = _labels(embedder, probs)
        right = {k: np.array([lab == expected[i][k] for lab in labels[k]]) for k in ATTRIBUTES}
        results.append({
            **{k: float(v.mean()) for k, v in right.items()},
            "all_three": float(np.logical_and.reduce(list(right.values())).mean()),
            "own_reference_best": float(((emb @ ref_embeddings.T).argmax(-1) == i).float().mean()),
        })  # fmt: skip
    return results


def reference_attributes(references: Sequence[Any], embedder: SpriteEmbedder) -> list[dict[str, str]]:
    """What the embedder reads on each reference image: ``{"shape", "color", "pattern"}``."""
    return [{k: p[k] for k in ATTRIBUTES} for p in embedder.predict([np.asarray(r.convert("RGB") if isinstance(r, PIL.Image.Image) else r) for r in references])]  # fmt: skip


def score_panels(
    panels: Sequence[DemoPanel],
    references: Sequence[Any],
    phrases: Sequence[str] | None = None,
    embedder: SpriteEmbedder | None = None,
) -> dict[str, list[SubjectScore]]:
    """Score every subject of every panel (see the module docstring); ``phrases`` default to :data:`DEMO_SUBJECTS`'s."""
    embedder = embedder or load_sprite_embedder()
    phrases = list(phrases) if phrases is not None else [p for p, _ in DEMO_SUBJECTS]
    refs = [np.asarray(r.convert("RGB")) if isinstance(r, PIL.Image.Image) else np.asarray(r) for r in references]
    if len(refs) != len(phrases):
        raise ValueError(f"`references` has {len(refs)} images for {len(phrases)} `phrases`")
    with torch.no_grad():
        ref_emb = embedder.embed(refs)
        expected = reference_attributes(refs, embedder)
        scores = {}
        for panel in panels:
            searched = search_subjects(panel.frames, ref_emb, embedder)
            boxes = score_in_boxes(panel.frames, panel.masks, ref_emb, expected, embedder) if panel.masks is not None else [None] * len(phrases)  # fmt: skip
            scores[panel.name] = [
                score_subject(i, p, searched[i], expected[i], boxes[i]) for i, p in enumerate(phrases)
            ]
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# Pictures: one canvas per panel (title, frames, routing maps, references, scores), side by side


def demo_tints(references: Sequence[Any]) -> list[tuple[int, int, int]]:
    """The routing-map tint of each subject: far from every reference's own colour (see
    :func:`~diasr_diffusers.utils.visualization.tint_colors`)."""
    return tint_colors([dominant_color(r) for r in references])


def _text_block(lines: Sequence[tuple[str, tuple[int, int, int]]], width: int) -> np.ndarray:
    font = PIL.ImageFont.load_default()
    image = PIL.Image.new("RGB", (width, _LINE * len(lines) + 4), _BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    for row, (text, color) in enumerate(lines):
        while text and draw.textlength(text, font=font) > width - 4:
            text = text[:-1]
        draw.text((2, 2 + row * _LINE), text, fill=color, font=font)
    return np.asarray(image)


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def _outline_boxes(image: np.ndarray, masks_t: np.ndarray, colors: Sequence[tuple[int, int, int]], scale: int) -> None:
    """Draw each subject's layout box (its mask's bounding box), in the subject's tint, on an upscaled frame."""
    for mask, color in zip(masks_t, colors):
        ys, xs = np.nonzero(mask)
        if len(ys):
            y0, y1, x0, x1 = ys.min() * scale, (ys.max() + 1) * scale - 1, xs.min() * scale, (xs.max() + 1) * scale - 1
            for a, b in ((slice(y0, y0 + 2), slice(x0, x1 + 1)), (slice(y1 - 1, y1 + 1), slice(x0, x1 + 1)),
                         (slice(y0, y1 + 1), slice(x0, x0 + 2)), (slice(y0, y1 + 1), slice(x1 - 1, x1 + 1))):  # fmt: skip
                image[a, b] = color


def score_lines(score: SubjectScore, color: tuple[int, int, int]) -> list[tuple[str, tuple[int, int, int]]]:
    """The text under a panel for one subject: what is drawn, and the numbers that say so."""
    a = score.attributes
    lines = [
        (score.phrase, color),
        (score.verdict, _TEXT),
        (f"colour {a['color']['predicted']} {a['color']['frames']:.0%}  pattern {a['pattern']['predicted']} "
         f"{a['pattern']['frames']:.0%}", _DIM_TEXT),
        (f"shape {a['shape']['predicted']} {a['shape']['frames']:.0%} (conf {score.shape_confidence:.2f})", _DIM_TEXT),
        (f"objectness {score.objectness:.3f} {'>=' if score.sprite_like else '<'} {OBJECTNESS_THRESHOLD} "
         f"({'sprite-like' if score.sprite_like else 'no sprite'})", _DIM_TEXT),
        (f"cos own {score.similarity_to_own_reference:.2f} other {score.similarity_to_other_references:.2f}", _DIM_TEXT),
    ]  # fmt: skip
    if score.in_layout_box:
        box = score.in_layout_box
        lines.append((f"in its box: colour {box['color']:.0%} all three {box['all_three']:.0%}", _DIM_TEXT))
    return lines


def panel_canvas(
    panel: DemoPanel,
    scores: Sequence[SubjectScore],
    references: Sequence[np.ndarray],
    tints: Sequence[tuple[int, int, int]],
    frame_indices: Sequence[int],
    scale: int,
    text_lines: int,
) -> np.ndarray:
    """One panel: its title, the frames ``frame_indices`` side by side, the routing maps under them (frames in
    grey, tokens tinted by subject, layout boxes outlined), the references and every subject's scores."""
    frames = panel.frames[list(frame_indices)]
    width = frames.shape[2] * scale * len(frame_indices)
    title = _text_block([(panel.title, _TEXT), (f"routing={panel.routing!r}, {len(panel.frames)} frames", _DIM_TEXT)], width)  # fmt: skip
    top = np.concatenate([_upscale(f, scale) for f in frames], axis=1)
    if panel.routing_maps is not None:
        over = overlay_routing_maps(
            panel.frames, panel.routing_maps, alpha=0.6, temporal_compression=panel.temporal_compression,
            colors=tints, grayscale=True,
        )[list(frame_indices)]  # fmt: skip
        tiles = [_upscale(f, scale) for f in over]
        if panel.masks is not None:
            for tile, t in zip(tiles, frame_indices):
                _outline_boxes(tile, panel.masks[:, t], tints, scale)
        bottom = np.concatenate(tiles, axis=1)
    else:
        grey = np.full_like(top, 60)
        note = _text_block(
            [("no routing: every video token", _TEXT), ("sees every reference", _TEXT)], min(width, 200)
        )
        grey[: note.shape[0], : note.shape[1]] = note
        bottom = grey
    thumb = min(48, width // max(1, len(references)))
    refs = np.full((thumb + 4, width, 3), _BACKGROUND, np.uint8)
    for i, (ref, tint) in enumerate(zip(references, tints)):
        image = np.asarray(PIL.Image.fromarray(ref).resize((thumb - 4, thumb - 4), PIL.Image.BILINEAR))
        x = 2 + i * (thumb + 4)
        refs[2 : thumb + 2, x : x + thumb] = tint  # a frame in the subject's tint: which reference is which colour
        refs[4:thumb, x + 2 : x + thumb - 2] = image
    lines = [line for s, t in zip(scores, tints) for line in score_lines(s, t)]
    lines += [("", _TEXT)] * (text_lines - len(lines))
    return np.concatenate([title, top, bottom, refs, _text_block(lines, width)], axis=0)


def _pad16(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    out = np.full((h + (-h) % 16, w + (-w) % 16, 3), _BACKGROUND, np.uint8)
    out[:h, :w] = image
    return out


def compose(
    panels: Sequence[DemoPanel],
    scores: dict[str, list[SubjectScore]],
    references: Sequence[Any],
    phrases: Sequence[str],
    frame_indices: Sequence[int],
    scale: int,
) -> np.ndarray:
    """The panels side by side (:func:`panel_canvas`) with the routing legend below: one ``(H, W, 3)`` uint8 image,
    both sides multiples of 16."""
    refs = [np.asarray(r.convert("RGB")) if isinstance(r, PIL.Image.Image) else np.asarray(r) for r in references]
    tints = demo_tints(refs)
    text_lines = max(sum(len(score_lines(s, (0, 0, 0))) for s in scores[p.name]) for p in panels)
    canvases = [panel_canvas(p, scores[p.name], refs, tints, frame_indices, scale, text_lines) for p in panels]
    gap = np.full((canvases[0].shape[0], _GAP, 3), _BACKGROUND, np.uint8)
    row = np.concatenate([part for c in canvases for part in (c, gap)][:-1], axis=1)
    legend = routing_legend(
        [f"{p} (routing-map tint)" for p in phrases], row.shape[1], colors=tints,
        null_label="null: no tint (frames in grey under the tints; boxes = layout)",
    )  # fmt: skip
    return _pad16(np.concatenate([row, legend], axis=0))


def compose_video(panels, scores, references, phrases, scale: int = DEMO_UPSCALE) -> np.ndarray:
    """``(F, H, W, 3)`` uint8: frame ``t`` of every panel side by side (:func:`compose`)."""
    return np.stack([compose(panels, scores, references, phrases, [t], scale) for t in range(len(panels[0].frames))])


def compose_strip(panels, scores, references, phrases, every: int = 2, scale: int = 2) -> PIL.Image.Image:
    """One PNG: every ``every``-th frame of every panel, panels side by side (:func:`compose`)."""
    return PIL.Image.fromarray(compose(panels, scores, references, phrases, range(0, len(panels[0].frames), every), scale))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The whole demo


def run_demo(
    out_dir: str | Path,
    seed: int = 0,
    dense_path: str | None = None,
    num_inference_steps: int = DEMO_STEPS,
    fps: int = 4,
) -> dict[str, Any]:
    """Load the sprite model and the dense baseline, generate the three panels, score them, and write
    :data:`~diasr_diffusers.utils.toy.DEMO_FILES` into ``out_dir`` (each atomically). Returns the summary written to ``scores.json`` and the
    report's text under ``"report"``."""
    from ..utils.toy import demo_subjects, load_sprite_dense_model, load_sprite_model

    start = time.perf_counter()
    phrases, images = demo_subjects()
    routed, dense = load_sprite_model(), load_sprite_dense_model(dense_path)
    loaded = time.perf_counter() - start
    panels = generate_panels(routed, dense, phrases, images, seed, num_inference_steps=num_inference_steps)
    scores = score_panels(panels, images, phrases)
    out_dir = Path(out_dir)
    write_video_atomic(compose_video(panels, scores, images, phrases), out_dir / "demo.mp4", fps)
    with atomic_path(out_dir / "demo.png") as tmp:
        compose_strip(panels, scores, images, phrases).save(tmp)
    seconds = time.perf_counter() - start
    summary = {
        "seed": seed,
        "steps": num_inference_steps,
        "guidance_scale": DEMO_GUIDANCE,
        "prompt": DEMO_PROMPT,
        "seconds": {"load": loaded, **{p.name: p.seconds for p in panels}, "total": seconds},
        "objectness_threshold": OBJECTNESS_THRESHOLD,
        "panels": {
            p.name: {
                "title": p.title,
                "routing": p.routing,
                "routing_share": routing_share(p.routing_maps, phrases),
                "subjects": [s.to_dict() for s in scores[p.name]],
            }
            for p in panels
        },
    }
    report = render_report(summary, phrases, [name for _, name in DEMO_SUBJECTS], dense_path)
    atomic_write_text(out_dir / "scores.json", json.dumps(summary, indent=2))
    atomic_write_text(out_dir / "report.md", report)
    return {**summary, "report": report}


def routing_share(maps: np.ndarray | None, phrases: Sequence[str]) -> dict[str, float] | None:
    """Share of video tokens routed to each subject phrase and to ``"(null)"``."""
    if maps is None:
        return None
    share = {p: float((maps == i).mean()) for i, p in enumerate(phrases)}
    share["(null)"] = float((maps == -1).mean())
    return share


def render_report(
    summary: dict[str, Any], phrases: Sequence[str], ref_files: Sequence[str], dense_path: str | None
) -> str:
    """``report.md``: what the model is, what each panel shows in words, and the numbers behind the words."""
    size = SPRITE_MODEL_SIZE
    lines = [
        "# diasr demo",
        "",
        "**What the models are:** the embedded sprite model (`diasr_diffusers.utils.toy.load_sprite_model()`), a "
        "small Wan2.1-architecture DiasR model with its trained router, and its dense (Phantom-style) baseline "
        f"(`load_sprite_dense_model()`{'' if dense_path is None else f', here from `{dense_path}`'}), trained from "
        "scratch the same way on a 2-core CPU on synthetic sprite clips (`docs/toy_model.md`). They know the sprite "
        "world only (shapes, colours and patterns of `diasr make-synthetic`, 64x64 pixels, 9 frames). This is a "
        "demonstration of the mechanism, not a video model.",
        "",
        f"- prompt: `{summary['prompt']}`",
        *(
            f"- subject {i}: `{p}` <- `{f}` (diasr_diffusers/assets/sprite_refs)"
            for i, (p, f) in enumerate(zip(phrases, ref_files))
        ),  # fmt: skip
        f"- {size['num_frames']} frames at {size['height']}x{size['width']}, {summary['steps']} steps, guidance "
        f"{summary['guidance_scale']}, seed {summary['seed']}, the same for every panel",
        f"- wall time: {summary['seconds']['total']:.1f} s in all on {'CUDA' if torch.cuda.is_available() else 'CPU'} "
        f"(loading {summary['seconds']['load']:.1f} s; "
        + ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items() if k in PANELS)
        + ")",
        "",
        "## What each panel shows",
        "",
        "Read by the independent sprite embedder (`diasr_diffusers.eval.sprites`, never sees the generator): in "
        "every frame it finds the window that best matches each reference and reads its shape, colour and pattern. "
        "A subject counts as *drawn* only if a sprite-like object is there: the embedder's objectness in that "
        f"window, averaged over the frames, reaches {OBJECTNESS_THRESHOLD}, a threshold calibrated on clean sprite "
        "frames against sprite-coloured blobs and noise (`benchmarks/demo_calibration.py`: 15 of 16 sprites reach "
        "it, at most 5% of blobs and noise). Otherwise a right colour is reported as a blob, because that is what "
        "you see; the shape read in the window is given either way, with the shape head's confidence.",
        "",
    ]
    for panel in summary["panels"].values():
        lines += [f"**{panel['title']}** (`routing={panel['routing']!r}`)" + (f"; tokens routed: {', '.join(f'{k} {v:.0%}' for k, v in panel['routing_share'].items())}" if panel["routing_share"] else ""), ""]  # fmt: skip
        lines += [
            "| subject | what is there | objectness | colour | pattern | shape (shape confidence) | cosine own / other | own reference best | in its layout box: colour / all three |",
            "|---|---|---:|---|---|---|---:|---:|---:|",
        ]  # fmt: skip
        for s in panel["subjects"]:
            a = s["attributes"]
            box = s["in_layout_box"]
            lines.append(
                f"| {s['phrase']} | {s['verdict']} | {s['objectness']:.3f} | "
                + " | ".join(
                    f"{a[k]['predicted']} ({a[k]['frames']:.0%} of frames)"
                    + ("" if a[k]["predicted"] == a[k]["expected"] else f", reference: {a[k]['expected']}")
                    for k in ("color", "pattern")
                )  # fmt: skip
                + f" | {a['shape']['predicted']} in {a['shape']['frames']:.0%} of frames ({s['shape_confidence']:.2f})"
                + (
                    ""
                    if a["shape"]["predicted"] == a["shape"]["expected"]
                    else f", reference: {a['shape']['expected']}"
                )
                + f" | {s['similarity_to_own_reference']:.2f} / {s['similarity_to_other_references']:.2f}"
                + f" | {s['own_reference_best']:.0%} | "
                + (f"{box['color']:.0%} / {box['all_three']:.0%}" if box else "–")
                + " |"
            )
        lines.append("")
    lines += [
        "Cosines compare the embedder's attribute distributions (1 = same shape, colour and pattern; about 2/3 = one "
        "differs): a right colour and pattern on a blob already gives about 0.7, so read them with the words.",
        "",
        "Files: `demo.mp4` (the panels side by side, frame by frame, with the routing maps under them), `demo.png` "
        "(every other frame of every panel), `scores.json` (the numbers above), `report.md` (this file). In the "
        "routing maps the frames are grey and each token is tinted by the subject it was routed to (the legend "
        "names the tints, chosen far from the subjects' own colours); untinted = null; outlined boxes = the layout.",
    ]
    return "\n".join(lines) + "\n"
