"""Checks on untrusted model folders, run before a model is built from them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

from .._diffusers_compat import add_variant

_BLOCK = re.compile(r"^(blocks|transformer_blocks)\.(\d+)\.(.*)$")  # Wan / CogVideoX block lists


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the headers only (nothing is loaded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    origin: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(os.fspath(file), framework="pt") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file: {e}") from e
        twice = sorted(found.keys() & origin.keys())
        if twice:  # the loader would keep whichever shard it reads last
            raise ValueError(f"the tensor {twice[0]!r} is in two shards, {Path(origin[twice[0]]).name} and {Path(file).name}")
        origin.update(dict.fromkeys(found, file))
        shapes.update(found)
    return shapes


def describe_mismatch(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], limit: int = 4
) -> list[str]:
    """Missing, unexpected and mis-shaped tensor names, a few of each, as sentence fragments."""

    def some(names: list[str]) -> str:
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    shapes = [
        f"{k} expected {list(expected[k])}, got {list(found[k])}"
        for k in sorted(expected.keys() & found.keys())
        if expected[k] != found[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {some(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {some(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {some(shapes)}")
    return problems


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    single = folder / add_variant(SAFETENSORS_WEIGHTS_NAME, variant)
    if single.is_file():
        return [single]
    index = folder / (add_variant(SAFETENSORS_WEIGHTS_NAME, variant) + ".index.json")
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
        if any(Path(n).name != n for n in names):
            raise ValueError(f"{index} names shard files outside its folder")
        return [folder / n for n in names]
    return []


def check_block_model_folder(model_class: Any, folder: str | os.PathLike, variant: str | None = None) -> None:
    """Compare a Diffusers model folder's ``config.json`` with its safetensors headers before building the model.

    For models made of ``num_layers`` identical ``blocks.{i}`` (Wan) or ``transformer_blocks.{i}`` (CogVideoX): the config's ``num_layers`` must equal the number of
    blocks in the weights, and a one-block model built on the meta device from the config must have exactly the
    weights' names and shapes (block 0 standing for every block). So a hostile ``num_layers: 2000000`` or a huge
    width fails in a second with one sentence, instead of building (or allocating) a model for minutes. Folders
    without safetensors weights are left to the loader.
    """
    folder = Path(folder)
    files = _weight_files(folder, variant)
    if not files or not (folder / "config.json").is_file():
        return
    found = safetensors_shapes(files)
    config = dict(model_class.load_config(folder))
    num_layers = config.get("num_layers")
    blocks = {int(m.group(2)) for k in found if (m := _BLOCK.match(k))}
    if num_layers != len(blocks) or blocks != set(range(len(blocks))):
        raise ValueError(
            f"{folder / 'config.json'} says num_layers={num_layers!r} but the weights hold {len(blocks)} blocks: "
            "refusing to build a model that does not match its weights"
        )
    try:
        with torch.device("meta"):
            one_block = model_class.from_config({**config, "num_layers": 1})
    except Exception as e:  # any failure of an untrusted config is reported as what it is
        raise ValueError(f"{folder / 'config.json'} does not build a {model_class.__name__}: {e}") from e
    expected = {}
    for name, tensor in one_block.state_dict().items():
        m = _BLOCK.match(name)
        for i in range(len(blocks)) if m else [None]:
            expected[name if i is None else f"{m.group(1)}.{i}.{m.group(3)}"] = tuple(tensor.shape)
    problems = describe_mismatch(expected, found)
    if problems:
        raise ValueError(
            f"the {model_class.__name__} weights in {folder} do not match their config.json: {'; '.join(problems)}"
        )
