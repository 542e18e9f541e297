"""hub_configs/: the model_index.json template loads, and the model card's code example actually runs."""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image

from diasr_diffusers import DiasRPipeline, IDRouter
from diasr_diffusers.utils.tiny import tiny_wan_components

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"


def _template_index() -> dict:
    return json.loads((HUB_CONFIGS / "model_index.json").read_text())


def test_model_index_template_names_exactly_the_pipeline_components():
    index = _template_index()
    assert index["_class_name"] == "DiasRPipeline"
    components = {k for k in index if not k.startswith("_")}
    params = set(inspect.signature(DiasRPipeline.__init__).parameters) - {"self"}
    assert components == params
    # Diffusers looks the loading base classes up in the named module, so it must be the module that defines
    # IDRouter (what save_pretrained records), not the package root.
    assert index["id_router"] == ["diasr_diffusers.routing.router", "IDRouter"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny DiasR checkpoint; its model_index.json must agree with the template on the router entry."""
    path = tmp_path_factory.mktemp("ckpt") / "repo"
    comps = tiny_wan_components()
    pipe = DiasRPipeline(**comps, id_router=IDRouter.from_transformer(comps["transformer"]))
    pipe.save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    assert index["id_router"] == _template_index()["id_router"]
    return path


def test_template_router_entry_loads(checkpoint):
    pipe = DiasRPipeline.from_pretrained(checkpoint)
    assert isinstance(pipe.id_router, IDRouter)


def test_model_card_example_runs(checkpoint, tmp_path, monkeypatch):
    for i, color in enumerate([(220, 30, 30), (30, 30, 220)]):
        Image.fromarray(np.full((48, 32, 3), color, np.uint8)).save(tmp_path / f"ref{i}.png")
    card = ModelCard.from_template(
        ModelCardData(library_name="diasr-diffusers", pipeline_tag="text-to-video"),
        template_path=str(HUB_CONFIGS / "README.md"),
        repo_id=str(checkpoint),
        prompt="the man and the woman dance in the park",
        image_0=str(tmp_path / "ref0.png"),
        image_1=str(tmp_path / "ref1.png"),
        phrase_0="the man",
        phrase_1="the woman",
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=2,
    )
    text = str(card)
    assert "{{" not in text
    snippet = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    assert "DiasRPipeline.from_pretrained" in snippet
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "model_card_example", "exec"), namespace)  # noqa: S102 - the card's own example
    assert os.path.getsize(tmp_path / "output.mp4") > 0
    assert namespace["out"].routing_maps.shape == (1, 3, 2, 2)
