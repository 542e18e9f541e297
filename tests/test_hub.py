"""Loading a DiasR pipeline by Hub repo id: the `download` override, exercised offline against a fake local
huggingface_hub cache (no network: sockets are blocked for every test in this module)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import diasr_diffusers.pipelines.subjects as subjects_module
from diasr_diffusers import DiasRPipeline, IDRouter
from diasr_diffusers.utils.tiny import tiny_wan_components

REPO = "org/name"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
KW = dict(
    prompt="a man and a woman walk in the park",
    subject_phrases=["a man", "a woman"],
    height=32,
    width=32,
    num_frames=9,
    num_inference_steps=2,
    return_routing_maps=True,
)


def images():
    rs = np.random.RandomState(0)
    return [rs.rand(40, 20, 3).astype(np.float32), rs.rand(20, 30, 3).astype(np.float32)]


def generate(pipe, **kw):
    return pipe(**KW, subject_images=images(), generator=torch.Generator().manual_seed(0), **kw)


def fake_cache(root: Path, repo: str, folder: Path) -> Path:
    """Lay out ``folder`` as ``repo``'s snapshot in a huggingface_hub cache under ``root``; return the snapshot."""
    org, name = repo.split("/")
    repo_dir = root / f"models--{org}--{name}"
    snapshot = repo_dir / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


@pytest.fixture(scope="module")
def original():
    comps = tiny_wan_components()
    torch.manual_seed(0)
    router = IDRouter.from_transformer(comps["transformer"], router_dim=16, num_identity_queries=4, num_heads=2)
    return DiasRPipeline(**comps, id_router=router)


@pytest.fixture(scope="module")
def hub_cache(original, tmp_path_factory):
    saved = tmp_path_factory.mktemp("saved") / "pipe"
    original.save_pretrained(saved)
    index = json.loads((saved / "model_index.json").read_text())
    assert index["id_router"][1] == "IDRouter" and index["id_router"][0].startswith("diasr_diffusers")
    cache = tmp_path_factory.mktemp("hf_cache")
    snapshot = fake_cache(cache, REPO, saved)
    return cache, snapshot


def test_download_is_overridden():
    assert DiasRPipeline.download.__func__ is not DiffusionPipeline.download.__func__


def test_download_returns_the_snapshot_folder(hub_cache):
    cache, snapshot = hub_cache
    folder = DiasRPipeline.download(REPO, cache_dir=cache, local_files_only=True)
    assert Path(folder).resolve() == snapshot.resolve()
    assert (Path(folder) / "model_index.json").is_file()
    assert (Path(folder) / "id_router" / "config.json").is_file()
    # HF_HUB_OFFLINE alone (no local_files_only) also stays offline
    assert Path(DiasRPipeline.download(REPO, cache_dir=cache)).resolve() == snapshot.resolve()
    # an explicit revision resolves too
    assert Path(DiasRPipeline.download(REPO, cache_dir=cache, revision=COMMIT)).resolve() == snapshot.resolve()


def test_download_of_a_missing_repo_fails_offline(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(Exception) as info:
        DiasRPipeline.download("org/missing", cache_dir=cache, local_files_only=True)
    assert "AssertionError" not in type(info.value).__name__  # failed on the cache lookup, not on the network


def test_download_forwards_hub_arguments(monkeypatch, tmp_path):
    seen = {}

    def spy(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(subjects_module, "snapshot_download", spy)
    out = DiasRPipeline.download(REPO, cache_dir="/c", revision="v1", token="tok", force_download=True,
                                 local_files_only=True, proxies=None, use_safetensors=True)  # fmt: skip
    assert out == str(tmp_path)
    assert seen["repo_id"] == REPO and seen["cache_dir"] == "/c" and seen["revision"] == "v1"
    assert seen["token"] == "tok" and seen["force_download"] is True and seen["local_files_only"] is True
    ignore = seen.get("ignore_patterns") or []
    assert "*.bin" in ignore and not any(p.endswith("safetensors") for p in ignore)
    allow = seen.get("allow_patterns")
    assert allow is None or any("safetensors" in p for p in allow)


def test_from_pretrained_repo_id_loads_and_generates_identically(original, hub_cache):
    cache, _ = hub_cache
    pipe = DiasRPipeline.from_pretrained(REPO, cache_dir=cache, local_files_only=True)
    assert isinstance(pipe, DiasRPipeline) and isinstance(pipe.id_router, IDRouter)
    for name in ("transformer", "text_encoder", "vae", "id_router"):
        a, b = getattr(original, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    want, got = generate(original), generate(pipe)
    # ~1e-7 fp32 differences come from diffusers' loading itself (see test_pipeline.test_save_and_load_round_trip)
    assert np.abs(got.frames - want.frames).max() <= 1e-5
    assert torch.equal(got.routing_maps, want.routing_maps)
    # same seed, same pipeline -> bit-identical
    assert np.array_equal(generate(pipe).frames, got.frames)


def test_from_pretrained_repo_id_with_env_offline_only(hub_cache):
    cache, _ = hub_cache
    pipe = DiasRPipeline.from_pretrained(REPO, cache_dir=cache)
    assert isinstance(pipe.id_router, IDRouter)


def test_router_by_repo_id(original, tmp_path):
    original.id_router.save_pretrained(tmp_path / "router")
    cache = tmp_path / "cache"
    fake_cache(cache, "org/router", tmp_path / "router")
    router = IDRouter.from_pretrained("org/router", cache_dir=cache, local_files_only=True)
    a, b = original.id_router.state_dict(), router.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hub_config_template_names_a_loadable_router():
    template = Path(__file__).resolve().parents[1] / "hub_configs" / "model_index.json"
    if not template.is_file():
        pytest.skip("no hub_configs/model_index.json template")
    library, cls = json.loads(template.read_text())["id_router"]
    assert cls == "IDRouter"
    from diffusers import pipelines
    from diffusers.pipelines.pipeline_loading_utils import ALL_IMPORTABLE_CLASSES, get_class_obj_and_candidates

    class_obj, candidates = get_class_obj_and_candidates(
        library, cls, ALL_IMPORTABLE_CLASSES, pipelines, is_pipeline_module=False, component_name="id_router"
    )
    assert class_obj is IDRouter
    assert any(c is not None and issubclass(class_obj, c) for c in candidates.values())


# --------------------------------------------------------------------------------------------------------------------
# Untrusted checkpoints: no pickle is executed, no code from the checkpoint is imported


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a hostile ``.bin`` would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved_pipe(original, tmp_path_factory):
    folder = tmp_path_factory.mktemp("untrusted") / "pipe"
    original.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("component", ["id_router", "transformer"])
def test_pickle_weights_are_never_executed(saved_pipe, tmp_path, component):
    import pickle

    folder, marker = tmp_path / "pipe", tmp_path / "pwned"
    shutil.copytree(saved_pipe, folder)
    for f in (folder / component).glob("*.safetensors"):
        f.unlink()
    (folder / component / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(OSError):
        DiasRPipeline.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["id_router", "_class_name"])
def test_custom_code_in_model_index_is_refused(saved_pipe, tmp_path, entry):
    folder, marker = tmp_path / "pipe", tmp_path / "pwned"
    shutil.copytree(saved_pipe, folder)
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\nclass Evil:\n    pass\n"
    for where in (folder, folder / "id_router"):
        (where / "evil.py").write_text(code)
    index = json.loads((folder / "model_index.json").read_text())
    index[entry] = ["evil", "Evil"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiasRPipeline.from_pretrained(folder)
    assert not marker.exists()


def test_source_never_unpickles_or_trusts_remote_code():
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "diasr_diffusers"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        assert "trust_remote_code=True" not in text and "allow_pickle=True" not in text, path
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 1, match.end()
            while depth:  # the whole call, nested parentheses included
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[match.start() : end]
            assert "weights_only=True" in call, (path, call)
