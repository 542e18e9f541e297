"""OpenS2V-Eval score aggregation and TotalScore.

Two steps, as in the OpenS2V-Eval leaderboard:

1. :func:`aggregate_video_scores` turns raw per-video scores into the leaderboard's normalised metrics: each video
   is clamped to the metric's range, videos are averaged, and the average is min-max normalised
   (Aesthetics: aesthetic predictor output clamped to [4, 7]; MotionAmplitude / MotionSmoothness / FaceSim /
   GmeScore capped at 1; NexusScore capped at 0.05 with zero scores left out; NaturalScore: the mean of the GPT-4o
   judges, clamped to [1, 5]).
2. :func:`total_score` is the weighted sum of those normalised metrics with the published weights of the
   leaderboard version and domain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

VERSIONS = ("v1.0", "v1.1")
DOMAINS = ("open", "single", "human")

# Published weights. Open-Domain and Single-Domain share them; Human-Domain has no NexusScore.
TOTAL_SCORE_WEIGHTS: dict[str, dict[str, dict[str, float]]] = {
    "v1.1": {
        "open": {
            "Aesthetics": 0.16,
            "MotionSmoothness": 0.06,
            "MotionAmplitude": 0.02,
            "FaceSim": 0.20,
            "GmeScore": 0.12,
            "NexusScore": 0.20,
            "NaturalScore": 0.24,
        },
        "human": {
            "Aesthetics": 0.18,
            "MotionSmoothness": 0.09,
            "MotionAmplitude": 0.03,
            "FaceSim": 0.25,
            "GmeScore": 0.15,
            "NaturalScore": 0.30,
        },
    },
    "v1.0": {
        "open": {
            "Aesthetics": 0.12,
            "Motion": 0.12,
            "FaceSim": 0.20,
            "GmeScore": 0.12,
            "NexusScore": 0.20,
            "NaturalScore": 0.24,
        },
        "human": {"Aesthetics": 0.15, "Motion": 0.15, "FaceSim": 0.25, "GmeScore": 0.15, "NaturalScore": 0.30},
    },
}
for _version in TOTAL_SCORE_WEIGHTS.values():
    _version["single"] = dict(_version["open"])

# Other spellings accepted by `total_score`: OpenS2V's own JSON keys, and v1.0's "Motion" (the same Farneback
# amplitude v1.1 calls MotionAmplitude).
_ALIASES = {
    "aes_score": "Aesthetics",
    "AestheticScore": "Aesthetics",
    "motion_smoothness": "MotionSmoothness",
    "motion_amplitude": "MotionAmplitude",
    "facesim_cur": "FaceSim",
    "FaceSim-Cur": "FaceSim",
    "gme_score": "GmeScore",
    "nexus_score": "NexusScore",
    "natural_score": "NaturalScore",
}

# Raw per-video key -> (leaderboard name, lower clamp, upper clamp, normalisation min, normalisation max).
_RAW_METRICS = {
    "aes_score": ("Aesthetics", 4.0, 7.0, 4.0, 7.0),
    "motion_amplitude": ("MotionAmplitude", None, 1.0, 0.0, 1.0),
    "motion_smoothness": ("MotionSmoothness", None, 1.0, 0.0, 1.0),
    "facesim_cur": ("FaceSim", None, 1.0, 0.0, 1.0),
    "gme_score": ("GmeScore", None, 1.0, 0.0, 1.0),
    "nexus_score": ("NexusScore", None, 0.05, 0.0, 0.05),
    "natural_score": ("NaturalScore", 1.0, 5.0, 1.0, 5.0),
}
RAW_METRIC_KEYS = tuple(_RAW_METRICS)


def _canonical(name: str) -> str:
    name = name.strip().rstrip("↑").strip()
    return _ALIASES.get(name, name)


def _check_version_domain(version: str, domain: str) -> tuple[str, str]:
    if version not in VERSIONS:
        raise ValueError(f"`version` must be one of {VERSIONS}, got {version!r}")
    domain_key = domain.lower().removesuffix("-domain").removesuffix("_domain")
    if domain_key not in DOMAINS:
        raise ValueError(f"`domain` must be one of {DOMAINS} (or 'Open-Domain' etc.), got {domain!r}")
    return version, domain_key


def total_score_metrics(version: str = "v1.1", domain: str = "open") -> tuple[str, ...]:
    """Leaderboard metric names that TotalScore needs for ``version`` and ``domain``.

    Example:
        >>> total_score_metrics("v1.0", "human")
        ('Aesthetics', 'Motion', 'FaceSim', 'GmeScore', 'NaturalScore')
    """
    version, domain = _check_version_domain(version, domain)
    return tuple(TOTAL_SCORE_WEIGHTS[version][domain])


def total_score(metrics: Mapping[str, float], version: str = "v1.1", domain: str = "open") -> float:
    """OpenS2V-Eval TotalScore: the published weighted sum of normalised leaderboard metrics.

    Args:
        metrics: leaderboard metric name -> normalised value (``"Aesthetics"``, ``"MotionSmoothness"``,
            ``"MotionAmplitude"``, ``"FaceSim"``, ``"GmeScore"``, ``"NexusScore"``, ``"NaturalScore"``; v1.0 uses
            ``"Motion"`` for the amplitude, and ``"MotionAmplitude"`` is accepted there too). A trailing ``↑`` and
            OpenS2V's JSON keys (``aes_score``, ``facesim_cur``...) are accepted. Fractions or percentages both
            work as long as all values use the same unit; the result is in that unit. Extra keys are ignored.
        version: ``"v1.0"`` or ``"v1.1"`` (v1.1 added MotionSmoothness).
        domain: ``"open"``, ``"single"`` or ``"human"`` (Human-Domain has no NexusScore).

    Raises:
        ValueError: unknown version/domain, or metrics the formula needs are missing (all of them are listed).

    Example (Kling-1.6, v1.1 Open-Domain leaderboard row):
        >>> row = {"Aesthetics": 44.59, "MotionSmoothness": 86.93, "MotionAmplitude": 41.6, "FaceSim": 40.1,
        ...        "GmeScore": 66.2, "NexusScore": 45.89, "NaturalScore": 74.59}
        >>> round(total_score(row, version="v1.1", domain="open"), 2)
        56.23
    """
    version, domain = _check_version_domain(version, domain)
    weights = TOTAL_SCORE_WEIGHTS[version][domain]
    values: dict[str, float] = {}
    for key, value in metrics.items():
        name = _canonical(key)
        if version == "v1.0" and name == "MotionAmplitude":
            name = "Motion"
        if value is not None:
            values[name] = float(value)
    missing = [name for name in weights if name not in values]
    if missing:
        raise ValueError(
            f"TotalScore {version} ({domain} domain) needs metrics {list(weights)}; missing: {missing}. "
            "GmeScore, NexusScore, NaturalScore, Aesthetics, MotionSmoothness and FaceSim (CurricularFace) need hub "
            "weights or GPT-4o: pass them precomputed."
        )
    not_finite = [name for name in weights if not np.isfinite(values[name])]
    if not_finite:
        raise ValueError(f"TotalScore metrics must be finite numbers; not finite: {not_finite}")
    return float(sum(weight * values[name] for name, weight in weights.items()))


def aggregate_video_scores(
    per_video: Mapping[str, Mapping[str, float]] | Iterable[Mapping[str, float]],
) -> dict[str, float]:
    """Leaderboard metrics (fractions in ``[0, 1]``) from raw per-video OpenS2V-Eval scores.

    Args:
        per_video: ``{video_id: {raw_key: value}}`` (or an iterable of the inner dicts) with any of the raw keys
            ``aes_score`` (LAION aesthetic predictor, ~[1, 10]), ``motion_amplitude`` (``motion_fb``),
            ``motion_smoothness``, ``facesim_cur``, ``gme_score``, ``nexus_score``, ``natural_score`` (GPT-4o,
            1-5; or ``naturalscore_1..3``, averaged like OpenS2V-Eval does).

    Returns:
        ``{leaderboard name: normalised mean}`` for every metric at least one video has. Multiply by 100 for the
        leaderboard's percentages.

    Example:
        >>> aggregate_video_scores({"a": {"motion_amplitude": 0.3}, "b": {"motion_amplitude": 2.5}})
        {'MotionAmplitude': 0.65}
    """
    videos = list(per_video.values()) if isinstance(per_video, Mapping) else list(per_video)
    totals: dict[str, list[float]] = {}
    for index, scores in enumerate(videos):
        if not isinstance(scores, Mapping):
            raise ValueError(f"`per_video` entry {index} must be a mapping of raw scores, got {type(scores).__name__}")
        scores = dict(scores)
        judges = [float(scores[k]) for k in ("naturalscore_1", "naturalscore_2", "naturalscore_3") if k in scores]
        if judges and "natural_score" not in scores:
            scores["natural_score"] = sum(judges) / len(judges)
        for key, (_name, low, high, _, _) in _RAW_METRICS.items():
            if scores.get(key) is None:
                continue
            value = float(scores[key])
            if key in ("motion_amplitude", "motion_smoothness"):
                value = abs(value)
            if key == "nexus_score" and value == 0:
                continue  # OpenS2V-Eval leaves videos where no subject was detected out of NexusScore
            value = min(value, high)
            if low is not None:
                value = max(value, low)
            totals.setdefault(key, []).append(value)
    result = {}
    for key, values in totals.items():
        name, _, _, norm_low, norm_high = _RAW_METRICS[key]
        result[name] = (float(np.mean(values)) - norm_low) / (norm_high - norm_low)
    return result
