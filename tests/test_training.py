"""Training: config checking, both stages learn, exact resume, outputs load into DiasRPipeline, DDP equivalence."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from diasr_diffusers import DiasRPipeline, IDRouter
from diasr_diffusers.cli import main
from diasr_diffusers.data import make_synthetic
from diasr_diffusers.training import ConfigError, DiasRTrainer, TrainConfig
from diasr_diffusers.training.trainer import read_metrics
from diasr_diffusers.utils.latents import encode_latents
from diasr_diffusers.utils.tiny import tiny_wan_components

TINY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": [1, 1, 1], "ffn_dim": 32}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_clips=6, seed=0, subjects=(1, 2), num_frames=5, height=32, width=32)
    return out


def _config(data_dir: Path, **overrides) -> dict:
    cfg = {
        "stage": "route",
        "allow_scratch": True,
        "train_data": str(data_dir),
        "tiny_model": TINY,
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "batch_size": 2,
        "max_steps": 4,
        "learning_rate": 3e-3,
        "router": {"routed_layers": "all", "router_dim": 16, "num_identity_queries": 2, "num_heads": 2},
        "lora_rank": 2,
        "lora_alpha": 2,
        "checkpointing_steps": 2,
        "eval_fraction": 0.34,
        "eval_sigmas": [0.5],
    }
    cfg.update(overrides)
    return cfg


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"learning_rat": 1e-4}, "unknown config key"),
        ({"train_data": "/nonexistent/manifest.jsonl"}, "`train_data` not found"),
        ({"allow_scratch": False}, "init_from"),
        ({"stage": "fly"}, "`stage` must be one of"),
        ({"num_frames": 6}, r"1 \+ 4k"),
        ({"model": "/nonexistent"}, "exactly one of `model`"),
        ({"tiny_model": {**TINY, "layers": 3}}, "unknown `tiny_model` key"),
        ({"weighting_scheme": "cosmic"}, "`weighting_scheme` must be one of"),
        ({"balanced_routing_loss": 2.0}, "`balanced_routing_loss` must be"),
        ({"tiny_model": {**TINY, "vae": "/nonexistent"}}, "`tiny_model.vae` must be"),
        ({"max_sequence_length": 0}, "`max_sequence_length` must be a positive integer"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_error(data_dir, tmp_path, change, message, capsys):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(_write(tmp_path, _config(data_dir, **change)))
    config = str(_write(tmp_path, _config(data_dir, **change)))
    assert main(["train", "--config", config, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage", ["align", "route"])
def test_stage_decreases_its_losses_on_a_fixed_sample(data_dir, tmp_path, stage):
    cfg = TrainConfig.from_dict(
        _config(data_dir, stage=stage, max_steps=12, checkpointing_steps=100, eval_fraction=0.0, learning_rate=1e-2)
    )
    trainer = DiasRTrainer(cfg, tmp_path / "run")
    trainer.setup()
    item = trainer.train_set[0]

    def losses():
        enc = trainer._encode(item)
        noise = torch.randn(enc["x0"].shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            pred, target, logits, anchors, _ = trainer._forward(enc, torch.tensor(0.4), noise, trainer.model)
            return {k: float(v) for k, v in trainer._losses(enc, pred, target, logits, anchors).items()}

    before = losses()
    trainer.train_set.records = trainer.train_set.records[:1] * 4  # overfit one clip
    trainer.eval_set = trainer.train_set
    trainer.train()
    after = losses()
    key = "route" if stage == "route" else "mask"
    assert after[key] < before[key] * 0.9, (before, after)
    assert after["loss"] < before["loss"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert {"diffusion", key, "routing_accuracy", "lr"} <= set(metrics[0])
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert 0.0 <= result["routing_iou_mean"] <= 1.0 and "null_accuracy" in result


@pytest.mark.parametrize(
    "extra", [{}, {"cache_latents": True, "weighting_scheme": "logit_normal", "logit_mean": -1.0}]
)
def test_resume_continues_exactly(data_dir, tmp_path, extra):
    full = _write(tmp_path, _config(data_dir, max_steps=4, **extra), "full.yaml")
    half = _write(tmp_path, _config(data_dir, max_steps=2, **extra), "half.yaml")
    assert main(["train", "--config", str(full), "--output-dir", str(tmp_path / "a")]) == 0
    assert main(["train", "--config", str(half), "--output-dir", str(tmp_path / "b")]) == 0
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-2"]
    assert main(["train", "--config", str(full), "--output-dir", str(tmp_path / "b"), "--resume"]) == 0
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        for k in ma:
            assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), (k, ma, mb)
    wa = load_file(str(tmp_path / "a" / "router" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "router" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # Checkpoints were written whole (no temp folders left) and only the last `checkpoints_total_limit` kept.
    assert not list((tmp_path / "b").glob(".checkpoint-*"))
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("cache", [False, True])
def test_cache_latents_encodes_each_clip_once(data_dir, tmp_path, cache, monkeypatch):
    trainer = DiasRTrainer(TrainConfig.from_dict(_config(data_dir, max_steps=4, cache_latents=cache)), tmp_path / "r")
    trainer.setup()
    calls = []
    encode = trainer._encode
    monkeypatch.setattr(trainer, "_encode", lambda item: calls.append(item["index"]) or encode(item))
    result = trainer.train()
    n_train = len(trainer.train_set)  # 4 clips, 4 steps x batch 2 = 2 epochs
    # Training encodes once per clip with the cache, once per sample without; evaluation encodes its clips.
    assert len(calls) == (n_train if cache else 8) + result["num_eval_clips"]
    assert {"routing_iou_per_sigma", "routing_iou_per_layer"} <= set(result)
    assert list(result["routing_iou_per_sigma"]) == ["0.5"]


@pytest.mark.parametrize("length", [32, 512])
def test_prompts_are_padded_to_max_sequence_length(data_dir, tmp_path, length):
    trainer = DiasRTrainer(TrainConfig.from_dict(_config(data_dir, max_sequence_length=length)), tmp_path / "r")
    trainer.setup()
    enc = trainer._encode(trainer.train_set[0])
    assert enc["prompt_embeds"].shape[1] == length
    # Text routing permutes exactly those positions: every prompt token is in one segment.
    assert sorted(enc["routing"]["text_segments"][0].order.tolist()) == list(range(length))


def test_evaluate_details_list_every_scored_subject(data_dir, tmp_path):
    trainer = DiasRTrainer(TrainConfig.from_dict(_config(data_dir, eval_sigmas=[0.3, 0.6])), tmp_path / "r")
    trainer.setup()
    result = trainer.evaluate(details=True)
    subjects = result["subjects"]
    assert subjects and {s["sigma"] for s in subjects} == {0.3, 0.6}
    # The listed IoUs are exactly the ones averaged into routing_iou_mean.
    assert sum(s["iou"] for s in subjects) / len(subjects) == pytest.approx(result["routing_iou_mean"])
    for s in subjects:
        item = trainer.eval_set[s["index"]]
        assert item["clip_id"] == s["clip_id"]
        assert s["tokens"] == int((item["token_labels"] == s["subject"]).sum()) == sum(s["predicted"].values())
        # IoU = hits / (own tokens + tokens wrongly routed to it) <= hits / own tokens.
        assert s["predicted"].get(str(s["subject"]), 0) >= s["iou"] * s["tokens"] - 1e-9
    assert "subjects" not in trainer.evaluate()


def test_example_configs_use_known_keys():
    import dataclasses

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    configs = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert set(yaml.safe_load(path.read_text())) <= known, path.name


def test_resume_without_checkpoint_fails_clearly(data_dir, tmp_path):
    cfg = TrainConfig.from_dict(_config(data_dir))
    with pytest.raises(ValueError, match="does not exist"):
        DiasRTrainer(cfg, tmp_path / "missing", resume=True).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        DiasRTrainer(cfg, tmp_path / "empty", resume=True).setup()


def test_outputs_load_into_pipeline_and_change_it(data_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        main(["train", "--config", str(_write(tmp_path, _config(data_dir, max_steps=3))), "--output-dir", str(out)])
        == 0
    )
    assert (out / "router" / "config.json").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    align_cfg = _config(data_dir, stage="align", init_from=str(out), allow_scratch=False, max_steps=1)
    TrainConfig.from_dict(align_cfg)  # either stage can start from the other's output

    comps = tiny_wan_components(**{**TINY, "patch_size": tuple(TINY["patch_size"])})
    router = IDRouter.from_pretrained(out / "router")
    call = dict(
        prompt="the red circle and the blue square move",
        subject_images=[np.full((32, 32, 3), 200, np.uint8), np.full((32, 32, 3), 40, np.uint8)],
        subject_phrases=["the red circle", "the blue square"],
        height=32, width=32, num_frames=5, num_inference_steps=2, routing="router",
    )  # fmt: skip
    base = DiasRPipeline(
        **comps, id_router=IDRouter.from_transformer(comps["transformer"], **_config(data_dir)["router"])
    )
    frames_base = base(**call, generator=torch.Generator().manual_seed(0)).frames
    tuned = DiasRPipeline(**tiny_wan_components(**{**TINY, "patch_size": (1, 1, 1)}), id_router=router)
    tuned.load_lora_weights(str(out))
    frames_tuned = tuned(**call, generator=torch.Generator().manual_seed(0)).frames
    assert np.abs(frames_base - frames_tuned).max() > 1e-4


def _launch(args: list[str], port: int, *train: str) -> None:
    """`accelerate launch <args> -m diasr_diffusers.cli train <train>` in 2 CPU processes (gloo)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *args, "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "diasr_diffusers.cli", "train", *train,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_ddp_matches_one_process_with_double_batch(data_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP, gloo) x batch 1 = one process x batch 2: the same logged losses
    (the global batch's), and its checkpoint resumes in one process (world size 2 -> 1) exactly where it stopped."""
    one = _write(tmp_path, _config(data_dir, batch_size=2, max_steps=2, checkpointing_steps=100), "one.yaml")
    two = _write(tmp_path, _config(data_dir, batch_size=1, max_steps=1, checkpointing_steps=1), "two.yaml")
    assert main(["train", "--config", str(one), "--output-dir", str(tmp_path / "one")]) == 0
    # `--multi_gpu` is accelerate's multi-process launcher (torchrun); without a GPU the trainer's Accelerator runs
    # DDP over gloo (`--cpu` would start a single process).
    _launch(["--multi_gpu"], 29517, "--config", str(two), "--output-dir", str(tmp_path / "two"))
    state = json.loads((tmp_path / "two" / "checkpoint-1" / "trainer_state.json").read_text())
    assert (state["num_processes"], state["global_batch"]) == (2, 2)

    # A world-size change must keep the global batch: 1 process x batch 1 is refused by name, x batch 2 resumes.
    bad = _write(tmp_path, _config(data_dir, batch_size=1, max_steps=2, checkpointing_steps=1), "bad.yaml")
    with pytest.raises(ValueError, match="global batch of 2"):
        DiasRTrainer(TrainConfig.from_yaml(bad), tmp_path / "two", resume=True).check_output_dir()
    resumed = _write(tmp_path, _config(data_dir, batch_size=2, max_steps=2, checkpointing_steps=1), "resumed.yaml")
    assert main(["train", "--config", str(resumed), "--output-dir", str(tmp_path / "two"), "--resume"]) == 0

    a = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [1, 2]
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys() and ma["lr"] == mb["lr"]
        # Step 1 differs only by summation order; step 2 also by the 1-vs-2-process gradient all-reduce under Adam.
        for k in ("loss", "diffusion", "route", "routing_accuracy"):
            assert abs(ma[k] - mb[k]) <= 1e-4 * max(1.0, abs(ma[k])), (ma["step"], k, ma[k], mb[k])
    wa = load_file(str(tmp_path / "one" / "router" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "router" / "diffusion_pytorch_model.safetensors"))
    # Same samples, noise and averaged gradients: equal up to float rounding (2 threads vs 1 per process) that
    # Adam amplifies on small gradients. A wrong split of the batch would move every weight by ~lr (3e-3).
    diffs = {k: float((wa[k] - wb[k]).abs().max()) for k in wa}
    assert max(diffs.values()) < 1e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]


def test_fsdp_matches_one_process_and_resumes_across_world_sizes(data_dir, tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2` with 2 CPU processes, every transformer weight trained: it
    resumes a 1-process checkpoint (world size 1 -> 2, the optimizer state scattered into shards), takes the step
    one process with the same global batch takes (same losses, same weights and Adam moments in its gathered
    checkpoint), and one process resumes that checkpoint (2 -> 1) to the same end."""
    full = {"train_lora": False, "train_transformer": True, "checkpoints_total_limit": 3}
    one = _write(tmp_path, _config(data_dir, batch_size=2, max_steps=3, checkpointing_steps=1, **full), "one.yaml")
    assert main(["train", "--config", str(one), "--output-dir", str(tmp_path / "one")]) == 0
    a = read_metrics(tmp_path / "one" / "metrics.jsonl")

    two = tmp_path / "two"
    two.mkdir()
    shutil.copytree(tmp_path / "one" / "checkpoint-1", two / "checkpoint-1")
    (two / "metrics.jsonl").write_text(json.dumps(a[0]) + "\n")
    cfg = _write(tmp_path, _config(data_dir, batch_size=1, max_steps=2, checkpointing_steps=1, **full), "two.yaml")
    _launch(["--use_fsdp", "--fsdp_version", "2"], 29518, "--config", str(cfg), "--output-dir", str(two), "--resume")
    state = json.loads((two / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["num_processes"], state["global_batch"], state["fsdp"]) == (2, 2, True)
    # The gathered checkpoint is the one an unsharded process writes: same files, same weights and optimizer state.
    for name in ("router/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors",
                 "optimizer.safetensors"):  # fmt: skip
        wa, wb = (load_file(str(d / "checkpoint-2" / name)) for d in (tmp_path / "one", two))
        assert wa.keys() == wb.keys(), name
        # A wrong split or an unreduced gradient moves weights by ~lr (3e-3); Adam amplifies rounding to ~1e-5.
        diffs = {k: float((wa[k] - wb[k]).abs().max()) for k in wa}
        assert max(diffs.values()) < 1e-4, (name, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])

    resumed = _write(tmp_path, _config(data_dir, batch_size=2, max_steps=3, checkpointing_steps=1, **full), "r.yaml")
    assert main(["train", "--config", str(resumed), "--output-dir", str(two), "--resume"]) == 0
    b = read_metrics(two / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys() and ma["lr"] == mb["lr"]
        for k in ("loss", "diffusion", "route", "routing_accuracy"):
            assert abs(ma[k] - mb[k]) <= 1e-4 * max(1.0, abs(ma[k])), (ma["step"], k, ma[k], mb[k])
    for name in ("router", "transformer"):
        wa, wb = (load_file(str(d / name / "diffusion_pytorch_model.safetensors")) for d in (tmp_path / "one", two))
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4, name


@pytest.mark.parametrize(
    "env, tiny, message",
    [
        ({"FSDP_VERSION": "1"}, None, "launch with `--use_fsdp --fsdp_version 2`"),
        ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, None, "`fsdp_activation_checkpointing` is not supported"),
        ({"FSDP_VERSION": "2"}, {"wan22": "a14b", "num_layers": 1, "attention_head_dim": 8, "ffn_dim": 16},
         "FSDP with two experts"),
    ],
)  # fmt: skip
def test_fsdp_launches_it_cannot_run_are_refused_by_name(data_dir, tmp_path, monkeypatch, env, tiny, message):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    overrides = {} if tiny is None else {"tiny_model": tiny}
    trainer = DiasRTrainer(TrainConfig.from_dict(_config(data_dir, **overrides)), tmp_path / "run")
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        trainer.setup()


def test_training_reads_a_latent_cache(data_dir, tmp_path):
    from diasr_diffusers.data import MuSADataset, cache_latents

    tiny = {**TINY, "vae": "sprites"}  # a fixed VAE (4x spatial, 2x temporal): the cache must be written with it
    vae = tiny_wan_components(vae="sprites")["vae"]
    ds = MuSADataset(
        data_dir / "manifest.jsonl", num_frames=5, height=32, width=32, clip_sampling="start", crop="center",
        temporal_compression=2, spatial_compression=4, patch_size=(1, 1, 1), seed=0,
    )  # fmt: skip
    cache_latents(ds, vae, tmp_path / "latents", progress=False)
    cfg = TrainConfig.from_dict(
        _config(data_dir, tiny_model=tiny, latent_cache=str(tmp_path / "latents"), max_steps=2)
    )
    trainer = DiasRTrainer(cfg, tmp_path / "run")
    trainer.setup()
    item = trainer.train_set[0]
    assert "latents" in item and "video" not in item  # read from the cache, not decoded
    enc = trainer._encode(item)
    line = trainer.train_set.records[0].line
    fresh = ds[[r.line for r in ds.records].index(line)]
    torch.testing.assert_close(enc["x0"][0], encode_latents(trainer.pipe.vae, fresh["video"][None])[0])
    result = trainer.train()
    assert 0.0 <= result["routing_iou_mean"] <= 1.0

    # A cache written with another VAE (the random toy VAE: 8x spatial, 4x temporal) is refused by name.
    other = MuSADataset(
        data_dir / "manifest.jsonl", num_frames=5, height=32, width=32, clip_sampling="start", crop="center"
    )
    cache_latents(other, tiny_wan_components()["vae"], tmp_path / "other", progress=False)
    cfg = TrainConfig.from_dict(_config(data_dir, tiny_model=tiny, latent_cache=str(tmp_path / "other")))
    with pytest.raises(ValueError, match="`latent_cache` .* another VAE"):
        DiasRTrainer(cfg, tmp_path / "run2").setup()
    with pytest.raises(ConfigError, match="needs a fixed VAE"):
        TrainConfig.from_dict(_config(data_dir, latent_cache=str(tmp_path / "latents")))


# -- config keys checked at load time (issue 10) -------------------------------------------------------------------


def test_config_numbers_keep_their_meaning(data_dir):
    cfg = TrainConfig.from_dict(
        _config(data_dir, router_learning_rate=0, learning_rate="1e-3", eval_sigmas=["5e-1", 1])
    )
    assert cfg.router_learning_rate == 0.0  # a frozen router, not `learning_rate`
    assert cfg.learning_rate == 1e-3 and cfg.eval_sigmas == [0.5, 1.0]  # YAML 1.1 reads 1e-3 as a string


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": True}, "`batch_size` must be a positive integer"),
        ({"lambda_route": -1}, r"`lambda_route` must be in \[0"),
        ({"eval_sigmas": [0.0]}, r"`eval_sigmas` must be in \(0, 1\]"),
        ({"eval_sigmas": [1.5]}, r"`eval_sigmas` must be in \(0, 1\]"),
        ({"learning_rate": "fast"}, "`learning_rate` must be a number"),
        ({"router": {"router_dims": 8}}, "unknown or fixed `router` key"),
        ({"router": {"router_dim": 15, "num_heads": 2}}, "`router` is unusable"),
        ({"router": {"routed_layers": [7]}}, "`router` is unusable"),
        ({"lr_scheduler": "cosmic"}, "`lr_scheduler` must be one of"),
        ({"seed": "zero"}, "`seed` must be an integer"),
        ({"weight_decay": "lots"}, "`weight_decay` must be a number"),
        ({"lora_targets": ["to_qq"]}, "`lora_targets`: no module"),
        ({"lora_targets": "to_q"}, "`lora_targets` must be a non-empty list"),
        ({"lr_warmup_steps": 5}, "no effect with `lr_scheduler: constant`"),
        ({"tiny_model": {**TINY, "num_layers": 5000}}, r"`num_layers` must be an integer in \[1, 1024\]"),  # hung
        ({"router": {"num_identity_queries": 10**6, "router_dim": 10**5}}, "parameters"),
    ],
)
def test_every_key_is_checked_at_load_time(data_dir, change, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(_config(data_dir, **change))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("- stage: route\n", "must hold a mapping"),
        ("stage: route\nstage: align\n", "appears twice"),
        ("stage: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
        (b"\xff\xfe\x00binary", "not UTF-8"),
    ],
)
def test_config_file_that_is_not_a_config(tmp_path, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(path)


def test_cli_eval_data_overrides_a_missing_config_eval_data(data_dir, tmp_path, capsys):
    # The config's own eval_data does not exist; --eval-data replaces it before paths are checked. The output
    # folder is a file, so the run stops (exit 2) right after the config was accepted, before any model loads.
    config = _write(tmp_path, _config(data_dir, eval_data=str(tmp_path / "gone")))
    (tmp_path / "file").write_text("x")
    argv = ["train", "--config", str(config), "--output-dir", str(tmp_path / "file"), "--eval-data", str(data_dir)]
    assert main(argv) == 2
    assert "is not a folder" in capsys.readouterr().err


# -- resume and checkpoint faults, built on disk -----------------------------------------------------------------


def _fake_checkpoint(out: Path, step: int, config: TrainConfig, truncate: str | None = None) -> Path:
    """A checkpoint folder as save_checkpoint writes it (file list + sizes in trainer_state.json, written last)."""
    folder = out / f"checkpoint-{step}"
    (folder / "router").mkdir(parents=True)
    (folder / "router" / "config.json").write_text("{}")
    (folder / "optimizer.safetensors").write_bytes(b"x" * 64)
    files = {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()}
    trainer = DiasRTrainer(config, out)
    state = {"step": step, "stage": config.stage, "config": trainer._config_record(), "files": files}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    if truncate:
        (folder / truncate).write_bytes(b"x" * 10)
    return folder


def test_resume_picks_the_newest_complete_checkpoint_and_ignores_others(data_dir, tmp_path, caplog):
    cfg = TrainConfig.from_dict(_config(data_dir))
    out = tmp_path / "run"
    good = _fake_checkpoint(out, 2, cfg)
    _fake_checkpoint(out, 4, cfg, truncate="optimizer.safetensors")  # killed mid-write / truncated copy
    (out / "checkpoint-best").mkdir()  # not ours
    (out / "checkpoint-6").mkdir()  # no trainer_state.json: never finished
    trainer = DiasRTrainer(cfg, out, resume=True)
    with caplog.at_level("WARNING"):
        assert trainer.check_output_dir() == good
    assert "checkpoint-4" in caplog.text and "optimizer.safetensors has 10 bytes" in caplog.text
    assert "checkpoint-6" in caplog.text
    # A new run (no resume) into that folder would mix two runs: refused before any model is built.
    with pytest.raises(ValueError, match="checkpoint-6 of an earlier run"):
        DiasRTrainer(cfg, out).check_output_dir()


def test_resume_refuses_a_checkpoint_of_another_config(data_dir, tmp_path):
    out = tmp_path / "run"
    _fake_checkpoint(out, 2, TrainConfig.from_dict(_config(data_dir, lora_rank=4)))
    with pytest.raises(ValueError, match="another config.*lora_rank: 4 there, 2 here"):
        DiasRTrainer(TrainConfig.from_dict(_config(data_dir)), out, resume=True).check_output_dir()
    # A longer run is a change a resume may make.
    assert DiasRTrainer(
        TrainConfig.from_dict(_config(data_dir, lora_rank=4, max_steps=9)), out, resume=True
    ).check_output_dir()
    with pytest.raises(ValueError, match="past `max_steps`"):
        DiasRTrainer(
            TrainConfig.from_dict(_config(data_dir, lora_rank=4, max_steps=1)), out, resume=True
        ).check_output_dir()


def test_torn_last_metrics_line_is_dropped(tmp_path, caplog):
    from diasr_diffusers.training.trainer import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    with caplog.at_level("WARNING"):
        assert [m["step"] for m in read_metrics(path, up_to_step=2)] == [1, 2]
    assert "unfinished last line 3" in caplog.text
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_pruning_and_leftovers_of_a_kill(data_dir, tmp_path):
    from types import SimpleNamespace

    cfg = TrainConfig.from_dict(_config(data_dir, checkpoints_total_limit=1))
    out = tmp_path / "run"
    for step in (2, 4):
        _fake_checkpoint(out, step, cfg)
    trainer = DiasRTrainer(cfg, out, resume=True)
    trainer._prune_checkpoints()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]
    # What kills leave: a checkpoint half-deleted while pruning, temp folders / files of atomic writes.
    (out / ".checkpoint-2.deleting" / "router").mkdir(parents=True)
    (out / ".checkpoint-6.tmp").mkdir()
    (out / ".router.tmp").mkdir()
    (out / ".eval.abc123.tmp.json").write_text("")
    (out / "notes.txt").write_text("mine")  # the user's: kept
    trainer.accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    assert trainer._prepare_output_dir() == out / "checkpoint-4"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "notes.txt"]


def test_final_save_is_all_or_nothing(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = DiasRTrainer(TrainConfig.from_dict(_config(data_dir, train_lora=False)), out)
    trainer.output_dir.mkdir()
    trainer.router = IDRouter(
        hidden_dim=8, text_dim=8, num_layers=1, router_dim=8, num_identity_queries=2, num_heads=2
    )
    trainer._save_final()
    before = (out / "router" / "diffusion_pytorch_model.safetensors").read_bytes()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"stale")  # an earlier run's LoRA would pair with it
    with torch.no_grad():
        trainer.router.null_anchors.add_(1.0)

    def killed(*args, **kwargs):  # the config is written, then the process dies before the weights
        raise KeyboardInterrupt

    monkeypatch.setattr(
        "diasr_diffusers.routing.router.IDRouter.save_pretrained",
        lambda self, d, **k: (Path(d, "config.json").write_text("{}"), killed()),
    )
    with pytest.raises(KeyboardInterrupt):
        trainer._save_final()
    assert (out / "router" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors", "router"]
    monkeypatch.undo()
    trainer._save_final()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "router" / "diffusion_pytorch_model.safetensors").read_bytes() != before


def test_train_transformer_writes_a_pipeline_and_route_continues_it(data_dir, tmp_path):
    """`train_transformer: true`: every transformer weight trains (no LoRA); `pipeline/` reloads as the trained model,
    and a `route` stage continues from the `align` stage's transformer."""
    full = {"train_lora": False, "train_transformer": True, "eval_fraction": 0.0, "checkpointing_steps": 100}
    align = tmp_path / "align"
    cfg = _config(data_dir, stage="align", max_steps=2, **full)
    assert main(["train", "--config", str(_write(tmp_path, cfg, "a.yaml")), "--output-dir", str(align)]) == 0
    assert not (align / "pytorch_lora_weights.safetensors").exists()
    untrained = tiny_wan_components(**{**TINY, "patch_size": (1, 1, 1)})["transformer"].state_dict()
    pipe = DiasRPipeline.from_pretrained(align / "pipeline")
    assert isinstance(pipe.id_router, IDRouter)
    trained = pipe.transformer.state_dict()
    assert trained.keys() == untrained.keys()
    changed = [k for k in trained if not torch.equal(trained[k], untrained[k])]
    assert len(changed) > len(trained) // 2, "most transformer weights should have trained"
    saved = load_file(align / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], trained[k]) for k in saved)

    route = tmp_path / "route"
    cfg = _config(data_dir, stage="route", allow_scratch=False, init_from=str(align), max_steps=1, **full)
    trainer = DiasRTrainer(TrainConfig.from_dict(cfg), route)
    trainer.setup()
    start = trainer.transformer.state_dict()
    assert all(torch.equal(start[k], trained[k]) for k in trained), "route must start from align's transformer"

    # A router-only stage on top of it (`train_transformer: false`) must still use that transformer, frozen, and its
    # output must be the complete model; it once fell back silently to the random `tiny_model` weights.
    frozen = tmp_path / "router_only"
    cfg = _config(data_dir, stage="route", allow_scratch=False, init_from=str(align), max_steps=1,
                  **{**full, "train_transformer": False})  # fmt: skip
    assert main(["train", "--config", str(_write(tmp_path, cfg, "r.yaml")), "--output-dir", str(frozen)]) == 0
    after = DiasRPipeline.from_pretrained(frozen / "pipeline").transformer.state_dict()
    assert all(torch.equal(after[k], trained[k]) for k in trained), "a frozen inherited transformer must not change"
    routers = [IDRouter.from_pretrained(d / "router").state_dict() for d in (align, frozen)]
    assert any(not torch.equal(routers[0][k], routers[1][k]) for k in routers[0]), "the router should have trained"


def test_dense_stage_trains_without_a_router(data_dir, tmp_path):
    """The Phantom-style baseline: attention mode `dense`, diffusion loss only, no router in the optimizer or the
    saved pipeline."""
    cfg = _config(data_dir, stage="dense", train_lora=False, train_transformer=True, max_steps=2, eval_fraction=0.34)
    trainer = DiasRTrainer(TrainConfig.from_dict(cfg), tmp_path / "dense")
    trainer.setup()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in trainer.router.parameters()}
    assert trainer._encode(trainer.train_set[0])["routing"]["mode"] == "dense"
    result = trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[0]) == {"step", "diffusion", "loss", "lr"}
    assert result["diffusion_loss"] > 0 and math.isnan(result["routing_iou_mean"])
    pipe = DiasRPipeline.from_pretrained(tmp_path / "dense" / "pipeline")
    assert pipe.id_router is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train_transformer": True}, "set `train_lora: false`"),
        ({"stage": "dense", "train_lora": False}, "nothing to train"),
        ({"train_transformer": "yes"}, "train_transformer"),
    ],
)
def test_train_transformer_config_errors(data_dir, change, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(_config(data_dir, **change))


@pytest.mark.parametrize("stage", ["route", "align"])
def test_gradient_checkpointing_gives_the_same_step(data_dir, tmp_path, stage):
    """`gradient_checkpointing: true` recomputes each block in the backward pass, after the forward's routing state
    has ended: the recompute must route as the forward did (else torch's CheckpointError, or other gradients).
    The gradients handed to the optimizer and the weights after the step equal those without checkpointing."""
    runs = []
    for checkpointing in (False, True):
        cfg = _config(data_dir, stage=stage, max_steps=1, eval_fraction=0.0, gradient_checkpointing=checkpointing)
        trainer = DiasRTrainer(TrainConfig.from_dict(cfg), tmp_path / f"{stage}-{checkpointing}")
        trainer.setup()
        assert trainer.transformer.gradient_checkpointing is checkpointing
        grads, step = [], trainer.optimizer.step

        def record(*args, _trainer=trainer, _grads=grads, _step=step, **kwargs):
            _grads.append({n: p.grad.clone() for n, p in _trainer.model.named_parameters() if p.grad is not None})
            return _step(*args, **kwargs)

        trainer.optimizer.step = record
        trainer.train()
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs.append((grads, weights))
    (plain_grads, plain_weights), (ckpt_grads, ckpt_weights) = runs
    assert len(plain_grads) == len(ckpt_grads) == 1
    router = [n for n in plain_grads[0] if n.startswith("router.")]
    lora = [n for n in plain_grads[0] if "lora" in n]
    assert router and lora and set(plain_grads[0]) == set(ckpt_grads[0])
    assert any(plain_grads[0][n].abs().max() > 0 for n in router)
    for n, g in plain_grads[0].items():
        torch.testing.assert_close(ckpt_grads[0][n], g, rtol=1e-4, atol=1e-7, msg=n)
    for n, w in plain_weights.items():
        torch.testing.assert_close(ckpt_weights[n], w, rtol=1e-5, atol=1e-7, msg=n)
