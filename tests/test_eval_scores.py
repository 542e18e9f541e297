"""TotalScore and leaderboard aggregation against published OpenS2V-Eval leaderboard rows."""

import math

import pytest

from diasr_diffusers.eval import TOTAL_SCORE_WEIGHTS, aggregate_video_scores, total_score, total_score_metrics

# Published leaderboard rows (percent): PKU-YuanGroup/OpenS2V-Nexus leaderboard/file_v1.1/results_Open-Domain.csv
# (v1.1) and leaderboard/file/results_{Open,Single,Human}-Domain.csv (v1.0). Inputs are rounded to 0.01, so a
# recomputed total may differ from the published one by ~0.01.
V11_OPEN = {  # TotalScore, Aesthetics, MotionSmoothness, MotionAmplitude, FaceSim, GmeScore, NexusScore, NaturalScore
    "Kling1.6": (56.23, 44.59, 86.93, 41.6, 40.1, 66.2, 45.89, 74.59),
    "MAGREF-480P": (52.51, 45.02, 93.17, 21.81, 30.83, 70.47, 43.04, 66.9),
    "VACE-P1.3B": (48.98, 47.34, 96.8, 12.03, 16.59, 71.38, 40.19, 64.31),
    "Phantom-14B": (56.77, 46.39, 96.31, 33.42, 51.46, 70.65, 37.43, 69.35),
    "SkyReels-A2-P14B": (52.25, 39.41, 87.93, 25.6, 45.95, 64.54, 43.75, 60.32),
    "Pika2.1": (51.88, 46.88, 87.06, 24.71, 30.38, 69.19, 45.4, 63.32),
    "Vidu2.0": (51.95, 41.48, 90.45, 13.52, 35.11, 67.57, 43.37, 65.88),
    "Phantom-1.3B": (54.89, 46.67, 93.3, 14.29, 48.56, 69.43, 42.48, 62.5),
    "VACE-1.3B": (49.89, 48.24, 97.2, 18.83, 20.57, 71.26, 37.91, 65.46),
    "VACE-14B": (57.55, 47.21, 94.97, 15.02, 55.09, 67.27, 44.08, 67.04),
    "BindWeave": (57.61, 45.55, 95.90, 13.91, 53.71, 67.79, 46.84, 66.85),
    "Saber": (57.91, 42.42, 96.12, 21.12, 49.89, 67.50, 47.22, 72.55),
    "VINO": (57.85, 45.92, 94.73, 12.30, 52.00, 69.69, 42.67, 71.99),
    "RefAlign-1.3B": (56.30, 42.96, 94.74, 20.74, 53.06, 66.85, 43.97, 66.25),
    "RefAlign-14B": (60.42, 46.84, 97.61, 22.48, 55.23, 68.32, 48.52, 73.63),
}
V10_OPEN = {  # TotalScore, Aesthetics, Motion, FaceSim, GmeScore, NexusScore, NaturalScore
    "Vidu2.0": (47.59, 41.47, 13.52, 35.11, 67.57, 43.55, 71.44),
    "Pika2.1": (48.88, 46.87, 24.70, 30.80, 69.21, 45.41, 69.79),
    "Kling1.6": (54.46, 44.60, 41.60, 40.10, 66.20, 45.92, 79.06),
    "VACE-P1.3B": (43.95, 47.27, 12.03, 16.58, 71.38, 40.04, 70.56),
    "VACE-1.3B": (45.53, 48.24, 18.83, 20.58, 71.26, 37.95, 71.78),
    "VACE-14B": (52.87, 47.21, 15.02, 55.09, 67.27, 44.20, 72.78),
    "Phantom-1.3B": (50.71, 46.67, 14.29, 48.55, 69.43, 42.44, 70.26),
    "SkyReels-A2-P14B": (49.61, 39.40, 25.60, 45.95, 64.54, 43.77, 67.22),
    "Phantom-14B": (52.32, 46.39, 33.42, 51.48, 70.65, 37.43, 68.66),
    "MAGREF-480P": (47.93, 45.02, 21.81, 30.83, 70.47, 43.04, 69.49),
}
V10_SINGLE = {  # same columns as V10_OPEN
    "Vidu2.0": (48.67, 34.78, 24.40, 36.20, 65.56, 45.20, 72.60),
    "Pika2.1": (48.93, 38.64, 31.90, 32.94, 62.19, 47.34, 70.60),
    "Kling1.6": (53.12, 35.63, 36.40, 39.26, 61.99, 48.24, 81.40),
    "VACE-P1.3B": (44.28, 42.58, 18.00, 18.02, 65.93, 36.26, 76.00),
    "VACE-1.3B": (47.33, 41.81, 33.78, 22.38, 65.35, 38.52, 76.00),
    "VACE-14B": (58.00, 41.30, 35.54, 64.65, 58.55, 51.33, 77.33),
    "Phantom-1.3B": (49.95, 42.98, 19.30, 44.03, 65.61, 37.78, 76.00),
    "SkyReels-A2-P14B": (51.64, 33.83, 21.60, 54.42, 61.93, 48.63, 70.60),
    "HunyuanCustom": (51.64, 34.08, 26.83, 55.93, 54.31, 50.75, 68.66),
    "Phantom-14B": (53.17, 47.46, 41.55, 51.82, 70.07, 35.35, 69.35),
    "MAGREF-480P": (49.13, 46.31, 27.43, 33.77, 69.02, 42.45, 69.81),
}
# TotalScore, Aesthetics, Motion, FaceSim, GmeScore, NaturalScore. Left out: EchoVideo, whose published total
# (54.52) is 0.09 above its own row's weighted sum (54.43) -- a leaderboard inconsistency, not rounding.
V10_HUMAN = {
    "Vidu2.0": (51.11, 47.33, 14.80, 38.50, 70.42, 71.99),
    "Pika2.1": (52.56, 52.39, 28.94, 29.41, 75.03, 72.53),
    "Kling1.6": (59.13, 50.94, 50.55, 41.02, 67.79, 78.28),
    "VACE-P1.3B": (46.28, 51.45, 8.78, 19.98, 73.27, 70.89),
    "VACE-1.3B": (49.02, 53.18, 16.87, 22.29, 73.61, 73.00),
    "VACE-14B": (58.57, 52.78, 11.76, 64.65, 69.53, 74.33),
    "Phantom-1.3B": (53.64, 50.80, 14.14, 46.30, 72.17, 71.67),
    "SkyReels-A2-P14B": (54.27, 39.88, 31.98, 55.02, 63.63, 67.33),
    "HunyuanCustom": (55.85, 49.67, 15.13, 62.25, 69.78, 67.00),
    "Hailuo": (60.20, 52.75, 31.83, 57.79, 71.42, 74.52),
    "ConsisID": (52.97, 41.76, 38.12, 43.14, 72.03, 64.67),
    "Concat-ID-CogVideoX": (53.32, 44.13, 31.76, 43.83, 73.67, 66.44),
    "FantasyID": (49.80, 45.60, 23.48, 32.42, 72.68, 68.11),
    "VideoMaker": (52.31, 31.76, 50.09, 76.45, 45.28, 47.08),
    "ID-Animator": (43.37, 42.03, 33.54, 31.56, 52.91, 54.03),
    "Phantom-14B": (58.69, 49.14, 41.24, 55.02, 72.55, 68.33),
    "Concat-ID-Wan-AdaLN": (53.18, 43.13, 17.19, 50.05, 71.90, 69.44),
}
V11_COLS = ("Aesthetics", "MotionSmoothness", "MotionAmplitude", "FaceSim", "GmeScore", "NexusScore", "NaturalScore")
V10_COLS = ("Aesthetics", "Motion", "FaceSim", "GmeScore", "NexusScore", "NaturalScore")
V10_HUMAN_COLS = ("Aesthetics", "Motion", "FaceSim", "GmeScore", "NaturalScore")
TOL = 0.015  # percentage points: rounding of 6-7 published inputs plus the published total


def test_kling_v11_open_row_from_brief():
    row = dict(zip(V11_COLS, V11_OPEN["Kling1.6"][1:]))
    assert total_score(row, version="v1.1", domain="open") == pytest.approx(56.23, abs=0.005)


@pytest.mark.parametrize("model", sorted(V11_OPEN))
def test_v11_open_rows(model):
    published, *values = V11_OPEN[model]
    assert total_score(dict(zip(V11_COLS, values)), "v1.1", "open") == pytest.approx(published, abs=TOL)


@pytest.mark.parametrize(
    ("table", "domain", "cols"),
    [(V10_OPEN, "open", V10_COLS), (V10_SINGLE, "single", V10_COLS), (V10_HUMAN, "human", V10_HUMAN_COLS)],
    ids=["open", "single", "human"],
)
def test_v10_rows(table, domain, cols):
    for model, (published, *values) in table.items():
        got = total_score(dict(zip(cols, values)), version="v1.0", domain=domain)
        assert got == pytest.approx(published, abs=TOL), model


def test_weights_are_published_ones():
    for version, domains in TOTAL_SCORE_WEIGHTS.items():
        for domain, weights in domains.items():
            assert math.isclose(sum(weights.values()), 1.0), (version, domain)
    assert "NexusScore" not in TOTAL_SCORE_WEIGHTS["v1.1"]["human"]
    assert TOTAL_SCORE_WEIGHTS["v1.1"]["human"]["FaceSim"] == 0.25
    assert TOTAL_SCORE_WEIGHTS["v1.1"]["single"] == TOTAL_SCORE_WEIGHTS["v1.1"]["open"]


def test_v11_human_ignores_nexus_and_uses_its_weights():
    row = dict(zip(V11_COLS, V11_OPEN["Kling1.6"][1:]))
    human = total_score(row, version="v1.1", domain="human")
    expected = 0.18 * 44.59 + 0.09 * 86.93 + 0.03 * 41.6 + 0.25 * 40.1 + 0.15 * 66.2 + 0.30 * 74.59
    assert human == pytest.approx(expected)
    row.pop("NexusScore")
    assert total_score(row, version="v1.1", domain="Human-Domain") == pytest.approx(expected)


def test_missing_metrics_are_all_listed():
    with pytest.raises(ValueError) as info:
        total_score({"Aesthetics": 0.4, "FaceSim": 0.5}, version="v1.1", domain="open")
    message = str(info.value)
    for name in ("MotionSmoothness", "MotionAmplitude", "GmeScore", "NexusScore", "NaturalScore"):
        assert name in message
    assert "'Aesthetics'" not in message.split("missing:")[1]


def test_aliases_arrows_and_v10_motion_amplitude():
    row = {f"{k}↑": v for k, v in zip(V11_COLS, V11_OPEN["Kling1.6"][1:])}
    assert total_score(row) == pytest.approx(56.23, abs=0.005)
    raw_keys = dict(zip(("aes_score", "motion_smoothness", "motion_amplitude", "facesim_cur", "gme_score",
                         "nexus_score", "natural_score"), V11_OPEN["Kling1.6"][1:]))  # fmt: skip
    assert total_score(raw_keys) == pytest.approx(56.23, abs=0.005)
    v10 = dict(zip(V10_COLS, V10_OPEN["Kling1.6"][1:]))
    v10["MotionAmplitude"] = v10.pop("Motion")
    assert total_score(v10, version="v1.0") == pytest.approx(54.46, abs=TOL)


@pytest.mark.parametrize(("version", "domain"), [("v2", "open"), ("v1.1", "moon")])
def test_bad_version_or_domain(version, domain):
    with pytest.raises(ValueError, match="version|domain"):
        total_score({}, version=version, domain=domain)


def test_non_finite_metric_rejected():
    row = dict(zip(V11_COLS, V11_OPEN["Kling1.6"][1:]))
    row["GmeScore"] = float("nan")
    with pytest.raises(ValueError, match="GmeScore"):
        total_score(row)


def test_metric_lists():
    assert total_score_metrics("v1.1", "open") == V11_COLS
    assert total_score_metrics("v1.0", "human") == V10_HUMAN_COLS


def test_aggregation_clamps_and_normalises_like_opens2v():
    per_video = {
        "a": {
            "aes_score": 3.0,
            "motion_amplitude": -0.4,
            "nexus_score": 0.0,
            "naturalscore_1": 5,
            "naturalscore_2": 3,
        },
        "b": {"aes_score": 8.0, "motion_amplitude": 2.0, "nexus_score": 0.08, "natural_score": 0.5},
        "c": {"aes_score": 5.5, "motion_amplitude": 0.1, "nexus_score": 0.02, "facesim_cur": 1.2},
    }
    got = aggregate_video_scores(per_video)
    assert got["Aesthetics"] == pytest.approx(((4 + 7 + 5.5) / 3 - 4) / 3)  # clamped to [4, 7]
    assert got["MotionAmplitude"] == pytest.approx((0.4 + 1.0 + 0.1) / 3)  # abs, capped at 1
    assert got["NexusScore"] == pytest.approx(((0.05 + 0.02) / 2) / 0.05)  # zero left out, capped at 0.05
    assert got["NaturalScore"] == pytest.approx(((4 + 1) / 2 - 1) / 4)  # judges averaged, clamped to [1, 5]
    assert got["FaceSim"] == pytest.approx(1.0)
    assert "GmeScore" not in got
    assert aggregate_video_scores([{"motion_amplitude": 0.2}]) == {"MotionAmplitude": pytest.approx(0.2)}


def test_aggregation_then_total_score_matches_hand_computation():
    video = {"aes_score": 5.5, "motion_smoothness": 0.9, "motion_amplitude": 0.3, "facesim_cur": 0.4,
             "gme_score": 0.7, "nexus_score": 0.025, "natural_score": 4.0}  # fmt: skip
    board = aggregate_video_scores({"x": video})
    expected = 0.16 * 0.5 + 0.06 * 0.9 + 0.02 * 0.3 + 0.20 * 0.4 + 0.12 * 0.7 + 0.20 * 0.5 + 0.24 * 0.75
    assert total_score(board) == pytest.approx(expected)


def test_aggregation_rejects_bad_entries():
    with pytest.raises(ValueError, match="per_video"):
        aggregate_video_scores({"a": 0.3})
