"""The MuSA-style on-disk format: a JSONL manifest of video-text-subject-mask quadruples.

One JSON object per line, one line per clip (blank lines are ignored)::

    {"id": "clip_000", "video": "videos/clip_000.mp4", "caption": "The striped red star passes the solid blue circle.",
     "fps": 16, "frame_start": 0, "frame_end": 33,
     "subjects": [
        {"phrase": "the striped red star",
         "references": ["refs/clip_000_s0.png", {"image": "refs/star_side.jpg", "mask": "refs/star_side_mask.png"}],
         "masks": {"npz": "masks/clip_000.npz", "key": "s0"}},
        {"phrase": "the solid blue circle",
         "references": ["refs/clip_000_s1.png"],
         "masks": {"png_dir": "masks/clip_000_s1"}}]}

Paths are relative to the manifest's folder (the dataset root) or absolute; every path must lead (after resolving
symlinks) inside the dataset root unless ``allow_outside_root=True`` (``--allow-outside-root``), so a manifest from
elsewhere cannot make the tools open arbitrary files. Ids, when given, must be unique. A mask track covers the *whole video*: mask ``i`` belongs to
video frame ``i`` and the track has at least ``frame_end`` frames. See ``docs/data.md`` for every field.

:func:`validate_manifest` reports every problem of every record with its line number; :func:`load_manifest` returns
the good records and the number skipped, so a training run skips bad records and counts them instead of crashing.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._io import ffmpeg_error_summary, probe_video

MANIFEST_NAME = "manifest.jsonl"
RECORD_KEYS = {"id", "video", "caption", "fps", "frame_start", "frame_end", "subjects", "meta"}
SUBJECT_KEYS = {"phrase", "references", "masks", "meta"}
REFERENCE_KEYS = {"image", "mask"}
MASK_KINDS = ("png_dir", "npz", "rle")
MASK_KEYS = {"png_dir", "npz", "key", "rle"}


def _natural_key(name: str) -> list[Any]:
    # "frame_10.png" sorts after "frame_9.png" even without zero padding.
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def _load_binary_image(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        if img.mode in ("RGBA", "LA"):
            # A cut-out with transparency: the subject is where it is opaque.
            return np.asarray(img.getchannel("A")) > 127
        return np.asarray(img.convert("L")) > 127


def _decode_rle(rle: dict[str, Any]) -> np.ndarray:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:  # pragma: no cover - pycocotools is in the `train` and `test` extras
        raise ImportError(
            "COCO RLE masks need `pycocotools`: pip install 'diasr-diffusers[train]' (or pip install pycocotools)"
        ) from err
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        # Uncompressed RLE (a list of run lengths) is first converted to the compressed form.
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():
        # pycocotools 2.0.x trips numpy 2's `__array__(copy=...)` deprecation inside its own decode.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


@dataclass
class MaskTrack:
    """A subject's per-frame masks: a PNG folder, an array in an ``.npz``, or a list of COCO RLEs (one per frame).

    Frame ``i`` of the track is video frame ``i``. ``load(frames)`` returns ``(len(frames), H, W)`` bool.
    """

    kind: str
    path: Path | None = None
    key: str | None = None
    rle: list[dict[str, Any]] | None = None

    def _png_files(self) -> list[Path]:
        assert self.path is not None
        return sorted((p for p in self.path.iterdir() if p.suffix.lower() == ".png"), key=lambda p: _natural_key(p.name))

    def _npz_array(self) -> np.ndarray:
        assert self.path is not None
        with np.load(self.path, allow_pickle=False) as data:
            names = list(data.files)
            if self.key is None:
                if len(names) != 1:
                    raise ValueError(f"{self.path} holds {len(names)} arrays {names}; name one with \"key\"")
                array = data[names[0]]
            else:
                if self.key not in names:
                    raise ValueError(f"{self.path} has no array {self.key!r} (it has {names})")
                array = data[self.key]
        if array.ndim != 3:
            raise ValueError(f"{self.path}[{self.key}] must be (F, H, W), got shape {array.shape}")
        if array.dtype != bool:
            if not np.isin(array, (0, 1)).all():
                raise ValueError(f"{self.path}[{self.key}] must be boolean (or 0/1), got dtype {array.dtype}")
            array = array.astype(bool)
        return array

    def _rle_list(self) -> list[dict[str, Any]]:
        if self.rle is not None:
            return self.rle
        assert self.path is not None
        data = json.loads(self.path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{self.path} must hold a JSON list of RLE objects, one per frame")
        return data

    def num_frames(self) -> int:
        if self.kind == "png_dir":
            return len(self._png_files())
        if self.kind == "npz":
            return int(self._npz_array().shape[0])
        return len(self._rle_list())

    def load(self, frames: Sequence[int] | None = None) -> np.ndarray:
        """Masks of the given video frames (all frames if None) as ``(len(frames), H, W)`` bool."""
        if self.kind == "npz":
            array = self._npz_array()
            return array if frames is None else array[np.asarray(frames, dtype=np.int64)]
        if self.kind == "png_dir":
            files = self._png_files()
            picked = files if frames is None else [files[i] for i in frames]
            if not picked:
                raise ValueError(f"mask folder {self.path} holds no PNG files")
            masks = [_load_binary_image(p) for p in picked]
        else:
            rles = self._rle_list()
            picked_rle = rles if frames is None else [rles[i] for i in frames]
            if not picked_rle:
                raise ValueError("the RLE mask track is empty")
            masks = [_decode_rle(r) for r in picked_rle]
        shapes = {m.shape for m in masks}
        if len(shapes) != 1:
            raise ValueError(f"mask frames have different sizes {sorted(shapes)}")
        return np.stack(masks)

    def to_json(self, base_dir: Path | None = None) -> dict[str, Any]:
        if self.kind == "rle" and self.rle is not None:
            return {"rle": self.rle}
        out: dict[str, Any] = {self.kind: _rel(self.path, base_dir)}
        if self.key is not None:
            out["key"] = self.key
        return out


@dataclass
class ReferenceImage:
    """A reference image of a subject, with an optional mask (white = subject) used for background removal."""

    image: Path
    mask: Path | None = None


@dataclass
class SubjectRecord:
    phrase: str
    references: list[ReferenceImage]
    masks: MaskTrack
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClipRecord:
    """One manifest line. ``num_video_frames`` and ``video_size`` ``(H, W)`` are filled in by validation."""

    line: int
    video: Path
    caption: str
    subjects: list[SubjectRecord]
    id: str = ""
    fps: float | None = None
    frame_start: int = 0
    frame_end: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    num_video_frames: int | None = None
    video_size: tuple[int, int] | None = None

    @property
    def end(self) -> int:
        """Exclusive end of the usable frame range (``frame_end`` or the video's length once probed)."""
        if self.frame_end is not None:
            return self.frame_end
        if self.num_video_frames is None:
            raise ValueError(f"line {self.line}: frame count unknown; validate the record with check_media=True")
        return self.num_video_frames

    @property
    def phrases(self) -> list[str]:
        return [s.phrase for s in self.subjects]


@dataclass
class Problem:
    line: int
    reason: str
    clip_id: str = ""

    def __str__(self) -> str:
        tag = f" ({self.clip_id})" if self.clip_id else ""
        return f"line {self.line}{tag}: {self.reason}"


@dataclass
class ValidationReport:
    """Every problem found in a manifest. ``records`` holds the good records (in file order)."""

    path: Path
    num_records: int
    problems: list[Problem]
    records: list[ClipRecord]

    @property
    def ok(self) -> bool:
        """No problem, and at least one record (an empty manifest is a mistake, not a valid dataset)."""
        return not self.problems and self.num_records > 0

    @property
    def bad_lines(self) -> list[int]:
        return sorted({p.line for p in self.problems})

    @property
    def num_bad(self) -> int:
        return len(self.bad_lines)

    def reasons(self, line: int) -> list[str]:
        return [p.reason for p in self.problems if p.line == line]

    def format(self) -> str:
        head = f"{self.path}: {self.num_records} records, {self.num_bad} bad"
        if not self.num_records:
            head += " (the manifest holds no records)"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])

    def __str__(self) -> str:
        return self.format()


@dataclass
class LoadedManifest:
    """What :func:`load_manifest` returns: the usable records, how many were skipped, and the full report."""

    records: list[ClipRecord]
    num_skipped: int
    report: ValidationReport


def _rel(path: Path | None, base_dir: Path | None) -> str | None:
    if path is None:
        return None
    if base_dir is not None:
        try:
            return Path(os.path.relpath(path, base_dir)).as_posix()
        except ValueError:  # different drive on Windows
            pass
    return path.as_posix()


def resolve_manifest_path(path: str | os.PathLike) -> Path:
    """The manifest a data argument names: a ``.jsonl`` file, or ``manifest.jsonl`` inside a folder.

    The one rule shared by ``validate-data``, ``cache-latents``, :class:`~diasr_diffusers.data.MuSADataset` and
    training, so a path that one accepts the others accept too.

    Raises:
        FileNotFoundError: neither a file nor a folder holding ``manifest.jsonl``.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"`path`: folder {p} holds no {MANIFEST_NAME} (give a .jsonl manifest or its folder)")
        return p / MANIFEST_NAME
    if not p.is_file():
        raise FileNotFoundError(f"`path`: manifest {p} does not exist (give a .jsonl manifest or its folder)")
    return p


def _resolve(value: Any, base_dir: Path, what: str, problems: list[str], root: str | None) -> Path | None:
    if not isinstance(value, str) or not value or "\x00" in value:
        problems.append(f"{what} must be a non-empty path string, got {value!r}")
        return None
    path = Path(value)
    path = path if path.is_absolute() else base_dir / path
    if root is not None:
        # realpath: `../`, absolute paths and symlinks all count by where they finally lead.
        real = os.path.realpath(path)
        if os.path.commonpath([real, root]) != root:
            problems.append(
                f"{what} {value!r} leads outside the dataset root {root} (to {real}); move the file under the root "
                "or pass allow_outside_root=True (CLI: --allow-outside-root)"
            )
            return None
    return path


def parse_record(
    obj: Any, base_dir: Path, line: int, *, allow_outside_root: bool = False
) -> tuple[ClipRecord | None, list[str]]:
    """Build a :class:`ClipRecord` from a decoded JSON line; returns ``(record or None, structural problems)``.

    Only structure is checked here (keys, types, phrases in the caption, paths inside ``base_dir`` unless
    ``allow_outside_root``); files are checked by :func:`check_record`.
    """
    problems: list[str] = []
    root = None if allow_outside_root else os.path.realpath(base_dir)
    if not isinstance(obj, dict):
        return None, [f"a record must be a JSON object, got {type(obj).__name__}"]
    unknown = sorted(set(obj) - RECORD_KEYS)
    if unknown:
        problems.append(f"unknown keys {unknown} (allowed: {sorted(RECORD_KEYS)})")
    for key in ("video", "caption", "subjects"):
        if key not in obj:
            problems.append(f"missing required key {key!r}")
    video = _resolve(obj["video"], base_dir, "\"video\"", problems, root) if "video" in obj else None
    caption = obj.get("caption")
    if "caption" in obj and (not isinstance(caption, str) or not caption.strip()):
        problems.append(f"\"caption\" must be a non-empty string, got {caption!r}")
        caption = None
    clip_id = obj.get("id", "")
    if not isinstance(clip_id, str):
        problems.append(f"\"id\" must be a string, got {clip_id!r}")
        clip_id = ""
    fps = obj.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, int | float) or fps <= 0):
        problems.append(f"\"fps\" must be a positive number, got {fps!r}")
    frame_start = obj.get("frame_start", 0)
    frame_end = obj.get("frame_end")
    if isinstance(frame_start, bool) or not isinstance(frame_start, int) or frame_start < 0:
        problems.append(f"\"frame_start\" must be an integer >= 0, got {frame_start!r}")
        frame_start = 0
    if frame_end is not None and (isinstance(frame_end, bool) or not isinstance(frame_end, int)):
        problems.append(f"\"frame_end\" must be an integer or null, got {frame_end!r}")
        frame_end = None
    if frame_end is not None and frame_end <= frame_start:
        problems.append(f"empty frame range: frame_end {frame_end} <= frame_start {frame_start}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        problems.append(f"\"meta\" must be an object, got {type(meta).__name__}")
        meta = {}

    subjects: list[SubjectRecord] = []
    raw_subjects = obj.get("subjects")
    if "subjects" in obj and (not isinstance(raw_subjects, list) or not raw_subjects):
        problems.append("\"subjects\" must be a non-empty list")
        raw_subjects = []
    phrases: list[str | None] = [None] * len(raw_subjects or [])
    for j, raw in enumerate(raw_subjects or []):
        where = f"subject {j}"
        if not isinstance(raw, dict):
            problems.append(f"{where} must be an object")
            continue
        unknown = sorted(set(raw) - SUBJECT_KEYS)
        if unknown:
            problems.append(f"{where}: unknown keys {unknown} (allowed: {sorted(SUBJECT_KEYS)})")
        phrase = raw.get("phrase")
        if not isinstance(phrase, str) or not phrase.strip():
            problems.append(f"{where}: \"phrase\" must be a non-empty string, got {phrase!r}")
            phrase = None
        phrases[j] = phrase
        refs: list[ReferenceImage] = []
        raw_refs = raw.get("references")
        if not isinstance(raw_refs, list) or not raw_refs:
            problems.append(f"{where}: \"references\" must be a non-empty list of image paths")
            raw_refs = []
        for k, ref in enumerate(raw_refs):
            rwhere = f"{where} reference {k}"
            if isinstance(ref, dict):
                unknown = sorted(set(ref) - REFERENCE_KEYS)
                if unknown:
                    problems.append(f"{rwhere}: unknown keys {unknown} (allowed: {sorted(REFERENCE_KEYS)})")
                image = _resolve(ref.get("image"), base_dir, f"{rwhere} \"image\"", problems, root)
                mask = _resolve(ref["mask"], base_dir, f"{rwhere} \"mask\"", problems, root) if ref.get("mask") else None
            else:
                image = _resolve(ref, base_dir, rwhere, problems, root)
                mask = None
            if image is not None:
                refs.append(ReferenceImage(image=image, mask=mask))
        track = None
        raw_masks = raw.get("masks")
        if not isinstance(raw_masks, dict):
            problems.append(f"{where}: \"masks\" must be an object with one of {list(MASK_KINDS)}")
        else:
            unknown = sorted(set(raw_masks) - MASK_KEYS)
            kinds = [k for k in MASK_KINDS if k in raw_masks]
            if unknown:
                problems.append(f"{where} masks: unknown keys {unknown} (allowed: {sorted(MASK_KEYS)})")
            if len(kinds) != 1:
                problems.append(f"{where} masks: give exactly one of {list(MASK_KINDS)}, got {kinds}")
            elif kinds[0] == "rle" and isinstance(raw_masks["rle"], list):
                if not all(isinstance(r, dict) and "size" in r and "counts" in r for r in raw_masks["rle"]):
                    problems.append(f"{where} masks: every RLE entry needs \"size\" and \"counts\"")
                else:
                    track = MaskTrack(kind="rle", rle=raw_masks["rle"])
            else:
                path = _resolve(raw_masks[kinds[0]], base_dir, f"{where} masks {kinds[0]!r}", problems, root)
                key = raw_masks.get("key")
                if key is not None and not isinstance(key, str):
                    problems.append(f"{where} masks: \"key\" must be a string, got {key!r}")
                    key = None
                if path is not None:
                    track = MaskTrack(kind=kinds[0], path=path, key=key)
        sub_meta = raw.get("meta", {})
        if phrase is not None and track is not None:
            subjects.append(SubjectRecord(phrase, refs, track, sub_meta if isinstance(sub_meta, dict) else {}))
    if isinstance(caption, str):  # the pipeline's own rules, so what validates also routes
        from ..routing.phrases import phrase_problems  # here: the routing package imports torch

        problems += phrase_problems(caption, phrases, what="caption")
    if problems or video is None or caption is None:
        return None, problems
    record = ClipRecord(
        line=line,
        video=video,
        caption=caption,
        subjects=subjects,
        id=clip_id,
        fps=float(fps) if fps is not None else None,
        frame_start=frame_start,
        frame_end=frame_end,
        meta=meta,
    )
    return record, problems


def _check_image(path: Path, what: str, problems: list[str]) -> tuple[int, int] | None:
    if not path.is_file():
        problems.append(f"{what}: missing file {path}")
        return None
    try:
        with Image.open(path) as img:
            img.verify()
            return img.size[1], img.size[0]
    except Exception as err:  # PIL raises many types for a broken image
        problems.append(f"{what}: unreadable image {path} ({err})")
        return None


def check_record(record: ClipRecord, check_media: bool = True) -> list[str]:
    """Problems with the files of a parsed record (missing, unreadable, mask size != video size, empty mask track).

    With ``check_media`` the video is probed (fills ``record.num_video_frames`` and ``record.video_size``) and every
    mask track is decoded; without it only file existence is checked.
    """
    problems: list[str] = []
    video_ok = record.video.is_file()
    if not video_ok:
        problems.append(f"missing video file {record.video}")
    for j, subject in enumerate(record.subjects):
        where = f"subject {j} ({subject.phrase!r})"
        for k, ref in enumerate(subject.references):
            if not check_media:
                if not ref.image.is_file():
                    problems.append(f"{where} reference {k}: missing file {ref.image}")
                if ref.mask is not None and not ref.mask.is_file():
                    problems.append(f"{where} reference {k} mask: missing file {ref.mask}")
                continue
            size = _check_image(ref.image, f"{where} reference {k}", problems)
            if ref.mask is not None:
                msize = _check_image(ref.mask, f"{where} reference {k} mask", problems)
                if size and msize and size != msize:
                    problems.append(f"{where} reference {k}: mask size {msize} != image size {size}")
        track = subject.masks
        if track.path is not None:
            exists = track.path.is_dir() if track.kind == "png_dir" else track.path.is_file()
            if not exists:
                problems.append(f"{where}: missing mask {'folder' if track.kind == 'png_dir' else 'file'} {track.path}")
    if not check_media or problems:
        return problems

    try:
        num_frames, height, width, _ = probe_video(record.video)
    except Exception as err:  # ffmpeg errors surface as RuntimeError / OSError / StopIteration
        return [*problems, f"unreadable video {record.video} ({ffmpeg_error_summary(err)})"]
    record.num_video_frames, record.video_size = num_frames, (height, width)
    if record.frame_start >= num_frames:
        problems.append(f"frame_start {record.frame_start} is past the video's {num_frames} frames")
    if record.frame_end is not None and record.frame_end > num_frames:
        problems.append(f"frame_end {record.frame_end} is past the video's {num_frames} frames")
    end = min(record.end, num_frames)
    for j, subject in enumerate(record.subjects):
        where = f"subject {j} ({subject.phrase!r})"
        try:
            masks = subject.masks.load()
        except Exception as err:
            problems.append(f"{where}: unreadable mask track ({err})")
            continue
        if masks.shape[0] < end:
            problems.append(f"{where}: mask track has {masks.shape[0]} frames, the clip needs {end}")
        if masks.shape[1:] != (height, width):
            problems.append(
                f"{where}: mask size {masks.shape[1]}x{masks.shape[2]} != video size {height}x{width}"
            )
        elif not masks[record.frame_start : end].any():
            problems.append(f"{where}: empty mask track (no pixel set in frames {record.frame_start}..{end - 1})")
    return problems


def _read_lines(path: Path) -> list[tuple[int, str | UnicodeDecodeError]]:
    """Non-blank lines with their numbers; a line that is not UTF-8 comes back as its decode error, so one bad byte
    costs one record, not the whole manifest."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM written by some editors
        data = data[3:]
    lines: list[tuple[int, str | UnicodeDecodeError]] = []
    for i, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            lines.append((i, err))
            continue
        if text.strip():
            lines.append((i, text))
    return lines


def validate_manifest(
    path: str | os.PathLike, *, check_media: bool = True, num_workers: int = 0, allow_outside_root: bool = False
) -> ValidationReport:
    """Check every record of a JSONL manifest and report each problem with its line number.

    Args:
        path: the ``.jsonl`` manifest or a folder holding ``manifest.jsonl``; relative paths inside it are resolved
            against its folder (the dataset root).
        check_media: decode video headers and mask tracks (sizes, frame counts, empty tracks). Without it only
            structure and file existence are checked (fast).
        num_workers: threads for the media checks (each probes with an ffmpeg subprocess); 0 = in this thread.
        allow_outside_root: accept paths that lead outside the dataset root (``../``, absolute, symlinks). Off by
            default so that a manifest from elsewhere cannot make the tools open arbitrary files.

    Returns:
        A :class:`ValidationReport`; ``report.ok`` is True when nothing is wrong, ``report.records`` are the good
        records.

    Example::

        report = validate_manifest("data/manifest.jsonl")
        if not report.ok:
            print(report.format())
    """
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"`num_workers` must be an integer >= 0, got {num_workers!r}")
    path = resolve_manifest_path(path)
    base_dir = path.parent
    problems: list[Problem] = []
    parsed: list[ClipRecord] = []
    first_line_of_id: dict[str, int] = {}
    duplicates: set[int] = set()
    lines = _read_lines(path)
    for line, text in lines:
        if isinstance(text, UnicodeDecodeError):
            byte = text.object[text.start : text.start + 1].hex()
            problems.append(Problem(line, f"not valid UTF-8 (byte 0x{byte} at offset {text.start} of the line)"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(Problem(line, f"malformed JSON ({err.msg} at column {err.colno})"))
            continue
        except RecursionError:
            problems.append(Problem(line, "malformed JSON (nested too deeply)"))
            continue
        record, errs = parse_record(obj, base_dir, line, allow_outside_root=allow_outside_root)
        clip_id = obj.get("id", "") if isinstance(obj, dict) and isinstance(obj.get("id", ""), str) else ""
        if clip_id:
            if clip_id in first_line_of_id:
                errs = [*errs, f"duplicate id {clip_id!r} (first used on line {first_line_of_id[clip_id]}); ids must be unique"]
                duplicates.add(line)  # still checked below, so every problem of the line is reported at once
            else:
                first_line_of_id[clip_id] = line
        problems.extend(Problem(line, e, clip_id) for e in errs)
        if record is not None:
            parsed.append(record)

    def _check(rec: ClipRecord) -> list[str]:
        return check_record(rec, check_media=check_media)

    if num_workers > 0 and parsed:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            results = list(pool.map(_check, parsed))
    else:
        results = [_check(r) for r in parsed]
    good: list[ClipRecord] = []
    for rec, errs in zip(parsed, results):
        problems.extend(Problem(rec.line, e, rec.id) for e in errs)
        if not errs and rec.line not in duplicates:
            good.append(rec)
    problems.sort(key=lambda p: p.line)  # stable: a record's problems keep their order
    return ValidationReport(path=path, num_records=len(lines), problems=problems, records=good)


def load_manifest(
    path: str | os.PathLike,
    *,
    skip_invalid: bool = True,
    check_media: bool = True,
    num_workers: int = 0,
    allow_outside_root: bool = False,
) -> LoadedManifest:
    """Load the good records of a manifest.

    Args:
        path: the ``.jsonl`` manifest or a folder holding ``manifest.jsonl``.
        skip_invalid: skip bad records and count them (training); if False, raise ``ValueError`` listing them.
        check_media, num_workers, allow_outside_root: as in :func:`validate_manifest`. The dataset needs ``check_media=True`` (it uses
            the probed frame counts).

    Returns:
        :class:`LoadedManifest` with ``records``, ``num_skipped`` and the full ``report``.
    """
    report = validate_manifest(
        path, check_media=check_media, num_workers=num_workers, allow_outside_root=allow_outside_root
    )
    if not report.ok and not skip_invalid:
        raise ValueError(f"invalid manifest (pass skip_invalid=True to skip bad records):\n{report.format()}")
    return LoadedManifest(records=report.records, num_skipped=report.num_bad, report=report)


def write_manifest(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
    """Write manifest records (JSON-ready dicts) as JSONL, atomically."""
    from ._io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
