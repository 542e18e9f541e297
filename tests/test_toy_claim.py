"""benchmarks/toy_claim.py end to end on a tiny in-process run: two rendered clips, a tiny saved pipeline, scored by
the shipped sprite identity embedder (``diasr_diffusers.eval.sprites``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

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
    assert set(result["full"]) == {"masks", "dense"}
    assert set(result["ceilings"]) == {"ground_truth", "reconstruction"}
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
            assert 1 <= s["n"] <= 2
    assert result["ceilings"]["ground_truth"]["id_sim"]["mean"] > 0.5  # crops of the real frames match their refs

    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Toy model\n\nAnother helper's section.\n")
    assert text.count(toy_claim.MARK_START) == 1 and text.count(toy_claim.MARK_END) == 1
    assert "| DiasR, trained router |" in text and "benchmarks/toy_claim.py" in text
    assert (out / "toy_claim.md").read_text(encoding="utf-8").strip() in text
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
    with pytest.raises(ValueError, match="broken toy_claim section"):
        toy_claim.update_marked_section(doc, "x")
