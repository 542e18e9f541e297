"""The library loader (diasr_diffusers.pipelines.loading): any family's checkpoint, stock or DiasR, loads as its DiasR
pipeline; `diasr generate` / `diasr app` take every family with the same flags and refuse what a family lacks by name
before any weights load."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import run_cli

from diasr_diffusers.cli import main
from diasr_diffusers.commands import generate as gen
from diasr_diffusers.families import FAMILIES, resolve
from diasr_diffusers.pipelines import DiasRAutoPipeline, UsageError, load_pipeline

PROMPT = "the man and the woman dance in the park"


def _stock_folder(family: str, path: Path) -> Path:
    spec = FAMILIES[family]
    stock = resolve(f"diffusers:{spec.stock_pipelines[0]}")
    stock(**spec.tiny_builder()(num_layers=1)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ltx_folder(tmp_path_factory) -> Path:
    return _stock_folder("ltx", tmp_path_factory.mktemp("ltx") / "stock-ltx")


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video15"])
def test_a_stock_checkpoint_of_any_family_loads_as_its_diasr_pipeline(family, tmp_path):
    folder = _stock_folder(family, tmp_path / family)
    pipe = DiasRAutoPipeline.from_pretrained(folder)
    spec = FAMILIES[family]
    assert type(pipe) is spec.pipeline_class() and pipe.id_router is None
    stock = resolve(f"diffusers:{spec.stock_pipelines[0]}").from_pretrained(folder)
    for (name, a), b in zip(pipe.transformer.state_dict().items(), stock.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    # Saved as a DiasR pipeline, it loads back as one (its own class name in model_index.json).
    pipe.save_pretrained(tmp_path / "diasr")
    assert json.loads((tmp_path / "diasr" / "model_index.json").read_text())["_class_name"] == spec.pipeline_class_name
    assert type(load_pipeline(tmp_path / "diasr")) is spec.pipeline_class()


def test_load_pipeline_reads_ltx_with_a_router(ltx_folder, tmp_path):
    from diasr_diffusers.routing import IDRouter

    pipe = load_pipeline(ltx_folder)
    router = IDRouter.from_transformer(pipe.transformer, router_dim=16, num_heads=2)
    router.save_pretrained(tmp_path / "router")
    loaded = load_pipeline(str(ltx_folder), router=str(tmp_path / "router"))
    assert type(loaded).__name__ == "DiasRLTXPipeline" and loaded.id_router.config.text_dim == 32


def test_unknown_and_ingredients_checkpoints_are_refused_by_name_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen, "load_pipeline", mock.Mock(side_effect=AssertionError("loaded")))
    image = tmp_path / "man.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image)
    for class_name, expected in [
        ("IngredientsPipeline", "Ingredients takes the subjects as faces"),
        ("StableDiffusionPipeline", "not a pipeline of a supported family; expected one of: DiasRPipeline"),
    ]:
        folder = tmp_path / class_name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        argv = ["generate", "--model", str(folder), "--prompt", PROMPT, "--subject", f"the man={image}",
                "--out", str(tmp_path / "x.mp4"), "--device", "cpu"]  # fmt: skip
        code, err = run_cli(argv, capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UsageError, match="not a pipeline of a supported family"):
        load_pipeline(tmp_path / "StableDiffusionPipeline")
    with pytest.raises(UsageError, match="route with their own routers"):
        load_pipeline(tmp_path / "IngredientsPipeline", router=tmp_path)


def test_generate_checks_each_familys_strides_before_loading(ltx_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen, "load_pipeline", mock.Mock(side_effect=AssertionError("loaded")))
    base = ["generate", "--model", str(ltx_folder), "--prompt", PROMPT, "--out", str(tmp_path / "x.mp4"), "--device", "cpu"]  # fmt: skip
    code, err = run_cli([*base, "--frames", "13", "--height", "32", "--width", "32"], capsys)
    assert code == 2 and "--frames must be 8k+1" in err and "9 or 17" in err  # LTX's VAE: 8x in time
    code, err = run_cli([*base, "--frames", "9", "--height", "48", "--width", "32"], capsys)
    assert code == 2 and "--height must be a multiple of 32" in err  # 32x in space, patch 1


def test_generate_runs_an_ltx_checkpoint_with_the_same_flags(ltx_folder, tmp_path, capsys):
    image = tmp_path / "man.png"
    Image.fromarray(np.full((40, 24, 3), (200, 30, 30), np.uint8)).save(image)
    out, maps = tmp_path / "clip.mp4", tmp_path / "maps.mp4"
    argv = ["generate", "--model", str(ltx_folder), "--prompt", PROMPT, "--subject", f"the man={image}",
            "--frames", "9", "--height", "64", "--width", "64", "--steps", "2", "--routing", "similarity",
            "--out", str(out), "--routing-maps", str(maps), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])
    assert set(summary["routing_share"]) == {"the man", "(null)"}
    assert iio.imread(out).shape == (9, 64, 64, 3)
    assert iio.imread(maps).shape[0] == 9


def test_app_settings_and_limits_follow_the_family(ltx_folder):
    from diasr_diffusers.app import AppSettings, model_limits

    pipe = load_pipeline(ltx_folder)
    limits = model_limits(pipe)
    assert limits == {"size_step": 32, "max_size": 2048, "frame_step": 8, "max_frames": 257}
    settings = AppSettings.for_pipeline(pipe)
    assert (settings.height, settings.width, settings.num_frames, settings.max_sequence_length) == (512, 704, 161, 128)
