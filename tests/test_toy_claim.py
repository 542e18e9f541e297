"""benchmarks/toy_claim.py end to end on a tiny in-process run: two rendered clips, a tiny saved pipeline, scored by
the shipped sprite identity embedder (``diasr_diffusers.eval.sprites``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diasr_diffusers import DiasRPipeline, IDRouter
from diasr_diffusers.data import make_synthetic
from diasr_diffusers.utils.tiny import tiny_wan_components

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("toy_claim", ROOT / "benchmarks" / "toy_claim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


toy_claim = _load_benchmark()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_claim")
    geometry = dict(num_frames=5, height=32, width=32)
    make_synthetic(root / "test", num_clips=2, seed=3, subjects=(2, 3), **geometry)
    make_synthetic(root / "train", num_clips=4, seed=1, subjects=(1, 3), **geometry)
    comps = tiny_wan_components(vae="sprites", patch_size=(1, 1, 1))  # the real token grid: 4x spatial, 2x temporal
    router = IDRouter.from_transformer(comps["transformer"], router_dim=16, num_identity_queries=2, num_heads=2)
    DiasRPipeline(**comps, id_router=router).save_pretrained(root / "pipeline")
    return root


def _all_stats(node):
    """Every ``{"mean", "low", "high", "n"}`` dict in a result."""
    if isinstance(node, dict):
        if {"mean", "low", "high", "n"} <= set(node):
            yield node
        else:
            for v in node.values():
                yield from _all_stats(v)


def test_cli_writes_table_json_strips_and_only_its_markdown_section(tiny_run, tmp_path):
    doc = tmp_path / "toy_model.md"
    doc.write_text("# Toy model\n\nAnother helper's section.\n", encoding="utf-8")
    out = tmp_path / "out"
    args = [
        "--routed", str(tiny_run / "pipeline"), "--dense", str(tiny_run / "pipeline"),
        "--test-data", str(tiny_run / "test"), "--train-data", str(tiny_run / "train"),
        "--clips", "2", "--sigmas", "0.6,0.95", "--steps", "2", "--full-steps", "1", "--resamples", "200",
        "--noise-methods", "router,masks,dense", "--located-every", "5",
        "--num-frames", "5", "--height", "32", "--width", "32", "--max-sequence-length", "64",
        "--out", str(out), "--out-md", str(doc), "--strips", str(tmp_path / "strips"), "--num-strips", "1",
    ]  # fmt: skip
    toy_claim.main(args)

    result = json.loads((out / "toy_claim.json").read_text())
    assert set(result["partial"]) == set(toy_claim.DEFAULT_METHODS)
    for method in toy_claim.DEFAULT_METHODS:
        assert set(result["partial"][method]["by_sigma"]) == {"0.6", "0.95"}
        assert set(result["partial"][method]["overall"]) == set(toy_claim.METRICS)
    assert set(result["paired_vs_dense"]) == {"router - dense", "similarity - dense", "masks - dense"}
    assert set(result["ceilings"]) == {"ground_truth", "reconstruction"}
    noise = result["from_noise"]
    assert set(noise["table"]) == {"router", "masks", "dense", *toy_claim.NOISE_CALIBRATION}
    assert set(noise["table"]["router"]) == {"layout", "routed", "located"}
    assert set(noise["table"]["dense"]) == {"layout", "located"}  # no routing maps
    assert set(noise["paired_vs_dense"]) == {"router - dense", "masks - dense"}
    assert noise["config"]["clips"] == 2 and noise["config"]["steps"] == 1
    assert [t["scoring"] for t in noise["targets"]] == ["layout", "layout", "located", "routed"]
    assert set(result["routing_iou_last_step"]) == {"router", "similarity", "masks"}
    # Routing by the ground-truth masks reproduces the ground-truth token labels.
    assert result["routing_iou_last_step"]["masks"]["overall"]["mean"] == pytest.approx(1.0)
    assert result["config"]["steps_per_sigma"] == {"0.6": 1, "0.95": 2}
    assert len(result["per_clip"]) == 2 and result["config"]["clips"] == 2
    assert result["novelty"]["train_clips"] == 4
    assert 0 <= result["novelty"]["pairs"]["seen"] <= result["novelty"]["pairs"]["total"]
    stats = list(_all_stats(result))
    assert stats and any(s["mean"] is not None for s in stats)
    for s in stats:
        if s["mean"] is not None:
            assert s["low"] - 1e-12 <= s["mean"] <= s["high"] + 1e-12, s
            assert 1 <= s.get("clips", s["n"]) <= 2
    assert result["ceilings"]["ground_truth"]["id_sim"]["mean"] > 0.5  # crops of the real frames match their refs

    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Toy model\n\nAnother helper's section.\n")
    assert text.count(toy_claim.MARK_START) == 1 and text.count(toy_claim.MARK_END) == 1
    assert "| DiasR, trained router |" in text and "benchmarks/toy_claim.py" in text
    assert text.count(toy_claim.NOISE_MARK_START) == 1 and "**From pure noise.**" in text
    for line in (out / "toy_claim.md").read_text(encoding="utf-8").splitlines():
        assert line in text  # both sections, each between its own markers
    strips = list((tmp_path / "strips").glob("*.png"))
    assert len(strips) == 1 and "strips/" + strips[0].name in text


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    values = [0.1, 0.9, 0.4, 0.7, 0.35]
    a = toy_claim.bootstrap_ci(values, resamples=500, seed=3)
    assert a["low"] <= a["mean"] <= a["high"] and a["mean"] == pytest.approx(np.mean(values)) and a["n"] == 5
    assert toy_claim.bootstrap_ci(values, resamples=500, seed=3) == a
    assert toy_claim.bootstrap_ci([None, 0.5], seed=0) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 1}
    assert toy_claim.bootstrap_ci([], seed=0)["mean"] is None


def test_marked_section_is_replaced_in_place(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"top\n{toy_claim.MARK_START}\nold\n{toy_claim.MARK_END}\nbottom\n", encoding="utf-8")
    toy_claim.update_marked_section(doc, "new table\n")
    assert doc.read_text() == f"top\n{toy_claim.MARK_START}\nnew table\n{toy_claim.MARK_END}\nbottom\n"
    doc.write_text(f"top\n{toy_claim.MARK_START}\nno end\n", encoding="utf-8")
    with pytest.raises(ValueError, match="broken <!-- toy_claim:start --> section"):
        toy_claim.update_marked_section(doc, "x")


# ---------------------------------------------------------------------------------------------------------------------
# From pure noise: the metric plumbing, on a geometry unlike the sprite model's (random 8x / 4x VAE)


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_claim_noise")
    # 64x64 as the embedder was trained; 2-3 subjects, so every clip is scored.
    make_synthetic(root / "test", num_clips=2, seed=3, subjects=(2, 3), num_frames=5, height=64, width=64)
    comps = tiny_wan_components(patch_size=(1, 1, 1))  # random VAE: 8x spatial, 4x temporal, so 8x8-pixel tokens
    router = IDRouter.from_transformer(comps["transformer"], router_dim=16, num_identity_queries=2, num_heads=2)
    pipe = DiasRPipeline(**comps, id_router=router)
    settings = toy_claim.ClaimSettings(
        num_frames=5, height=64, width=64, full_steps=1, resamples=300, located_every=5, seed=5,
        noise_methods=("router", "masks", "dense"),
    )  # fmt: skip
    return root, pipe, settings


def _ground_truth(clip):
    return toy_claim._to_uint8((clip.video.movedim(0, -1).numpy() + 1) / 2)


def test_from_noise_scores_a_perfect_generator_as_the_ground_truth(noise_run):
    root, pipe, settings = noise_run
    noises, clips = {}, {}

    def generate(method, clip, noise, sigmas):
        clips[clip.clip_id] = clip
        noises.setdefault(clip.clip_id, {})[method] = noise.clone()
        assert sigmas == [1.0]  # one step from pure noise
        if method == "masks":  # perfect: the clip itself, routed exactly as its layout says
            return _ground_truth(clip), clip.token_labels.reshape(pipe_grid(pipe, clip))
        if method == "router":  # routes every token to null: no subject placed anywhere
            return _ground_truth(clip), torch.full(pipe_grid(pipe, clip), -1)
        # "dense": the next clip's frames, exactly what the `other_clip` floor scores
        return generate.others[clip.clip_id], None

    dataset, data = toy_claim._load_clips(pipe, root / "test", None, settings, multi_subject=True)
    generate.others = {c.clip_id: _ground_truth(data[(k + 1) % len(data)]) for k, c in enumerate(data)}
    result = toy_claim.run_from_noise(
        pipe, pipe, root / "test", clips=None, settings=settings,
        progress=False, generate=generate,
    )  # fmt: skip
    table = result["table"]
    assert result["config"]["clips"] == 2 and result["config"]["methods"] == ["router", "masks", "dense"]
    # Same noise for every method of a clip, other noise for other clips.
    for per_method in noises.values():
        first = next(iter(per_method.values()))
        assert all(torch.equal(first, n) for n in per_method.values())
    assert not torch.equal(*[noises[c]["masks"] for c in noises])

    perfect, truth = table["masks"], table["ground_truth"]
    for scoring in ("layout", "located"):
        assert perfect[scoring] == truth[scoring]  # the same frames score the same, interval included
        assert perfect[scoring]["id_match"]["mean"] == 1.0  # every subject: its own reference is best
        assert perfect[scoring]["id_sim"]["mean"] > perfect[scoring]["leak_sim"]["mean"] + 0.2
        assert table["dense"][scoring] == table["other_clip"][scoring]
    assert table["dense"]["layout"]["id_match"]["mean"] < 0.8  # another clip's sprites are not these subjects
    assert perfect["layout"]["color_acc"]["mean"] > 0.8 and perfect["layout"]["shape_acc"]["mean"] > 0.3
    # Its routing maps are the layout's token labels: in pixels they cover the layout masks (at token resolution).
    assert perfect["routed"]["id_match"]["n"] == result["config"]["subjects"]
    for clip in data:
        routed = toy_claim.routed_pixel_masks(clip.token_labels.reshape(pipe_grid(pipe, clip)), clip.num_subjects,
                                              5, 64, 64, pipe.vae_scale_factor_temporal)  # fmt: skip
        layout = clip.masks.numpy()
        owns_tokens = np.asarray([(clip.token_labels == s).any() for s in range(clip.num_subjects)])
        assert routed.shape == layout.shape and owns_tokens.any() and not routed[~owns_tokens].any()
        # A token is labelled with a subject covering at least half of its pixels over its frames, so mapped back to
        # those pixels and frames, at least half of what is routed to a subject lies in its mask.
        precision = (routed & layout).sum((1, 2, 3))[owns_tokens] / routed.sum((1, 2, 3))[owns_tokens]
        assert (precision >= 0.5).all(), precision
    # Routed nowhere: every subject counts as not matched, and has no similarity to average.
    assert table["router"]["routed"]["id_match"]["mean"] == 0.0 and table["router"]["routed"]["id_sim"]["n"] == 0
    assert table["router"]["located"] == truth["located"]  # same frames; mask-free scoring ignores routing

    n_subjects = result["config"]["subjects"]
    paired = result["paired_vs_dense"]["masks - dense"]["layout"]["id_match"]
    gap = perfect["layout"]["id_match"]["mean"] - table["dense"]["layout"]["id_match"]["mean"]
    assert paired["mean"] == pytest.approx(gap) and paired["n"] == n_subjects and paired["clips"] == 2
    assert paired["low"] <= paired["mean"] <= paired["high"] and paired["mean"] > 0
    targets = {(t["method"], t["scoring"], t["metric"]): t for t in result["targets"]}
    assert targets[("masks", "layout", "id_match")]["met"]
    assert not targets[("router", "routed", "id_match")]["met"]


def pipe_grid(pipe, clip):
    """The (F_lat, H_tok, W_tok) token grid of the clip's token labels."""
    grid = toy_claim.token_grid_factors(pipe.transformer, pipe.vae)
    frames, height, width = clip.masks.shape[1:]
    _, ph, pw = grid["patch_size"]
    f_lat = (frames - 1) // grid["temporal_compression"] + 1
    return (f_lat, height // grid["spatial_compression"] // ph, width // grid["spatial_compression"] // pw)


def test_from_noise_runs_the_pipelines_with_one_noise_per_clip(noise_run, monkeypatch):
    root, pipe, settings = noise_run
    seen = []
    real = toy_claim._generate

    def spy(p, clip, routing, with_refs, latents, sigmas, s, guidance_scale=None):
        seen.append((clip.clip_id, routing, latents.clone()))
        return real(p, clip, routing, with_refs, latents, sigmas, s, guidance_scale)

    monkeypatch.setattr(toy_claim, "_generate", spy)
    result = toy_claim.run_from_noise(pipe, pipe, root / "test", clips=2, settings=settings, progress=False)
    assert [(c, r) for c, r, _ in seen] == [
        (c, r) for c in result["config"]["clip_ids"] for r in ("router", "masks", "dense")
    ]
    for k in range(0, len(seen), 3):
        assert all(torch.equal(seen[k][2], seen[k + j][2]) for j in range(3))
    for name in ("router", "masks", "dense"):
        cells = result["table"][name]["located"]
        assert cells["id_match"]["n"] == result["config"]["subjects"]  # every subject scored
        assert 0.0 <= cells["id_sim"]["mean"] <= 1.0 + 1e-6
    assert result["table"]["masks"]["routed"]["id_match"]["n"] == result["config"]["subjects"]


def test_cluster_bootstrap_pools_subjects_and_resamples_clips():
    groups = [[1.0, 0.0], [1.0], [None, 0.0, 0.0], []]
    st = toy_claim.cluster_bootstrap(groups, resamples=500, seed=1)
    assert st["mean"] == pytest.approx(2 / 5) and st["n"] == 5 and st["clips"] == 3
    assert st["low"] <= st["mean"] <= st["high"] and st["low"] < st["high"]
    assert toy_claim.cluster_bootstrap(groups, resamples=500, seed=1) == st
    assert toy_claim.cluster_bootstrap([[None], []])["mean"] is None
