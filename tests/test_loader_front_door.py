"""Issue 25, loaders: one front door (`utils.checkpoint_paths`) checks existence, format and completeness before any
parsing. Each test is one finding that was a traceback, a wrong sentence or a minute of Hub retries."""

from __future__ import annotations

import json
import time

import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import save_file
from test_public_weights import files  # noqa: F401 (the tiny Phantom / base fixture)

from diasr_diffusers import DiasRPipeline
from diasr_diffusers.cli import main
from diasr_diffusers.pipelines.public_weights import load_original_wan_state_dict, wan_transformer_from_original
from diasr_diffusers.routing import IDRouter
from diasr_diffusers.utils import checkpoint_paths
from diasr_diffusers.utils.checkpoint_paths import (
    HubUnavailableError,
    check_loader_sources,
    normalize_dtype,
    weights_format,
)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hub cache, as on this machine and a GPU user's first offline call."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(checkpoint_paths, "hub_reachable", lambda timeout=3.0: False)


# -- existence ---------------------------------------------------------------------------------------------------


def test_phantom_on_an_empty_folder(files, tmp_path, capsys):  # noqa: F811
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no weights"):  # was IndexError
        DiasRPipeline.from_phantom(tmp_path / "empty", base=str(files["base"]))
    code = main(["generate", "--phantom", str(tmp_path / "empty"), "--base", str(files["base"]), "--prompt", "a cat",
                 "--out", str(tmp_path / "o.mp4"), "--device", "cpu", "--frames", "5", "--height", "32",
                 "--width", "48", "--steps", "1"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "holds no weights" in err and "Traceback" not in err


def test_phantom_missing_base_is_named(files, offline):  # noqa: F811
    with pytest.raises(OSError, match=r"`base` 'missing_dir': no such local path .*the base is a Wan2\.1"):
        DiasRPipeline.from_phantom(files["root"] / "Phantom-Wan-1.3B.pth", base="missing_dir")  # was "hidden size"
    with pytest.raises(FileNotFoundError, match="`base`: the path .*missing/dir does not exist"):
        DiasRPipeline.from_phantom(files["root"] / "Phantom-Wan-1.3B.pth", base="./missing/dir")


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: DiasRPipeline.from_phantom("bytedance-research/Phantom"), ["bytedance-research/Phantom", "Wan2.1", "hf download"]),
        (lambda: DiasRPipeline.from_pretrained("some/hub-id"), ["some/hub-id", "hf download"]),
        (lambda: DiasRPipeline.from_skyreels_v3("Skywork/SkyReels-V3-R2V-14B"), ["Skywork/SkyReels-V3-R2V-14B"]),
        (lambda: IDRouter.from_pretrained("missing_router_dir"), ["missing_router_dir", "config.json"]),
    ],
)
def test_hub_ids_offline_fail_fast_and_name_the_repo(offline, call, names):
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError) as info:
        call()
    assert time.perf_counter() - start < 5  # was 40-60 s of retries
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in names), message


def test_hf_hub_offline_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match=r"offline mode \(HF_HUB_OFFLINE=1\) forbids downloading it"):
        check_loader_sources({}, pretrained_model_name_or_path="some/hub-id")


def test_generate_model_offline_sentence_is_whole(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    code = main(["generate", "--model", "some/hub-id", "--prompt", "a cat", "--out", str(tmp_path / "o.mp4"),
                 "--device", "cpu"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "forbids downloading it" in err and "to download it" not in err  # was "and offline mode ... to download it"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lora", "nope.safetensors", "--lora: the path .*nope.safetensors does not exist"),  # was "weight_name"
        ("--skyreels-v3", "./missing/skyreels", "the path .*missing/skyreels does not exist"),  # was "alphanumeric"
        ("--router", "./missing/router", "no such folder"),
    ],
)
def test_generate_missing_local_paths(tmp_path, capsys, monkeypatch, flag, value, message, files):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    source = [] if flag == "--skyreels-v3" else ["--model", str(files["base"])]
    code = main(["generate", *source, flag, value, "--prompt", "a cat", "--out", str(tmp_path / "o.mp4"),
                 "--device", "cpu", "--frames", "5", "--height", "32", "--width", "48", "--steps", "1"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, err), err


def test_missing_id_router_folder(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="`id_router`: the path .*does not exist"):
        IDRouter.from_pretrained(str(tmp_path / "nope" / "router"))  # was a Hub connection error


# -- format --------------------------------------------------------------------------------------------------------


def test_index_whose_weight_map_is_a_list(tmp_path):
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["a.safetensors"]}))
    with pytest.raises(ValueError, match="'weight_map' must be an object .*got list"):  # was AttributeError
        load_original_wan_state_dict(index)


def test_random_bytes_and_mislabelled_pth(files, tmp_path):  # noqa: F811
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a PyTorch checkpoint") as info:
        load_original_wan_state_dict(tmp_path / "random.pth")
    assert "weights_only=False" not in str(info.value)
    # A safetensors file named .pth: read as what it is, never unpickled.
    save_file({k: v.contiguous() for k, v in files["sd"].items()}, str(tmp_path / "mislabelled.pth"))
    assert weights_format(tmp_path / "mislabelled.pth") == "safetensors"
    sd = load_original_wan_state_dict(tmp_path / "mislabelled.pth")
    assert sd.keys() == files["sd"].keys()


def test_key_in_two_shards_is_refused_naming_both(files, tmp_path):  # noqa: F811
    sd = files["sd"]
    keys = sorted(sd)
    save_file({k: sd[k].contiguous() for k in keys[::2]}, str(tmp_path / "m-00001-of-00002.safetensors"))
    second = {k: sd[k].contiguous() for k in keys[1::2]}
    second[keys[0]] = sd[keys[0]] + 1  # the same name, other values
    save_file(second, str(tmp_path / "m-00002-of-00002.safetensors"))
    weight_map = {k: "m-00001-of-00002.safetensors" for k in keys[::2]}
    weight_map.update({k: "m-00002-of-00002.safetensors" for k in keys[1::2]})
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pattern = rf"{keys[0]!r} is in two shards, m-00001-of-00002.safetensors and m-00002-of-00002.safetensors"
    with pytest.raises(ValueError, match=pattern.replace(".", r"\.")):  # was: the later shard silently won
        load_original_wan_state_dict(tmp_path / "m.safetensors.index.json")


def test_dtype_as_a_string(files):  # noqa: F811
    pipe = DiasRPipeline.from_phantom(files["root"] / "Phantom-Wan-1.3B.pth", base=str(files["base"]),
                                      dtype="bfloat16")  # fmt: skip  (was "Invalid device string")
    assert pipe.transformer.dtype == torch.bfloat16
    assert normalize_dtype("torch.float16") is torch.float16
    with pytest.raises(TypeError, match="`dtype` must be a torch.dtype or one of"):
        check_loader_sources({"dtype": "bfloat61"})


def test_transformer_config_wrong_type(files):  # noqa: F811
    cfg = {**dict(files["phantom"].config), "num_attention_heads": "2"}
    with pytest.raises(TypeError, match=r"`transformer_config\['num_attention_heads'\]` must be an integer, got '2'"):
        wan_transformer_from_original(files["sd"], cfg)  # was "config 222222222222"


# -- completeness --------------------------------------------------------------------------------------------------


def test_skyreels_missing_proj_out_bias_is_refused_by_name(files, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    folder = tmp_path / "skyreels"
    WanPipeline(**files["comps"]).save_pretrained(folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    del sd["proj_out.bias"]
    save_file(sd, str(weights))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): proj_out\.bias"):  # was a meta tensor
        DiasRPipeline.from_skyreels_v3(str(folder))
