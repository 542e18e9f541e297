"""OpenS2V-Eval case files.

A case file is a JSON object ``{case_id: {"img_paths": [...], "prompt": "...", "class_label": [...]}}`` (extra keys
such as ``synthesis_flag`` are kept but unused); the video for a case is ``<videos>/<case_id>.mp4``. Image paths
are relative to ``images_root`` (default: the folder of the case file). A case's category is its id without the
trailing ``_<number>`` (``multiface_12`` -> ``multiface``) unless the case has a ``"category"`` key.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalCase:
    """One OpenS2V-Eval case."""

    case_id: str
    img_paths: list[str]
    prompt: str
    class_label: list[str] = field(default_factory=list)
    category: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def video_path(self, videos_dir: str | os.PathLike, extension: str = ".mp4") -> str:
        return os.path.join(os.fspath(videos_dir), f"{self.case_id}{extension}")


def category_of(case_id: str) -> str:
    """``"multiface_12"`` -> ``"multiface"``.

    Example:
        >>> category_of("singleobj_3"), category_of("faceobj_14"), category_of("custom")
        ('singleobj', 'faceobj', 'custom')
    """
    return re.sub(r"_\d+$", "", case_id)


def _fail(source: str, message: str) -> ValueError:
    return ValueError(f"`cases` ({source}): {message}")


def parse_cases(data: Any, images_root: str | os.PathLike = ".", source: str = "<data>") -> dict[str, EvalCase]:
    """Validate already-loaded case JSON and return ``{case_id: EvalCase}`` with absolute image paths."""
    if not isinstance(data, dict):
        raise _fail(
            source,
            f"expected a JSON object {{case_id: {{img_paths, prompt, class_label}}}}, got {type(data).__name__}",
        )
    if not data:
        raise _fail(source, "holds no cases")
    root = os.path.abspath(os.fspath(images_root))
    cases = {}
    for case_id, entry in data.items():
        where = f"case {case_id!r}"
        if not case_id or os.sep in case_id or (os.altsep and os.altsep in case_id) or case_id in (".", ".."):
            raise _fail(source, f"{where}: case ids name video files and cannot be empty or contain path separators")
        if not isinstance(entry, dict):
            raise _fail(source, f"{where}: expected an object, got {type(entry).__name__}")
        img_paths = entry.get("img_paths")
        if not isinstance(img_paths, list) or not img_paths or not all(isinstance(p, str) and p for p in img_paths):
            raise _fail(source, f"{where}: `img_paths` must be a non-empty list of strings, got {img_paths!r}")
        prompt = entry.get("prompt")
        if not isinstance(prompt, str):
            raise _fail(source, f"{where}: `prompt` must be a string, got {type(prompt).__name__}")
        labels = entry.get("class_label", [])
        if isinstance(labels, str):
            labels = [labels]
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise _fail(source, f"{where}: `class_label` must be a string or a list of strings, got {labels!r}")
        category = entry.get("category", category_of(case_id))
        if not isinstance(category, str) or not category:
            raise _fail(source, f"{where}: `category` must be a non-empty string, got {category!r}")
        cases[case_id] = EvalCase(
            case_id=case_id,
            img_paths=[p if os.path.isabs(p) else os.path.join(root, p) for p in img_paths],
            prompt=prompt,
            class_label=labels,
            category=category,
            extra={k: v for k, v in entry.items() if k not in ("img_paths", "prompt", "class_label", "category")},
        )
    return cases


def load_cases(path: str | os.PathLike, images_root: str | os.PathLike | None = None) -> dict[str, EvalCase]:
    """Read and validate an OpenS2V-Eval case file.

    Args:
        path: e.g. ``Open-Domain_Eval.json`` from the OpenS2V-Eval dataset.
        images_root: folder the ``img_paths`` are relative to (default: the case file's folder).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not JSON, or not the OpenS2V-Eval shape (the message names the case and the field).

    Example:
        >>> cases = load_cases("OpenS2V-Eval/Open-Domain_Eval.json")  # doctest: +SKIP
        >>> cases["singleface_3"].img_paths  # doctest: +SKIP
        ['/data/OpenS2V-Eval/Images/singleface/...jpg']
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`cases`: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"`cases` ({path}): not valid JSON: {err}") from err
    except RecursionError as err:
        raise ValueError(f"`cases` ({path}): not valid JSON: nested too deeply") from err
    root = images_root if images_root is not None else os.path.dirname(os.path.abspath(path))
    return parse_cases(data, images_root=root, source=path)
