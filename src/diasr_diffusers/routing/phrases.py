"""Where each subject's phrase sits in a prompt: the one source of truth for phrase matching.

The pipeline (text routing), ``diasr validate-data`` (manifest validation), :class:`~diasr_diffusers.data.MuSADataset`
and the trainer all call these functions, so a caption that validates is a caption the pipeline can route.

Rules, applied to the prompt as Wan's ``encode_prompt`` cleans it (ftfy, HTML entities, collapsed whitespace):

- a phrase matches whole words only, case-insensitively (``"the square"`` does not match ``"the squarefish"``);
  runs of whitespace inside a phrase match any run of whitespace;
- each subject needs its own words: two subjects may not share a phrase, nor may one subject's phrase overlap
  another's occurrence in the prompt (``"the man"`` inside ``"the man's dog"``), since one text token can be routed
  to only one subject;
- with a tokenizer, each phrase must have an occurrence inside the first ``max_sequence_length`` tokens (the text
  encoder never sees the rest).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


def clean_prompt(text: str) -> str:
    """The prompt as Wan's text encoding sees it (diffusers' ``prompt_clean``)."""
    # Imported here: diffusers' Wan pipeline module is heavy, and `diasr validate-data` needs only this function.
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


def _pattern(phrase: str, whole_words: bool = True) -> re.Pattern[str]:
    body = r"\s+".join(re.escape(w) for w in phrase.split())
    return re.compile(rf"(?<!\w){body}(?!\w)" if whole_words else rf"\w*{body}\w*", re.IGNORECASE)


def phrase_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans of every whole-word, case-insensitive occurrence of ``phrase`` in ``text`` (taken as is)."""
    if not phrase.split():
        return []
    return [m.span() for m in _pattern(phrase).finditer(text)]


def _valid(phrase: Any) -> bool:
    return isinstance(phrase, str) and bool(phrase.strip())


def phrase_problems(text: str, phrases: Sequence[str | None], what: str = "prompt") -> list[str]:
    """Every reason ``phrases`` (one per subject) cannot be routed in ``text``; empty when all is well.

    ``None`` entries are skipped (a caller that already reported them passes ``None``). Messages name the subject
    index, the phrase and the problem; ``what`` names ``text`` in them (``"prompt"``, ``"caption"``).
    """
    text = clean_prompt(text)
    problems: list[str] = []
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, phrase in enumerate(phrases):
        if phrase is None:
            continue
        if not _valid(phrase):
            problems.append(f"subject {i}: phrase must be a non-empty string, got {phrase!r}")
            continue
        found = phrase_spans(text, phrase)
        if not found:
            inside = _pattern(phrase, whole_words=False).search(text)
            hint = f" (only inside {inside.group(0)!r}: it must end and begin at word boundaries)" if inside else ""
            problems.append(f"subject {i}: phrase {phrase!r} does not occur in the {what} as whole words{hint}")
            continue
        for j, other in spans.items():
            if " ".join(phrase.lower().split()) == " ".join(phrases[j].lower().split()):
                problems.append(f"subject {i}: phrase {phrase!r} is used by another subject (subject {j})")
                break
            clash = next(((a, b) for a, b in found for c, d in other if a < d and c < b), None)
            if clash is not None:
                problems.append(
                    f"subject {i}: phrase {phrase!r} overlaps subject {j}'s phrase {phrases[j]!r} in the {what} "
                    f"(at {text[clash[0] : clash[1]]!r}); a word can name only one subject"
                )
                break
        spans[i] = found
    return problems


def check_phrases(text: str, phrases: Sequence[str], what: str = "prompt") -> None:
    """Raise ``ValueError`` listing :func:`phrase_problems`, if any."""
    problems = phrase_problems(text, phrases, what)
    if problems:
        raise ValueError(f"subject phrases cannot be routed in the {what} {text!r}: " + "; ".join(problems))


def phrase_token_owners(
    text: str, phrases: Sequence[str], tokenizer: Any, max_sequence_length: int, what: str = "prompt"
) -> list[int]:
    """The subject owning each of the ``max_sequence_length`` text positions of ``text`` (``-1``: general text).

    Checks :func:`phrase_problems` first, then that each phrase has an occurrence within the tokens the text
    encoder sees, and that no token is shared by two phrases. Raises ``ValueError`` naming the subject otherwise.
    ``tokenizer``: a fast (offset-returning) tokenizer, the pipeline's own.
    """
    check_phrases(text, phrases, what)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"phrase routing needs a fast tokenizer (with offsets), got {type(tokenizer).__name__}; "
            "load it with `AutoTokenizer.from_pretrained(..., use_fast=True)`"
        )
    text = clean_prompt(text)
    enc = tokenizer(
        text,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_offsets_mapping=True,
    )
    offsets = [(a, b) for a, b in enc["offset_mapping"]][:max_sequence_length]
    return phrase_owners_from_offsets(text, phrases, offsets, max_sequence_length, what)


def phrase_owners_from_offsets(
    text: str,
    phrases: Sequence[str],
    offsets: Sequence[tuple[int, int]],
    max_sequence_length: int,
    what: str = "prompt",
) -> list[int]:
    """The subject owning each token (``-1``: general text), from the tokens' character ``offsets`` into ``text``
    (the cleaned prompt; ``(0, 0)`` for a token that is not part of it, e.g. a chat template's). Each phrase must
    have an occurrence inside the span the tokens cover; a token may belong to one phrase only.
    """
    covered = [(a, b) for a, b in offsets if b > a]
    seen_start = min((a for a, _ in covered), default=0)
    seen_end = max((b for _, b in covered), default=0)
    owner = [-1] * len(offsets)
    for s, phrase in enumerate(phrases):
        found = phrase_spans(text, phrase)
        if not any(seen_start <= start and end <= seen_end for start, end in found):
            raise ValueError(
                f"subject {s}: phrase {phrase!r} lies past the first max_sequence_length={max_sequence_length} "
                f"tokens of the {what}, which the text encoder never sees; move it earlier or raise "
                "`max_sequence_length`"
            )
        for start, end in found:
            for t, (a, b) in enumerate(offsets):
                if b > a and a < end and b > start:
                    if owner[t] not in (-1, s):
                        raise ValueError(
                            f"subject {s}: phrase {phrase!r} shares the token {text[a:b]!r} with subject {owner[t]}'s "
                            f"phrase {phrases[owner[t]]!r}; a token can name only one subject"
                        )
                    owner[t] = s
    return owner
