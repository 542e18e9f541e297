"""Condition dropout in the trainer (``caption_dropout``, ``reference_dropout``, ``subject_dropout``): a dropped
sample's transformer inputs are exactly those of the pipeline branch it stands for, in every family; the draws follow
the trainer's seeding, so ``--resume`` stays exact; Ingredients refuses what its sampler has no branch for."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diasr_diffusers.cli import main
from diasr_diffusers.data import make_synthetic
from diasr_diffusers.routing import masks_to_token_grid, routing_labels_from_coverage
from diasr_diffusers.training import ConfigError, DiasRTrainer, TrainConfig

ROUTER = {"routed_layers": "all", "router_dim": 16, "num_identity_queries": 2, "num_heads": 2}
# Per family: a toy model, clip size, frames and text length (LTX: 8x temporal, 32x spatial; CogVideoX at 64 so that
# the subjects cover tokens of its 8x-spatial, patch-2 grid).
FAMILIES = {
    "wan": ({"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": [1, 1, 1], "ffn_dim": 32}, 32, 5, 32),
    "ltx": ({}, 64, 9, 32),
    "cogvideox": ({"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16}, 64, 5, 32),
    "hunyuan_video15": ({}, 32, 5, 24),
}  # fmt: skip


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[tuple[int, int], Path]:
    dirs = {}
    for size, frames in {(s, f) for _, s, f, _ in FAMILIES.values()}:
        out = tmp_path_factory.mktemp(f"synthetic{size}")
        make_synthetic(out, num_clips=3, seed=0, subjects=(2, 2), num_frames=frames, height=size, width=size)
        dirs[size, frames] = out
    return dirs


def _config(family: str, data_dir: Path, **overrides) -> TrainConfig:
    tiny, size, frames, tokens = FAMILIES[family]
    return TrainConfig.from_dict({
        "stage": "route", "allow_scratch": True, "train_data": str(data_dir), "model_family": family,
        "tiny_model": tiny, "height": size, "width": size, "num_frames": frames, "batch_size": 1, "max_steps": 1,
        "max_sequence_length": tokens, "router": ROUTER, "lora_rank": 2, "lora_alpha": 2, "eval_fraction": 0.0,
        **overrides,
    })  # fmt: skip


def _routing_snapshot(state) -> dict | None:
    """The routing state's inputs that decide the forward pass (not how gradients or recordings are kept)."""
    if not state.active:
        return None
    keys = ("ref_lengths", "mode", "mask_buckets", "text_segments", "phrase_features", "phrase_masks", "video_grid",
            "similarity_threshold", "ref_attends_video")  # fmt: skip
    return {**{k: getattr(state, k) for k in keys}, "router": state.router is not None}


def _same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.shape == b.shape and a.dtype == b.dtype, (where, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.equal(a, b), (where, (a.float() - b.float()).abs().max())
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        assert isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)), (where, a, b)
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


class _Capture:
    """Every call of the transformer: its arguments by name, and the routing state's inputs at that moment."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []
        self.signature = inspect.signature(pipe.transformer.forward)

    def __enter__(self):
        def hook(module, args, kwargs):
            named = self.signature.bind_partial(*args, **kwargs).arguments
            named = {k: v for k, v in named.items() if k not in ("attention_kwargs", "return_dict") and v is not None}
            self.calls.append((named, _routing_snapshot(self.pipe.routing_state)))

        self.handle = self.pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _assert_same_call(trainer_call, pipe_call) -> None:
    (ours, our_routing), (theirs, their_routing) = trainer_call, pipe_call
    t_ours, t_theirs = ours.pop("timestep"), theirs.pop("timestep")
    # The timestep: 1000 sigma in the trainer; the pipeline's scheduler gets there through its shift (float32).
    assert t_ours.shape == t_theirs.shape
    torch.testing.assert_close(t_ours.float(), t_theirs.float(), atol=0.05, rtol=0)
    _same(ours, theirs, "inputs")
    _same(our_routing, their_routing, "routing")


def _pil(ref: torch.Tensor) -> Image.Image:
    return Image.fromarray(((ref.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def _pipeline_latents(family: str, pipe, noisy: torch.Tensor) -> torch.Tensor:
    """The trainer's ``(B, C, F, h, w)`` noisy latents in the layout the pipeline's ``latents`` argument takes."""
    if family == "ltx":
        return pipe._pack_latents(noisy, pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)
    if family == "cogvideox":
        return noisy.transpose(1, 2)
    return noisy


def _trainer_and_sample(family: str, data_dirs, folder: Path, **overrides):
    """A set-up trainer, its first training item, the item's references as images, the item encoded with reference
    latents that are the pipeline's own encoding of those images, and a noise draw."""
    _, size, frames, _ = FAMILIES[family]
    trainer = DiasRTrainer(_config(family, data_dirs[size, frames], **overrides), folder / "run")
    trainer.setup()
    pipe = trainer.pipe
    pipe.set_progress_bar_config(disable=True)
    item = trainer.train_set[0]
    images = [_pil(r) for r in item["ref_images"]]
    enc = trainer._encode(item)
    pixels = pipe.video_processor.preprocess(images, height=size, width=size)[:, :, None]
    enc["refs"] = pipe.encode_video_latents(pixels)[:, :, 0].transpose(0, 1)[None].to(enc["refs"].dtype)
    noise = torch.randn(enc["x0"].shape, generator=torch.Generator().manual_seed(0))
    return trainer, item, images, enc, noise


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request, data_dirs, tmp_path_factory):
    """A trainer of the family (stage ``route``), one encoded sample whose reference latents are the pipeline's
    own encoding of the same images, and that sample noised."""
    family = request.param
    _, size, frames, tokens = FAMILIES[family]
    trainer, item, images, enc, noise = _trainer_and_sample(family, data_dirs, tmp_path_factory.mktemp(family))
    pipe = trainer.pipe
    # CogVideoX's DDIM and LTX's schedule take no sigmas: their one step is the trainer's sigma 1 (timestep T - 1 for
    # CogVideoX's "trailing" DDIM, 1000 for LTX's linspace(1, 1 / steps)).
    fixed = family in ("cogvideox", "ltx")
    sigma = torch.tensor(1.0 if fixed else 0.6)
    noisy = trainer.config.family.noisy_input(pipe, enc["x0"], noise, sigma)[0]
    call = dict(prompt=item["caption"], height=size, width=size, num_frames=frames, max_sequence_length=tokens,
                latents=_pipeline_latents(family, pipe, noisy), output_type="latent", num_inference_steps=1)  # fmt: skip
    if not fixed:
        call["sigmas"] = [float(sigma)]
    return family, trainer, enc, images, item, noise, sigma, call


def _trainer_call(trainer, enc, noise, sigma):
    with _Capture(trainer.pipe) as cap, torch.no_grad():
        trainer._forward(enc, sigma, noise, trainer.model)
    assert len(cap.calls) == 1
    return cap.calls[0]


def _pipeline_calls(pipe, **kwargs):
    with _Capture(pipe) as cap:
        pipe(**kwargs)
    return cap.calls


def test_full_sample_is_the_conditional_branch(setup):
    """The baseline the dropout tests rest on: the undropped sample is the pipeline's conditional call."""
    family, trainer, enc, images, item, noise, sigma, call = setup
    calls = _pipeline_calls(trainer.pipe, **call, subject_images=images, subject_phrases=item["phrases"],
                            routing="router", guidance_scale=1.0)  # fmt: skip
    assert len(calls) == 1
    _assert_same_call(_trainer_call(trainer, enc, noise, sigma), calls[0])


def test_caption_dropout_is_the_reference_only_branch(setup):
    """Caption dropped: the empty prompt, text not routed, no phrase anchors: three-way guidance's reference branch."""
    family, trainer, enc, images, item, noise, sigma, call = setup
    calls = _pipeline_calls(trainer.pipe, **call, subject_images=images, subject_phrases=item["phrases"],
                            routing="router", negative_prompt="", guidance_scale=2.0, guidance_scale_ref=1.5)  # fmt: skip
    assert len(calls) == 3  # conditional, negative, reference-only
    dropped = trainer.drop_conditions(enc, caption=True)
    _assert_same_call(_trainer_call(trainer, dropped, noise, sigma), calls[2])
    assert enc["routing"]["text_segments"] is not None  # the cached sample is untouched


def test_caption_and_reference_dropout_is_the_negative_branch(setup):
    family, trainer, enc, images, item, noise, sigma, call = setup
    calls = _pipeline_calls(trainer.pipe, **call, subject_images=images, subject_phrases=item["phrases"],
                            routing="router", negative_prompt="", guidance_scale=2.0)  # fmt: skip
    assert len(calls) == 2 and calls[1][1] is None  # the negative branch: no references, nothing routed
    dropped = trainer.drop_conditions(enc, caption=True, references=True)
    _assert_same_call(_trainer_call(trainer, dropped, noise, sigma), calls[1])


def test_reference_dropout_is_a_call_without_subjects(setup):
    family, trainer, enc, images, item, noise, sigma, call = setup
    calls = _pipeline_calls(trainer.pipe, **call, guidance_scale=1.0)
    assert len(calls) == 1
    dropped = trainer.drop_conditions(enc, references=True)
    _assert_same_call(_trainer_call(trainer, dropped, noise, sigma), calls[0])
    # The router does not run: the sample trains the diffusion loss only.
    pred, target, logits, anchors, _ = trainer._forward(dropped, sigma, noise, trainer.model)
    assert set(trainer._losses(dropped, pred, target, logits, anchors)) == {"diffusion", "loss"}


def test_subject_dropout_is_a_call_without_that_subject(setup):
    family, trainer, enc, images, item, noise, sigma, call = setup
    k = int(torch.stack([(enc["labels"] == s).sum() for s in range(2)]).argmax())  # the subject with more tokens
    calls = _pipeline_calls(trainer.pipe, **call, subject_images=[images[1 - k]], subject_phrases=[item["phrases"][1 - k]],
                            routing="router", guidance_scale=1.0)  # fmt: skip
    # The VAE's last bits depend on the batch: encode the kept reference alone, as the pipeline now does.
    size = call["height"]
    alone = trainer.pipe.encode_video_latents(trainer.pipe.video_processor.preprocess([images[1 - k]], height=size, width=size)[:, :, None])
    refs = enc["refs"].clone()
    refs[:, :, 1 - k] = alone[0, :, 0]
    dropped = trainer.drop_conditions({**enc, "refs": refs}, subjects=(k,))
    _assert_same_call(_trainer_call(trainer, dropped, noise, sigma), calls[0])
    # Routing targets: the dropped subject's tokens are background now, the other one is subject 0.
    labels = enc["labels"]
    expected = torch.where(labels == k, -1, torch.where(labels == 1 - k, 0, labels))
    assert torch.equal(dropped["labels"], expected)
    if family != "ltx":  # LTX's toy grid (2 x 2 tokens a frame) is too coarse for a sprite to own a token
        assert (labels == k).any()
    torch.testing.assert_close(dropped["coverage"], enc["coverage"][:, [1 - k]])
    pred, target, logits, anchors, _ = trainer._forward(dropped, sigma, noise, trainer.model)
    assert "route" in trainer._losses(dropped, pred, target, logits, anchors)


# -- configuration, draws, resume ---------------------------------------------------------------------------------


def _wan_dict(data_dir: Path, **overrides) -> dict:
    tiny, size, frames, tokens = FAMILIES["wan"]
    return {"stage": "route", "allow_scratch": True, "train_data": str(data_dir), "tiny_model": tiny, "height": size,
            "width": size, "num_frames": frames, "batch_size": 2, "max_steps": 4, "max_sequence_length": tokens,
            "learning_rate": 3e-3, "router": ROUTER, "lora_rank": 2, "lora_alpha": 2, "checkpointing_steps": 2,
            "eval_fraction": 0.0, **overrides}  # fmt: skip


@pytest.mark.parametrize("key", ["caption_dropout", "reference_dropout", "subject_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, "often"])
def test_dropout_probabilities_are_checked(data_dirs, key, value):
    with pytest.raises(ConfigError, match=f"`{key}` must be"):
        TrainConfig.from_dict(_wan_dict(data_dirs[32, 5], **{key: value}))


def test_documented_defaults(data_dirs):
    cfg = TrainConfig.from_dict(_wan_dict(data_dirs[32, 5]))
    assert (cfg.caption_dropout, cfg.reference_dropout, cfg.subject_dropout) == (0.1, 0.1, 0.0)


def test_ingredients_refuses_reference_dropout_by_name(data_dirs):
    base = {"stage": "route", "train_data": str(data_dirs[32, 5]), "model_family": "ingredients", "tiny_model": {},
            "height": 32, "width": 32, "num_frames": 5}  # fmt: skip
    cfg = TrainConfig.from_dict(base)  # its defaults: caption dropout only
    assert (cfg.caption_dropout, cfg.reference_dropout, cfg.subject_dropout) == (0.1, 0.0, 0.0)
    for key in ("reference_dropout", "subject_dropout"):
        with pytest.raises(ConfigError, match=f"`{key}` is not supported with model_family ingredients"):
            TrainConfig.from_dict({**base, key: 0.1})


def test_draws_follow_the_seeding_and_the_probabilities(data_dirs, tmp_path):
    trainer = DiasRTrainer(TrainConfig.from_dict(_wan_dict(data_dirs[32, 5], caption_dropout=0.3,
                                                           reference_dropout=0.2, subject_dropout=0.25)), tmp_path / "r")  # fmt: skip
    trainer.setup()
    enc = trainer._encode(trainer.train_set[0])
    calls = []
    trainer.drop_conditions = lambda e, caption, references, subjects: calls.append((caption, references, subjects)) or e
    for step in range(400):
        trainer._dropout(enc, step, step % 3)
    again = []
    trainer.drop_conditions = lambda e, caption, references, subjects: again.append((caption, references, subjects)) or e
    for step in range(400):
        trainer._dropout(enc, step, step % 3)
    assert calls == again  # a function of (seed, step, sample): a resumed run draws the same
    rates = np.mean([[c, r, 0 in s, 1 in s] for c, r, s in calls], axis=0)
    np.testing.assert_allclose(rates, [0.3, 0.2, 0.25, 0.25], atol=0.07)
    # Probabilities 0: the sample itself, never a copy.
    trainer.config.caption_dropout = trainer.config.reference_dropout = trainer.config.subject_dropout = 0.0
    del trainer.drop_conditions
    assert all(trainer._dropout(enc, step, 0) is enc for step in range(50))


def test_resume_continues_exactly_with_dropout(data_dirs, tmp_path):
    import yaml

    drop = {"caption_dropout": 0.4, "reference_dropout": 0.3, "subject_dropout": 0.3, "stage": "align"}
    full, half = tmp_path / "full.yaml", tmp_path / "half.yaml"
    full.write_text(yaml.safe_dump(_wan_dict(data_dirs[32, 5], **drop)))
    half.write_text(yaml.safe_dump(_wan_dict(data_dirs[32, 5], **drop, max_steps=2)))
    assert main(["train", "--config", str(full), "--output-dir", str(tmp_path / "a")]) == 0
    assert main(["train", "--config", str(half), "--output-dir", str(tmp_path / "b")]) == 0
    assert main(["train", "--config", str(full), "--output-dir", str(tmp_path / "b"), "--resume"]) == 0
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), (k, ma, mb)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "router" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "router" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_checkpoint_from_before_dropout_resumes_with_dropout_off(data_dirs, tmp_path):
    import yaml

    off = {"caption_dropout": 0.0, "reference_dropout": 0.0, "subject_dropout": 0.0}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_wan_dict(data_dirs[32, 5], **off, max_steps=2)))
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "r")]) == 0
    state_path = tmp_path / "r" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    for key in off:  # as written before the keys existed
        del state["config"][key]
    state_path.write_text(json.dumps(state))
    trainer = DiasRTrainer(TrainConfig.from_dict(_wan_dict(data_dirs[32, 5], **off, max_steps=4)), tmp_path / "r", resume=True)
    assert trainer.check_output_dir().name == "checkpoint-2"
    on = DiasRTrainer(TrainConfig.from_dict(_wan_dict(data_dirs[32, 5], max_steps=4)), tmp_path / "r", resume=True)
    with pytest.raises(ValueError, match="caption_dropout: 0.0 there, 0.1 here"):
        on.check_output_dir()


def test_phantom_style_drops_references_as_zero_frames(data_dirs, tmp_path):
    """Phantom / SkyReels keep the reference frames as zeros in the negative branch, routed as the conditional pass
    routed: with the layout as routing (stage ``align``, ``routing="masks"``) that is the layout itself."""
    _, size, frames, tokens = FAMILIES["wan"]
    trainer, item, images, enc, noise = _trainer_and_sample("wan", data_dirs, tmp_path, stage="align")
    pipe = trainer.pipe
    pipe.set_reference_style("phantom", scheduler=False)  # its zero-frame negative branch; the toy's scheduler
    # A layout in which each subject owns tokens (the tiny clips' sprites cover under half of every token, which the
    # pipeline refuses as a layout): left half subject 0, right half subject 1, labelled by the dataset's rule.
    masks = torch.zeros(2, frames, size, size, dtype=torch.bool)
    masks[0, ..., : size // 2] = True
    masks[1, ..., size // 2 :] = True
    coverage = masks_to_token_grid(masks[None].float(), transformer=pipe.transformer, vae=pipe.vae)
    enc["labels"], enc["coverage"] = routing_labels_from_coverage(coverage), coverage.flatten(2)
    item = {**item, "masks": masks}
    sigma = torch.tensor(0.6)
    noisy = trainer.config.family.noisy_input(pipe, enc["x0"], noise, sigma)[0]
    calls = _pipeline_calls(pipe, prompt=item["caption"], subject_images=images, subject_phrases=item["phrases"],
                            routing="masks", subject_masks=item["masks"], negative_prompt="", guidance_scale=2.0,
                            guidance_scale_ref=None, sigmas=[float(sigma)], latents=noisy, height=size, width=size,
                            num_frames=frames, max_sequence_length=tokens, num_inference_steps=1, output_type="latent")  # fmt: skip
    negative = calls[1]
    assert negative[1]["mode"] == "masks" and torch.equal(negative[1]["mask_buckets"], enc["labels"])
    dropped = trainer.drop_conditions(enc, caption=True, references=True)
    assert dropped["refs"].shape == enc["refs"].shape and not dropped["refs"].any()
    _assert_same_call(_trainer_call(trainer, dropped, noise, sigma), negative)
