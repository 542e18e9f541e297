"""``diasr app``: a Gradio page for multi-subject generation with a DiasR pipeline of any family.

A thin layer over the pipeline: the page collects a prompt, the subjects (phrase + reference images, and a layout
mask drawn on a canvas in ``masks`` mode), the routing mode and the sizes; the checks are the pipeline's own
(``check_inputs``, ``check_subject_inputs``, ``check_reference_style_inputs``) and the CLI's
(:func:`~diasr_diffusers.pipelines.loading.check_model_fits`, the phrase rules of
:mod:`~diasr_diffusers.routing.phrases`); the outputs are written by ``diasr generate``'s
:func:`~diasr_diffusers.commands.generate.save_outputs` (video, routing-map overlay with its legend, routing shares).
Needs the ``[app]`` extra (``pip install "diasr-diffusers[app]"``).

Example:
    ```py
    >>> from diasr_diffusers.app import AppSettings, build_app
    >>> from diasr_diffusers.utils.toy import load_sprite_model, sprite_model_path
    >>> pipe = load_sprite_model()
    >>> demo = build_app(pipe, AppSettings.for_sprite_model(), checkpoint=sprite_model_path())
    >>> demo.launch(server_name="127.0.0.1", server_port=7860)
    ```
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

# The routing modes a user picks from (the pipeline's "auto" is left out: the page always says which one runs).
ROUTING_MODES = ("router", "similarity", "masks", "dense")
# Subject slots on the page when the model has no router (a router caps them at its `max_subjects`).
DEFAULT_MAX_SUBJECTS = 4
# The most denoising steps the page offers.
MAX_STEPS = 200
# The longest side of the mask canvas, in canvas pixels; masks are resized to the video size.
MASK_CANVAS = 256


class FieldError(ValueError):
    """A bad input, with the page field it belongs to: one of :meth:`DiasRApp.input_names` (``"prompt"``,
    ``"height"``, ``"phrase_2"``, ``"mask_1"``...)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class AppSettings:
    """The page's defaults for one model."""

    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    max_sequence_length: int = 512
    fps: int = 16
    upscale: int = 1  # nearest-neighbour enlargement of the written videos (tiny models)
    title: str = "DiasR multi-subject video generation"
    example_prompt: str | None = None
    example_subjects: tuple[tuple[str, str], ...] = ()  # (phrase, image path)
    initial_subjects: int = 1
    routing_note: str | None = None  # what the model was trained for, shown under the routing choice

    @classmethod
    def for_sprite_model(cls) -> AppSettings:
        """The embedded sprite model's sizes and ``diasr demo``'s example (two sprites and their references)."""
        from .utils.toy import (
            DEMO_GUIDANCE,
            DEMO_PROMPT,
            DEMO_STEPS,
            DEMO_SUBJECTS,
            DEMO_UPSCALE,
            SPRITE_MODEL_SIZE,
        )

        refs = resources.files("diasr_diffusers") / "assets" / "sprite_refs"
        return cls(
            height=SPRITE_MODEL_SIZE["height"],
            width=SPRITE_MODEL_SIZE["width"],
            num_frames=SPRITE_MODEL_SIZE["num_frames"],
            max_sequence_length=SPRITE_MODEL_SIZE["max_sequence_length"],
            num_inference_steps=DEMO_STEPS,
            guidance_scale=DEMO_GUIDANCE,
            fps=8,
            upscale=DEMO_UPSCALE,
            title="DiasR on the embedded sprite model (a 64x64, 9-frame toy; see docs/toy_model.md)",
            example_prompt=DEMO_PROMPT,
            example_subjects=tuple((phrase, str(refs / name)) for phrase, name in DEMO_SUBJECTS),
            routing_note="This toy model was trained with its router: use 'router' (or 'masks'); 'similarity' and "
            "'dense' give noise on it",
        )

    @classmethod
    def for_pipeline(cls, pipe: Any) -> AppSettings:
        """Defaults of ``pipe``'s family (Wan: its reference style's steps, frames, guidance, fps and first trained
        size, else 480x832; the others: their stock pipeline's), reduced to what the model can make
        (:func:`model_limits`)."""
        from .families import family_for_pipeline

        spec = family_for_pipeline(pipe)
        if spec.reference_styles:
            style = pipe.reference_style
            height, width = style.trained_sizes[0] if style.trained_sizes else (480, 832)
            defaults = {"height": height, "width": width, "num_frames": style.num_frames, "fps": style.fps,
                        "num_inference_steps": style.num_inference_steps, "guidance_scale": style.guidance_scale}  # fmt: skip
        else:
            defaults = dict(spec.sampling_defaults)
        limits = model_limits(pipe)
        return cls(
            height=min(defaults["height"], limits["max_size"]),
            width=min(defaults["width"], limits["max_size"]),
            num_frames=min(defaults["num_frames"], limits["max_frames"]),
            num_inference_steps=defaults["num_inference_steps"],
            guidance_scale=defaults["guidance_scale"],
            max_sequence_length=spec.max_sequence_length,
            fps=defaults["fps"],
        )


def model_limits(pipe: Any) -> dict[str, int]:
    """The sizes ``pipe`` can make, for the page's sliders: height and width in steps of ``size_step`` (VAE x patch)
    up to ``max_size`` (the transformer's ``rope_max_seq_len`` tokens where the family has such a bound; at most 2048
    pixels), frames in steps of ``frame_step`` (the VAE's temporal factor) up to ``max_frames``
    (``rope_max_seq_len`` latent frames, or the family's longest clip)."""
    from .families import family_for_pipeline

    spec = family_for_pipeline(pipe)
    grid = spec.token_grid(pipe.transformer.config, pipe.vae)
    size_step = grid["spatial_compression"] * grid["patch_size"][1]
    frame_step = grid["temporal_compression"]
    rope = pipe.transformer.config.get(spec.rope_limit_key) if spec.rope_limit_key else None
    max_size = min(2048, rope * size_step) if rope else 2048
    return {
        "size_step": size_step,
        "max_size": max_size // size_step * size_step,
        "frame_step": frame_step,
        "max_frames": (rope - 1) * frame_step + 1 if rope else spec.max_frames,
    }


@dataclass
class GenerationRequest:
    """What one click of *Generate* asks for, checked."""

    prompt: str
    routing: str
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    slots: list[int] = field(default_factory=list)  # page slot of each subject
    phrases: list[str] = field(default_factory=list)
    images: list[list[Any]] = field(default_factory=list)
    masks: np.ndarray | None = None


# API words -> page words, for messages shown next to a field (first match decides the field).
_FIELD_WORDS = (
    ("`num_inference_steps`", "steps", "Steps"),
    ("`num_frames`", "frames", "Frames"),
    ("--frames", "frames", "Frames"),
    ("rope_max_seq_len", "frames", None),
    ("`height`", "height", "Height"),
    ("--height", "height", "Height"),
    ("`width`", "width", "Width"),
    ("--width", "width", "Width"),
    ("`guidance_scale`", "guidance", "Guidance"),
    ("`routing", "routing", None),
    ("--routing", "routing", "Routing"),
    ("`id_router`", "routing", "router"),
    ("`max_sequence_length`", "prompt", None),
    ("`subject_images`", "images", "reference images"),
    ("`subject_masks`", "mask", "masks"),
)


def _slot_field(kind: str, slot: int) -> str:
    """The field name of subject slot ``slot`` (0-based): ``phrase_1``, ``images_1``, ``mask_1``..."""
    return f"{kind}_{slot + 1}"


def _field_of(message: str, request_slots: list[int]) -> str:
    """The page field an error message from the pipeline or the CLI checks is about (``request_slots``: the page
    slot of each subject the pipeline numbers 0, 1, ...). A message about a subject's phrase, images or mask goes to
    that subject's field; one naming no field goes to the prompt."""
    found = [(message.find(api), key) for api, key, _ in _FIELD_WORDS if api in message]
    subject = re.search(r"subject[_ a-z]*[\[ ](\d+)", message)
    key = min(found)[1] if found else "prompt"
    index = int(subject.group(1)) if subject and int(subject.group(1)) < len(request_slots) else None
    if key == "prompt" and index is not None:
        return _slot_field("phrase", request_slots[index])
    if key in ("images", "mask"):
        if not request_slots:
            return "prompt"
        return _slot_field(key, request_slots[index if index is not None else 0])
    return key


def _page_words(message: str, request_slots: list[int]) -> str:
    """A pipeline/CLI message in the page's words: labels instead of argument names and flags, and the subject
    numbers of the page (1-based slots) instead of the pipeline's indices."""
    from .commands import in_cli_words

    message = in_cli_words(message, [(api, label) for api, _, label in _FIELD_WORDS if label is not None])

    def slot(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return f"subject {request_slots[index] + 1}" if index < len(request_slots) else match.group(0)

    return re.sub(r"subject (\d+)", slot, message)


class DiasRApp:
    """The page's functions over one pipeline (one generation at a time: the page queues the rest).

    Args:
        pipe: a loaded :class:`~diasr_diffusers.DiasRPipeline`, already on its device.
        settings: the page's defaults (:class:`AppSettings`).
        checkpoint: the pipeline's Diffusers folder, for ``diasr generate``'s size checks against its configs
            (:func:`~diasr_diffusers.pipelines.loading.check_model_fits`); ``None`` skips those (the pipeline still
            checks what it needs).
    """

    def __init__(self, pipe: Any, settings: AppSettings | None = None, checkpoint: str | Path | None = None):
        self.pipe = pipe
        self.settings = settings or AppSettings.for_pipeline(pipe)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.max_subjects = pipe.max_subjects or DEFAULT_MAX_SUBJECTS
        self.routing_modes = tuple(m for m in ROUTING_MODES if m != "router" or pipe.id_router is not None)
        self.limits = model_limits(pipe)
        # A fast tokenizer must not run in two threads at once ("Already borrowed"): the validator's phrase check
        # (another thread) waits while a generation encodes its prompt, which it does before its first step.
        self._tokenizer_lock = threading.Lock()
        self._outputs = Path(tempfile.mkdtemp(prefix="diasr-app-"))
        weakref.finalize(self, shutil.rmtree, self._outputs, ignore_errors=True)

    # -- inputs ----------------------------------------------------------------------------------------------------

    def parse(
        self,
        prompt: str | None,
        routing: str,
        num_frames: Any,
        height: Any,
        width: Any,
        steps: Any,
        guidance: Any,
        seed: Any,
        *subject_values: Any,
    ) -> GenerationRequest:
        """The page's values -> a checked :class:`GenerationRequest`, or a :class:`FieldError` naming the field.

        ``subject_values`` holds ``(phrase, image files, mask editor value)`` per slot; a slot with neither phrase nor
        images is unused.
        """
        from .commands.generate import UsageError, open_image

        if len(subject_values) != 3 * self.max_subjects:
            raise ValueError(f"expected {self.max_subjects} subject slots (3 values each), got {len(subject_values)}")
        prompt = (prompt or "").strip()
        if not prompt:
            raise FieldError("prompt", "Write a prompt; each subject's phrase must occur in it.")
        if routing not in self.routing_modes:
            raise FieldError("routing", f"Routing must be one of {', '.join(self.routing_modes)}, got {routing!r}.")
        numbers = {}
        for key, value in (("frames", num_frames), ("height", height), ("width", width), ("steps", steps), ("seed", seed)):  # fmt: skip
            # Not float(value): True would be 1 frame; the page's fields do not round (see build_app), so 1.5 is 1.5.
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value != int(value):
                raise FieldError(key, f"{key.capitalize()} must be a whole number, got {value!r}.")
            numbers[key] = int(value)
        if numbers["seed"] < 0 or numbers["seed"] >= 2**63:
            raise FieldError("seed", f"Seed must be in [0, 2**63), got {numbers['seed']}.")
        for key, (low, high) in self.field_limits().items():
            if key in numbers and not low <= numbers[key] <= high:
                raise FieldError(key, f"{key.capitalize()} must be between {low} and {high}, got {numbers[key]}.")
        if guidance is None:
            raise FieldError("guidance", "Give a guidance scale (1 = no guidance).")
        if isinstance(guidance, bool) or not isinstance(guidance, Real) or not math.isfinite(guidance) or guidance < 0:
            raise FieldError("guidance", f"Guidance must be a number >= 0 (1 = no guidance), got {guidance!r}.")
        request = GenerationRequest(
            prompt=prompt,
            routing=routing,
            num_frames=numbers["frames"],
            height=numbers["height"],
            width=numbers["width"],
            num_inference_steps=numbers["steps"],
            guidance_scale=float(guidance),
            seed=numbers["seed"],
        )

        editors = []
        for slot in range(self.max_subjects):
            phrase, files, editor = subject_values[3 * slot : 3 * slot + 3]
            phrase = (phrase or "").strip()
            files = [files] if isinstance(files, str) else list(files or [])
            if not phrase and not files:
                continue
            if not phrase:
                raise FieldError(_slot_field("phrase", slot), "Give the words of the prompt that name this subject.")
            if not files:
                raise FieldError(_slot_field("images", slot), "Upload at least one reference image of this subject.")
            try:
                images = [open_image(Path(f), f"subject {slot + 1}") for f in files]
            except UsageError as err:
                raise FieldError(_slot_field("images", slot), str(err)) from None
            request.slots.append(slot)
            request.phrases.append(phrase)
            request.images.append(images)
            editors.append(editor)

        from .routing.phrases import phrase_problems

        problems = phrase_problems(prompt, request.phrases, what="prompt")
        if problems:
            raise FieldError(_field_of(problems[0], request.slots), _page_words(problems[0], request.slots))

        if request.routing == "masks" and request.phrases:
            masks = []
            for slot, editor in zip(request.slots, editors):
                masks.append(self._mask(editor, slot, request.height, request.width))
            request.masks = np.stack(masks)
        self._check(request)
        return request

    def _mask(self, editor: Any, slot: int, height: int, width: int) -> np.ndarray:
        """The mask drawn for ``slot``: the editor's composite over black (strokes are white), read as ``diasr
        generate --mask`` reads a PNG."""
        from PIL import Image

        from .commands.generate import UsageError, mask_from_image

        composite = editor.get("composite") if isinstance(editor, dict) else None
        if composite is None:
            raise FieldError(
                _slot_field("mask", slot), "Draw where this subject goes (white strokes) for routing 'masks'."
            )
        if not isinstance(composite, Image.Image):
            composite = Image.open(composite)
        rgba = composite.convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        try:
            return mask_from_image(flat, height, width, f"the mask of subject {slot + 1}")
        except UsageError as err:
            raise FieldError(_slot_field("mask", slot), str(err)) from None

    def _check(self, request: GenerationRequest) -> None:
        """``diasr generate``'s checks against the checkpoint's configs, then the pipeline's own (cheap: configs and
        the tokenizer; nothing is encoded)."""
        from .families import family_for_pipeline
        from .pipelines.loading import UsageError, check_model_fits
        from .utils.images import normalize_subject_images

        pipe, slots = self.pipe, request.slots
        try:
            if self.checkpoint is not None:
                check_model_fits(
                    self.checkpoint, num_frames=request.num_frames, height=request.height, width=request.width,
                    routing=request.routing if request.phrases else "auto",
                    num_references=sum(len(images) for images in request.images), num_subjects=len(request.phrases),
                    has_masks=request.masks is not None,
                )  # fmt: skip
            pipe.check_inputs(
                request.prompt,
                None,
                request.height,
                request.width,
                num_frames=request.num_frames,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                max_sequence_length=self.settings.max_sequence_length,
                routing=request.routing,
            )
            if request.phrases:
                subjects = normalize_subject_images(request.images)
                with self._tokenizer_lock:
                    pipe.check_subject_inputs(
                        [request.prompt],
                        subjects,
                        request.phrases,
                        request.masks,
                        request.num_frames,
                        request.height,
                        request.width,
                        request.routing,
                        self.settings.max_sequence_length,
                    )
                if family_for_pipeline(pipe).reference_styles:
                    pipe.check_reference_style_inputs(
                        subjects, request.height, request.width, request.num_frames, request.routing
                    )
        except (UsageError, ValueError, TypeError) as err:
            message = str(err)
            raise FieldError(_field_of(message, slots), _page_words(message, slots)) from None

    # -- page functions ----------------------------------------------------------------------------------------------

    def validate(self, *values: Any) -> list[dict[str, Any]]:
        """Gradio validator: one ``gr.validate`` per input of :meth:`generate`, the failing one with its message."""
        import gradio as gr

        keys = self.input_names()
        try:
            self.parse(*values)
        except FieldError as err:
            return [gr.validate(key != err.field, str(err) if key == err.field else "") for key in keys]
        return [gr.validate(True, "") for _ in keys]

    def field_limits(self) -> dict[str, tuple[int, int]]:
        """The range of each whole-number field (the page's sliders show the same): checked here, not by Gradio, so
        that an API caller's value out of range gets the field's name and message instead of a bare 400."""
        step, size = self.limits["size_step"], self.limits["max_size"]
        return {"frames": (1, self.limits["max_frames"]), "height": (step, size), "width": (step, size),
                "steps": (1, MAX_STEPS)}  # fmt: skip

    def input_names(self) -> list[str]:
        """The name of each input of :meth:`generate`, in order (also the parameter names of the page's API)."""
        names = ["prompt", "routing", "frames", "height", "width", "steps", "guidance", "seed"]
        for slot in range(self.max_subjects):
            names += [_slot_field(kind, slot) for kind in ("phrase", "images", "mask")]
        return names

    def generate(self, *values: Any, progress: Any = None) -> tuple[str, str | None, dict[str, float] | None]:
        """Generate: ``(video path, routing-overlay path or None, {phrase: share of video tokens, "(null)": ...})``.

        A bad input raises ``gr.Error`` with the field's message (the page's validator shows it next to the field
        before this runs); warnings of the pipeline (arguments a mode ignores, sizes the weights never saw) appear as
        ``gr.Warning``.
        """
        import gradio as gr
        import torch

        from .commands.generate import save_outputs

        try:
            request = self.parse(*values)
        except FieldError as err:
            raise gr.Error(str(err), print_exception=False) from None
        steps = request.num_inference_steps

        encoding = [True]

        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            if encoding[0]:
                encoding[0] = False
                self._tokenizer_lock.release()
            if progress is not None:
                progress((step + 1, steps), desc="Denoising", unit="steps")
            return {}

        if progress is not None:
            progress(0.0, desc="Encoding the prompt and references")
        self._tokenizer_lock.acquire()
        try:
            with _pipeline_warnings() as warnings:
                result = self.pipe(
                    prompt=request.prompt,
                    subject_images=request.images or None,
                    subject_phrases=request.phrases or None,
                    subject_masks=request.masks,
                    height=request.height,
                    width=request.width,
                    num_frames=request.num_frames,
                    num_inference_steps=steps,
                    guidance_scale=request.guidance_scale,
                    routing=request.routing,
                    max_sequence_length=self.settings.max_sequence_length,
                    generator=torch.Generator(device="cpu").manual_seed(request.seed),
                    output_type="np",  # LTX and CogVideoX default to PIL, as their stock pipelines
                    return_routing_maps=bool(request.phrases) and request.routing != "dense",
                    callback_on_step_end=on_step,
                )
        except torch.cuda.OutOfMemoryError:  # a size too large for the GPU: say so instead of a generic error
            raise gr.Error(
                "Out of memory on the device: try fewer frames, a smaller size or fewer references."
            ) from None
        except (ValueError, TypeError) as err:  # a check the page did not foresee: still one sentence
            raise gr.Error(_page_words(str(err), request.slots), print_exception=False) from None
        finally:
            if encoding[0]:
                self._tokenizer_lock.release()
        for message in warnings:
            gr.Warning(_page_words(message, request.slots))
        out = Path(tempfile.mkdtemp(dir=self._outputs))
        for old in self._outputs.iterdir():  # the page has copied earlier results into its own cache
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
        summary = save_outputs(
            result,
            request.phrases,
            out / "video.mp4",
            out / "routing_maps.mp4",
            self.settings.fps,
            self.pipe.vae_scale_factor_temporal,
            upscale=self.settings.upscale,
        )
        return summary["video"], summary.get("routing_maps"), summary.get("routing_share")


@contextmanager
def _pipeline_warnings() -> Iterator[list[str]]:
    """Collect what the package logs at WARNING level meanwhile (the pipeline's notes on ignored arguments)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("diasr_diffusers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _as_given(payload: Any) -> Any:
    """A number field's value as the browser or API caller sent it, for :meth:`DiasRApp.parse` to check."""
    return payload


def _swatch(index: int) -> str:
    from .utils.visualization import subject_color

    r, g, b = subject_color(index)
    return f'<span style="display:inline-block;width:0.9em;height:0.9em;background:rgb({r},{g},{b});vertical-align:middle"></span>'  # fmt: skip


def build_app(pipe: Any, settings: AppSettings | None = None, checkpoint: str | Path | None = None):
    """The page (a ``gr.Blocks``, queued: one generation at a time, later requests wait their turn).

    Args: as :class:`DiasRApp`.
    """
    import gradio as gr
    from PIL import Image

    app = DiasRApp(pipe, settings, checkpoint)
    s = app.settings
    scale = MASK_CANVAS / max(s.height, s.width)
    canvas = (max(1, round(s.width * scale)), max(1, round(s.height * scale)))
    blank = {"background": Image.new("RGBA", canvas, (0, 0, 0, 255)), "layers": [], "composite": None}
    default_routing = "router" if "router" in app.routing_modes else "similarity"

    with gr.Blocks(title="DiasR", analytics_enabled=False) as demo:  # offline: no telemetry, no version check
        demo.diasr_app = app  # for callers that want the functions behind the page
        gr.Markdown(f"## {s.title}")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    placeholder=s.example_prompt or "A video of the man and the dog walking on a beach.",
                    elem_id="prompt",
                )
                routing = gr.Radio(
                    list(app.routing_modes),
                    value=default_routing,
                    label="Routing",
                    info="router: the trained ID router picks a subject per token; similarity: training-free; "
                    "masks: you draw where each subject goes; dense: every token sees every subject"
                    + (f". {s.routing_note}" if s.routing_note else ""),
                    elem_id="routing",
                )
                count = gr.State(s.initial_subjects)
                groups, phrases, files, masks = [], [], [], []
                for slot in range(app.max_subjects):
                    with gr.Group(visible=slot < s.initial_subjects) as group:
                        gr.HTML(f"<b>Subject {slot + 1}</b> {_swatch(slot)}", padding=True)
                        with gr.Row():
                            # Initial values make every slot optional for API callers (gradio_client), who may
                            # pass only the subjects they use.
                            phrase = gr.Textbox(
                                value="",
                                label="Phrase (its words in the prompt)",
                                elem_id=f"phrase-{slot}",
                                scale=2,
                            )
                            images = gr.File(
                                value=[],
                                label="Reference image(s)",
                                file_count="multiple",
                                file_types=["image"],
                                elem_id=f"images-{slot}",
                                height=120,
                                scale=3,
                            )
                        mask = gr.ImageEditor(
                            value=blank,
                            label="Layout mask: paint where this subject goes (white)",
                            type="pil",
                            image_mode="RGBA",
                            format="png",
                            sources=["upload"],
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                            canvas_size=canvas,
                            layers=False,
                            transforms=(),
                            visible=default_routing == "masks",
                            height=300,
                            elem_id=f"mask-{slot}",
                        )
                    groups.append(group)
                    phrases.append(phrase)
                    files.append(images)
                    masks.append(mask)
                with gr.Row():
                    add = gr.Button("Add subject", size="sm", elem_id="add-subject")
                    remove = gr.Button("Remove last subject", size="sm", elem_id="remove-subject")
                with gr.Accordion("Size and sampling", open=True):
                    fstep, sstep, smax = app.limits["frame_step"], app.limits["size_step"], app.limits["max_size"]
                    with gr.Row():
                        frames = gr.Slider(
                            1, app.limits["max_frames"], value=s.num_frames, step=fstep, precision=0,
                            label=f"Frames ({fstep}k+1)", elem_id="frames",
                        )  # fmt: skip
                        height = gr.Slider(
                            sstep, smax, value=s.height, step=sstep, precision=0, label="Height", elem_id="height"
                        )
                        width = gr.Slider(
                            sstep, smax, value=s.width, step=sstep, precision=0, label="Width", elem_id="width"
                        )
                    with gr.Row():
                        steps = gr.Slider(1, MAX_STEPS, value=s.num_inference_steps, step=1, precision=0, label="Steps", elem_id="steps")  # fmt: skip
                        guidance = gr.Number(value=s.guidance_scale, minimum=0, label="Guidance", elem_id="guidance")
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                    for number in (frames, height, width, steps, guidance, seed):
                        # Gradio would round (seed 1.5 -> 2, True -> 1) and answer a bare 400 for a value past a
                        # slider's end before the app sees it; DiasRApp.parse checks both and names the field.
                        number.preprocess = _as_given
                with gr.Row():
                    if s.example_prompt:
                        example = gr.Button("Fill in the example", elem_id="example")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                video = gr.Video(label="Video", autoplay=True, loop=True, height=320, elem_id="video")
                overlay = gr.Video(
                    label="Routing map: each pixel tinted by the subject its token was routed to (legend below)",
                    autoplay=True,
                    loop=True,
                    height=340,
                    elem_id="routing-overlay",
                )
                shares = gr.Label(
                    label="Share of video tokens routed to each subject", show_heading=False, elem_id="routing-shares"
                )

        subject_inputs = [c for slot in zip(phrases, files, masks) for c in slot]
        inputs = [prompt, routing, frames, height, width, steps, guidance, seed, *subject_inputs]

        def run_generation(*values_and_progress):
            return app.generate(*values_and_progress[:-1], progress=values_and_progress[-1])

        # Named parameters for the API (`client.predict(prompt=..., phrase_1=...)`); Gradio passes its Progress to
        # the positional parameter whose default is one (here the last).
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        run_generation.__signature__ = inspect.Signature(
            [inspect.Parameter(name, kind) for name in app.input_names()]
            + [inspect.Parameter("progress", kind, default=gr.Progress())]
        )

        run.click(
            run_generation,
            inputs=inputs,
            outputs=[video, overlay, shares],
            validator=app.validate,
            concurrency_limit=1,
            api_name="generate",
        )

        def show_masks(mode: str) -> list[Any]:
            return [gr.update(visible=mode == "masks") for _ in masks]

        routing.change(show_masks, inputs=routing, outputs=masks, api_visibility="private")

        def add_subject(n: int) -> list[Any]:
            n = min(n + 1, app.max_subjects)
            return [n, *(gr.update(visible=slot < n) for slot in range(app.max_subjects))]

        def remove_subject(n: int) -> list[Any]:
            n = max(n - 1, 1)
            cleared = []
            for slot in range(app.max_subjects):
                keep = slot < n
                cleared += [gr.update() if keep else "", gr.update() if keep else None, gr.update() if keep else blank]
            return [n, *(gr.update(visible=slot < n) for slot in range(app.max_subjects)), *cleared]

        add.click(add_subject, inputs=count, outputs=[count, *groups], api_visibility="private")
        remove.click(remove_subject, inputs=count, outputs=[count, *groups, *subject_inputs], api_visibility="private")
        if s.example_prompt:

            def fill_example() -> list[Any]:
                n = len(s.example_subjects)
                values = []
                for slot in range(app.max_subjects):
                    if slot < n:
                        values += [s.example_subjects[slot][0], [s.example_subjects[slot][1]], gr.update()]
                    else:
                        values += ["", None, blank]
                return [s.example_prompt, n, *(gr.update(visible=slot < n) for slot in range(app.max_subjects)), *values]  # fmt: skip

            example.click(fill_example, outputs=[prompt, count, *groups, *subject_inputs], api_visibility="private")
    demo.queue(default_concurrency_limit=1)
    return demo
