"""Captions with subject phrases: a captions file the user writes (no model), or a VLM (:mod:`.hub`).

A VLM is asked for JSON (:data:`VLM_CAPTION_PROMPT`) and its answer is read by :func:`parse_caption_answer`; the
subject phrases it names then meet the same phrase rules as a captions file's (``routing/phrases.py``).

A captions file is JSON (a list) or JSONL, one entry per video or per shot::

    {"video": "vtest.avi", "caption": "A man in a dark coat walks past a woman with a bag.",
     "subjects": ["a man in a dark coat", {"phrase": "a woman with a bag", "box": [410, 120, 470, 260]}]}
    {"video": "Megamind.avi", "shot": 2, "caption": "...", "subjects": [...]}

``video`` matches a source file by name (``vtest.avi``) or stem (``vtest``); an entry with ``shot`` (0-based shot
index) applies to that shot only and wins over one without; one with ``shot`` and ``start`` (the source frame a clip
window starts at, see the report) applies to that window only and wins over both. A subject's optional ``box`` (``xyxy`` pixels of the
source frame, on the clip's first frame) skips the grounding model for that subject.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SubjectHint:
    """A subject the caption names: its phrase (an exact whole-word span of the caption) and an optional box."""

    phrase: str
    box: tuple[float, float, float, float] | None = None


@dataclass
class Caption:
    text: str
    subjects: list[SubjectHint]
    source: str
    meta: dict = field(default_factory=dict)  # what made it (a VLM's raw answer, frames, settings): kept in the record


class CaptionError(ValueError):
    """A captioner could not produce a caption for this clip; ``reason`` goes to the report, ``meta`` to the clip."""

    def __init__(self, reason: str, meta: dict | None = None) -> None:
        super().__init__(reason)
        self.reason, self.meta = reason, dict(meta or {})


@dataclass
class ClipContext:
    """What a captioner may use: the source video's name, the shot index and the clip's frames."""

    video: str
    shot: int
    start: int
    frames: Any  # (F, H, W, 3) uint8, after any text crop
    fps: float
    crop_offset: tuple[int, int] = (0, 0)  # (x, y) of the crop window in the source frame


_ENTRY_KEYS = {"video", "shot", "start", "caption", "subjects"}


@dataclass
class CaptionsFile:
    """Captions (and optional boxes) from a file: ``caption(ctx) -> Caption | None`` (None: no entry for the clip).

    Raises ``ValueError`` at construction naming the line and key of any malformed entry, so a typo fails before a
    long run starts.
    """

    path: str | os.PathLike
    name: str = "captions-file"
    entries: dict[tuple[str, int | None, int | None], dict] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"`captions`: file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            items = json.loads(text)
            if isinstance(items, dict):
                items = [items]
            numbered = list(enumerate(items, start=1))
        except json.JSONDecodeError:
            numbered = []
            for i, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        numbered.append((i, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"`captions`: {path} line {i}: malformed JSON ({err.msg})") from None
        for i, item in numbered:
            where = f"`captions`: {path} entry {i}"
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
            unknown = sorted(set(item) - _ENTRY_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown} (allowed: {sorted(_ENTRY_KEYS)})")
            if not isinstance(item.get("video"), str) or not isinstance(item.get("caption"), str):
                raise ValueError(f"{where}: needs string \"video\" and \"caption\"")
            shot, start = item.get("shot"), item.get("start")
            for key, value in (("shot", shot), ("start", start)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                    raise ValueError(f"{where}: \"{key}\" must be an integer >= 0, got {value!r}")
            if start is not None and shot is None:
                raise ValueError(f"{where}: \"start\" needs \"shot\" too")
            subjects = item.get("subjects", [])
            if not isinstance(subjects, list):
                raise ValueError(f"{where}: \"subjects\" must be a list")
            for s in subjects:
                box = s.get("box") if isinstance(s, dict) else None
                phrase = s.get("phrase") if isinstance(s, dict) else s
                if not isinstance(phrase, str):
                    raise ValueError(f"{where}: each subject is a phrase string or {{\"phrase\", \"box\"}}, got {s!r}")
                if box is not None and (not isinstance(box, list) or len(box) != 4
                                        or not all(isinstance(v, int | float) for v in box)):  # fmt: skip
                    raise ValueError(f"{where}: \"box\" must be [x1, y1, x2, y2] pixels, got {box!r}")
            self.entries[(_video_key(item["video"]), shot, start)] = item

    def caption(self, ctx: ClipContext) -> Caption | None:
        key = _video_key(ctx.video)
        item = (self.entries.get((key, ctx.shot, ctx.start)) or self.entries.get((key, ctx.shot, None))
                or self.entries.get((key, None, None)))  # fmt: skip
        if item is None:
            return None
        hints = []
        ox, oy = ctx.crop_offset
        for s in item.get("subjects", []):
            if isinstance(s, str):
                hints.append(SubjectHint(s))
            else:
                box = s.get("box")
                box = None if box is None else (box[0] - ox, box[1] - oy, box[2] - ox, box[3] - oy)
                hints.append(SubjectHint(s["phrase"], box))
        return Caption(item["caption"], hints, f"{self.name}:{Path(self.path).name}")


def _video_key(name: str) -> str:
    return Path(name).stem


#: What a VLM captioner asks (``{frames}`` = number of frames shown). OpenS2V captions with Qwen2.5-VL (step 3-1)
#: and extracts tags with a second LLM call (step 4-1, "the entity word must be an exact subset of the caption");
#: here one call returns both, and :func:`parse_caption_answer` plus the phrase rules enforce the subset rule.
VLM_CAPTION_PROMPT = (
    "These {frames} images are frames of one video clip, in time order. Describe the clip in one paragraph of at "
    "most 80 words: start with the main subjects and their appearance, then what they do, in chronological order, "
    "then the setting and the camera motion. Then list the subjects: the people, animals and separable objects "
    "that your description names, at most 6. Copy each subject exactly from your description, as a short noun "
    "phrase of consecutive words (for example \"a man in a grey jacket\"), each naming one entity, no two sharing "
    "a word; leave out body parts, clothing worn by a listed subject, the background, actions and abstract things. "
    'Answer with JSON only: {{"caption": "...", "subjects": ["...", "..."]}}'
)

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_caption_answer(answer: str) -> tuple[str, list[str]]:
    """``(caption, subject phrases)`` from a VLM's answer to :data:`VLM_CAPTION_PROMPT`.

    Accepts the JSON object bare, inside a Markdown code fence, or with text around it; subjects as strings or
    ``{"phrase": ...}`` objects. Phrases are stripped of surrounding whitespace and quotes, never rewritten: whether
    each is a span of the caption is the phrase rules' decision, not the parser's. Raises :class:`CaptionError`
    naming what is missing.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise CaptionError("caption: the VLM gave an empty answer")
    candidates = [m.group(1) for m in _FENCE.finditer(answer)] + [answer]
    decoder = json.JSONDecoder()
    found: dict | None = None
    for text in candidates:
        for start in (i for i, c in enumerate(text) if c == "{"):
            try:
                obj, _ = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "caption" in obj:
                found = obj
                break
        if found is not None:
            break
    short = " ".join(answer.split())[:160]
    if found is None:
        raise CaptionError(f'caption: the VLM\'s answer has no JSON object with "caption" and "subjects": {short!r}')
    caption, subjects = found.get("caption"), found.get("subjects")
    if not isinstance(caption, str) or not caption.strip():
        raise CaptionError(f'caption: "caption" must be a non-empty string in the VLM\'s answer {short!r}')
    if not isinstance(subjects, list):
        raise CaptionError(f'caption: "subjects" must be a list of phrases in the VLM\'s answer {short!r}')
    phrases = []
    for s in subjects:
        phrase = s.get("phrase") if isinstance(s, dict) else s
        if isinstance(phrase, str) and phrase.strip(" \t\n\"'"):
            phrases.append(phrase.strip(" \t\n\"'"))
    return " ".join(caption.split()), phrases
