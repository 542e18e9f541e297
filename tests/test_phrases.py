"""One source of truth for phrase matching: the rules themselves, and that manifest validation, the dataset, the
trainer and the pipeline accept and reject the same captions."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _data_fixtures import square_clip, write_jsonl

from diasr_diffusers import DiasRPipeline
from diasr_diffusers.data import MuSADataset, load_manifest
from diasr_diffusers.data.manifest import parse_record
from diasr_diffusers.pipelines.subjects import SubjectPipelineMixin
from diasr_diffusers.routing import phrase_problems, phrase_spans, phrase_token_owners
from diasr_diffusers.training.trainer import DiasRTrainer
from diasr_diffusers.utils.tiny import tiny_tokenizer, tiny_wan_components

# (caption, phrases, the phrase of the first problem or None when routable)
CASES = [
    ("the man and the woman dance", ["the man", "the woman"], None),
    ("The  MAN and the woman dance", ["the man", "the woman"], None),  # case and whitespace runs
    ("a squarefish and the solid green square", ["the solid green square"], None),
    ("a solid green squarefish swims", ["solid green square"], "solid green square"),  # only inside a word
    ("the manatee swims", ["the man"], "the man"),
    ("the man's dog and the man", ["the man", "the man's dog"], "the man's dog"),  # overlapping spans
    ("the man and the woman", ["the man", "The Man"], "The Man"),  # identical phrases
    ("a dog runs", ["a cat"], "a cat"),
]


@pytest.fixture(scope="module")
def pipe():
    return DiasRPipeline(**tiny_wan_components())


def test_whole_words_case_and_whitespace():
    assert phrase_spans("A squarefish and a square.", "a square") == [(17, 25)]
    assert phrase_spans("the  Red\tstar", "the red star") == [(0, 13)]
    assert phrase_spans("anything", "   ") == []


@pytest.mark.parametrize("caption, phrases, bad", CASES)
def test_validation_and_pipeline_agree(pipe, caption, phrases, bad):
    record = {"video": "v.mp4", "caption": caption}
    record["subjects"] = [{"phrase": p, "references": ["r.png"], "masks": {"npz": "m.npz"}} for p in phrases]
    parsed, problems = parse_record(record, Path("."), 1)
    subjects = [[np.zeros((8, 8, 3), dtype=np.float32)] for _ in phrases]
    args = ([caption], subjects, phrases, None, 9, 32, 32, "similarity", 512)
    if bad is None:
        assert problems == [] and parsed is not None
        pipe.check_subject_inputs(*args)
        pipe._text_routing([caption], phrases, 512, 1)
    else:
        index = phrases.index(bad)
        assert parsed is None and len(problems) == 1 and problems[0].startswith(f"subject {index}: phrase {bad!r}")
        with pytest.raises(ValueError, match=f"subject {index}: phrase {bad!r}"):
            pipe.check_subject_inputs(*args)


def test_problem_messages_say_what_is_wrong():
    (inside,) = phrase_problems("a solid green squarefish swims", ["solid green square"])
    assert "whole words" in inside and "'solid green squarefish'" in inside
    (overlap,) = phrase_problems("the man's dog and the man", ["the man", "the man's dog"], what="caption")
    assert "overlaps subject 0's phrase 'the man'" in overlap and "caption" in overlap
    (same,) = phrase_problems("the man walks", ["the man", "The  man"])
    assert "used by another subject (subject 0)" in same
    assert phrase_problems("x", [None, 3]) == ["subject 1: phrase must be a non-empty string, got 3"]


CAPTION = "one two three four five six seven eight nine ten and a red star"  # "a red star": tokens 11..13


def test_phrase_past_max_sequence_length():
    tok = tiny_tokenizer()
    owner = phrase_token_owners(CAPTION, ["one two", "a red star"], tok, 16)
    assert owner[:2] == [0, 0] and owner[11:14] == [1, 1, 1] and owner.count(-1) == 16 - 5
    with pytest.raises(ValueError, match=r"subject 1: phrase 'a red star' lies past .*max_sequence_length=13"):
        phrase_token_owners(CAPTION, ["one two", "a red star"], tok, 13)  # the EOS takes the 13th position


def test_pipeline_refuses_a_phrase_past_max_sequence_length_before_encoding(pipe, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the prompt was encoded before the phrases were checked")

    monkeypatch.setattr(pipe, "encode_prompt", never)
    with pytest.raises(ValueError, match="subject 0: phrase 'a red star' lies past"):
        pipe(CAPTION, subject_images=[np.zeros((8, 8, 3), np.float32)], subject_phrases=["a red star"],
             height=32, width=32, num_frames=9, max_sequence_length=8)  # fmt: skip


def test_dataset_and_trainer_skip_what_the_pipeline_cannot_route(tmp_path):
    good = square_clip(tmp_path, "good")
    (record,) = load_manifest(write_jsonl(tmp_path / "m.jsonl", [good])).records
    fishy = dataclasses.replace(record, caption="A red squarefish and a blue square on grey.", line=2)
    kw = dict(num_frames=9, height=32, width=32)
    ds = MuSADataset([record, fishy], **kw)
    assert len(ds) == 1 and ds.num_skipped == 1 and "'A red squarefish'" in ds.skipped_reasons[0]
    with pytest.raises(ValueError, match="line 2: subject 0: phrase 'a red square'"):
        MuSADataset([record, fishy], skip_invalid=False, **kw)

    far = dataclasses.replace(record, caption="Far below on grey " * 3 + record.caption, line=3)
    pipe = SimpleNamespace(tokenizer=tiny_tokenizer())
    pipe.phrase_owners = functools.partial(SubjectPipelineMixin.phrase_owners, pipe)  # the pipeline's own matcher
    trainer = SimpleNamespace(pipe=pipe, skipped_records=0, config=SimpleNamespace(max_sequence_length=12))
    assert DiasRTrainer._routable(trainer, [record, far]) == [record]
    assert trainer.skipped_records == 1
