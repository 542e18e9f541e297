"""Identity matching, leakage and the embedders (dlib on real photos shipped inside PyPI packages)."""

import math

import numpy as np
import pytest
from eval_synth import astronaut_face, hopper_face

from diasr_diffusers.eval import (
    ClipTextScorer,
    DlibFaceEmbedder,
    FaceEmbedder,
    InsightFaceEmbedder,
    SubjectEmbedder,
    TransformersImageEmbedder,
    identity_scores,
    leakage_margins,
    leakage_score,
    match_one_to_one,
)

RNG = np.random.default_rng(0)
A, B = RNG.normal(size=(2, 64))


def noisy(vector: np.ndarray, scale: float = 0.2) -> np.ndarray:
    return vector + scale * RNG.normal(size=vector.shape) * np.linalg.norm(vector) / 8


REFS = np.stack([A, B])
CORRECT = [np.stack([noisy(A), noisy(B)]) for _ in range(6)]


def test_hungarian_is_globally_optimal_not_greedy():
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    # Greedy would take (0, 0) first and leave subject 1 with 0.1.
    assert sorted(match_one_to_one(sim)) == [(0, 1), (1, 0)]
    assert match_one_to_one(np.zeros((2, 0))) == []
    with pytest.raises(ValueError, match="similarity"):
        match_one_to_one(np.zeros(3))


def test_swapped_identities_score_worse_than_correct_ones():
    labels = [[0, 1]] * len(CORRECT)
    correct = identity_scores(REFS, CORRECT, frame_labels=labels)
    swapped = identity_scores(REFS, [frame[::-1] for frame in CORRECT], frame_labels=labels)
    assert correct.labeled > 0.9
    assert swapped.labeled < correct.labeled - 0.5
    # Leakage: each generated subject looks like the *other* reference.
    assert correct.leakage < 0 < swapped.leakage
    matrix = np.array(swapped.leakage_matrix)
    assert matrix[0, 1] > matrix[0, 0] and matrix[1, 0] > matrix[1, 1]


def test_duplicated_identity_is_caught_one_to_one_but_not_by_max_over_pairs():
    duplicated = [np.stack([noisy(A), noisy(A)]) for _ in range(6)]  # subject B rendered with A's face
    correct = identity_scores(REFS, CORRECT)
    dup = identity_scores(REFS, duplicated)
    assert dup.one_to_one < correct.one_to_one - 0.3
    assert dup.max_over_pairs == pytest.approx(correct.max_over_pairs, abs=0.02)
    assert dup.leakage > 0 > correct.leakage  # the copy assigned to B resembles A more than B


def test_one_of_two_present_scores_worse_one_to_one_than_max_over_pairs():
    only_a = [noisy(A)[None] for _ in range(6)]
    scores = identity_scores(REFS, only_a)
    assert scores.one_to_one < scores.max_over_pairs - 0.3
    assert scores.presence == [1.0, 0.0]
    assert scores.per_subject[1] == 0.0
    assert math.isnan(scores.leakage_matrix[1][0])  # subject B was never generated


def test_frames_without_detections_count_zero():
    frames = CORRECT[:2] + [np.zeros((0, 64))] * 2
    scores = identity_scores(REFS, frames)
    full = identity_scores(REFS, CORRECT[:2])
    assert scores.one_to_one == pytest.approx(full.one_to_one / 2)
    assert scores.max_over_pairs == pytest.approx(full.max_over_pairs / 2)


def test_leakage_score_definition():
    assert leakage_score(np.array([[0.9, 0.5], [0.6, 0.8]])) == pytest.approx(-0.2)  # worst margin: 0.6 - 0.8
    assert leakage_score(np.array([[0.5, 0.9], [0.8, 0.6]])) == pytest.approx(0.4)
    # One copied subject is not averaged away by the well-separated one.
    assert leakage_score(np.array([[0.9, 0.1], [0.9, 0.1]])) == pytest.approx(0.8)
    assert leakage_margins(np.array([[0.9, 0.1], [0.9, 0.1]])) == pytest.approx([-0.8, 0.8])
    assert math.isnan(leakage_score(np.array([[0.9]])))
    with pytest.raises(ValueError, match="square"):
        leakage_score(np.zeros((2, 3)))


@pytest.mark.parametrize(
    ("refs", "frames", "labels", "match"),
    [
        (np.zeros((0, 4)), [np.zeros((1, 4))], None, "reference_embeddings"),
        (np.full((1, 4), np.nan), [np.zeros((1, 4))], None, "non-finite"),
        (np.ones((1, 4)), [], None, "frame_embeddings"),
        (np.ones((1, 4)), [np.ones((1, 4))], [[0], [0]], "frame_labels"),
        (np.ones((1, 4)), [np.ones((1, 4))], [[3]], "subject 3"),
    ],
)
def test_bad_identity_inputs(refs, frames, labels, match):
    with pytest.raises(ValueError, match=match):
        identity_scores(refs, frames, frame_labels=labels)


# ----------------------------------------------------------------------------------------------------------------
# dlib on real photos (skimage's astronaut, matplotlib's Grace Hopper)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dlib_embedder():
    return DlibFaceEmbedder()


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_dlib_same_face_shifted_and_rescaled_matches_itself(dlib_embedder):
    assert isinstance(dlib_embedder, FaceEmbedder)
    ref, moved, rescaled, other = dlib_embedder.embed(
        [astronaut_face(128), astronaut_face(128, dx=24, dy=16), astronaut_face(200), hopper_face(128)]
    )
    assert ref.shape == (128,)
    same = min(_cos(ref, moved), _cos(ref, rescaled))
    different = _cos(ref, other)
    assert same > 0.97
    assert same - different > 0.05  # dlib cosines are not centred: different people still land near 0.85
    # dlib's own same-person rule: Euclidean distance below 0.6.
    assert np.linalg.norm(ref - moved) < 0.6 < np.linalg.norm(ref - other)


def test_dlib_no_face_gives_nan_row_and_boxes_are_in_frame(dlib_embedder):
    blank = np.full((96, 96, 3), 127, np.uint8)
    rows = dlib_embedder.embed([blank])
    assert rows.shape == (1, 128) and np.isnan(rows).all()
    frame = np.concatenate([astronaut_face(128), hopper_face(128)], axis=1)  # 128 x 256, two people
    faces = dlib_embedder.detect_and_embed(frame)
    assert len(faces) == 2
    centres = sorted((x0 + x1) / 2 for (x0, _, x1, _), _ in faces)
    assert centres[0] < 128 < centres[1]


def test_dlib_video_scores_two_people_and_a_missing_one(dlib_embedder):
    refs = dlib_embedder.embed([astronaut_face(128), hopper_face(128)])
    both = np.concatenate([hopper_face(128), astronaut_face(128, dx=8)], axis=1)  # order differs from refs
    only_one = np.concatenate([astronaut_face(128, dx=8), np.full((128, 128, 3), 90, np.uint8)], axis=1)

    def embed_frames(frame, count=2):
        return [np.stack([e for _, e in dlib_embedder.detect_and_embed(frame)])] * count

    full = identity_scores(refs, embed_frames(both))
    missing = identity_scores(refs, embed_frames(only_one))
    assert full.one_to_one > 0.95 and full.leakage < 0
    assert missing.one_to_one < missing.max_over_pairs - 0.3
    assert missing.presence == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# Hub-weight embedders: local folders only, clear errors otherwise
# ----------------------------------------------------------------------------------------------------------------


def test_hub_embedders_name_what_to_download(tmp_path):
    missing = tmp_path / "nothing-here"
    with pytest.raises(FileNotFoundError, match="dinov2.*--local-dir"):
        TransformersImageEmbedder(missing)
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14"):
        ClipTextScorer(missing)
    with pytest.raises(FileNotFoundError, match="antelopev2"):
        InsightFaceEmbedder(missing)


def test_transformers_embedder_loads_a_local_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    embedder = TransformersImageEmbedder(tmp_path)
    assert isinstance(embedder, SubjectEmbedder)
    a, b = astronaut_face(64), hopper_face(64)
    emb = embedder.embed([a, b, a])
    assert emb.shape == (3, 8)
    np.testing.assert_allclose(emb[0], emb[2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(emb[0], emb[1])
