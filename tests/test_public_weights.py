"""Public reference-trained weights (Phantom-Wan, SkyReels-V3 R2V) through DiasRPipeline.

The heart: an independent re-implementation of each original sampling loop, written from the conventions in
PUBLIC_WEIGHTS.md (not from our pipeline), on a tiny random Wan2.1 transformer saved in the original Wan key format
exactly like the released files. ``DiasRPipeline(routing="dense")`` with the matching ``reference_style`` must
reproduce it. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from PIL import Image, ImageOps
from safetensors.torch import save_file

from diasr_diffusers import DiasRPipeline
from diasr_diffusers.pipelines.reference_styles import WAN_NEGATIVE_PROMPT
from diasr_diffusers.utils.tiny import tiny_wan_components

H, W, FRAMES = 32, 48, 5  # latent 2 frames of 4x6
TEXT_LEN = 64  # Wan pads to 512 tokens; the convention is the same at any length, and 64 keeps the tests fast
PROMPT = "the man and the woman walk with the dog in a park"
NEG = "dark"


class _NotATensor:
    """Pickled by torch.save; torch.load(weights_only=True) must refuse it."""


# -- the original file layouts ---------------------------------------------------------------------------------


def _original_key(key: str) -> str:
    """Diffusers name -> the name in Wan's released checkpoints (Phantom's `WanModel`), written out by hand."""
    if key == "scale_shift_table":
        return "head.modulation"
    for new, old in (
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("proj_out", "head.head"),
        (".attn1.", ".self_attn."),
        (".attn2.", ".cross_attn."),
        (".to_q.", ".q."),
        (".to_k.", ".k."),
        (".to_v.", ".v."),
        (".to_out.0.", ".o."),
        (".ffn.net.0.proj.", ".ffn.0."),
        (".ffn.net.2.", ".ffn.2."),
        (".norm2.", ".norm3."),  # Wan's affine cross-attention norm is norm3; Diffusers calls it norm2
    ):
        key = key.replace(new, old)
    return re.sub(r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation", key)


# Every key of one block of Wan2.1's released T2V checkpoints (e.g. Phantom-Wan-1.3B.pth).
WAN_BLOCK_KEYS = {
    "modulation",
    *(f"{a}.{p}.{s}" for a in ("self_attn", "cross_attn") for p in "qkvo" for s in ("weight", "bias")),
    *(f"{a}.{n}.weight" for a in ("self_attn", "cross_attn") for n in ("norm_q", "norm_k")),
    "norm3.weight",
    "norm3.bias",
    "ffn.0.weight",
    "ffn.0.bias",
    "ffn.2.weight",
    "ffn.2.bias",
}
WAN_TOP_KEYS = {
    *(f"{m}.{i}.{s}" for m in ("text_embedding", "time_embedding") for i in (0, 2) for s in ("weight", "bias")),
    "time_projection.1.weight",
    "time_projection.1.bias",
    "patch_embedding.weight",
    "patch_embedding.bias",
    "head.head.weight",
    "head.head.bias",
    "head.modulation",
}


def _original_state_dict(transformer: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    sd = {_original_key(k): v.detach().clone() for k, v in transformer.state_dict().items()}
    n = transformer.config.num_layers
    assert set(sd) == WAN_TOP_KEYS | {f"blocks.{i}.{k}" for i in range(n) for k in WAN_BLOCK_KEYS}
    return sd


def _write_shards(sd: dict[str, torch.Tensor], folder: Path, parts: int = 3) -> Path:
    """Like Phantom_Wan_14B-0000k-of-0000n.safetensors + Phantom_Wan_14B.safetensors.index.json."""
    keys = sorted(sd)
    weight_map = {}
    for i in range(parts):
        name = f"Phantom_Wan_14B-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {k: sd[k].contiguous() for k in keys[i::parts]}
        save_file(chunk, str(folder / name))
        weight_map.update(dict.fromkeys(chunk, name))
    index = folder / "Phantom_Wan_14B.safetensors.index.json"
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    comps = tiny_wan_components(seed=0)
    phantom = comps["transformer"]  # the "released" weights
    for proc in phantom.attn_processors:
        assert type(phantom.attn_processors[proc]) is WanAttnProcessor
    # The base ships another transformer: loading must replace it, not use it.
    base = WanPipeline(**{**comps, "transformer": tiny_wan_components(seed=1)["transformer"]})
    base.save_pretrained(root / "base")
    sd = _original_state_dict(phantom)
    torch.save(sd, root / "Phantom-Wan-1.3B.pth")
    (root / "shards").mkdir()
    index = _write_shards(sd, root / "shards")
    return {"root": root, "comps": comps, "phantom": phantom, "base": root / "base", "sd": sd, "index": index}


@pytest.fixture(scope="module")
def phantom_pipe(files):
    return DiasRPipeline.from_phantom(files["root"] / "Phantom-Wan-1.3B.pth", base=str(files["base"]))


def _images(seed: int, sizes) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


# -- independent re-implementations of the original samplers ----------------------------------------------------


def _fit_white(image: Image.Image, w: int, h: int) -> Image.Image:
    """`load_ref_images` of Phantom's generate.py / SkyReels' resize_ref_images."""
    image = image.convert("RGB")
    ratio = image.width / image.height
    if ratio > w / h:
        nw, nh = w, int(w / ratio)
    else:
        nh, nw = h, int(h * ratio)
    image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    dw, dh = w - nw, h - nh
    return ImageOps.expand(image, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=(255, 255, 255))


def _text(comps, text: str) -> torch.Tensor:
    """Wan's T5 wrapper: padded tokens, features cut at the true length, zero-padded back (Wan: 512)."""
    tok = comps["tokenizer"](
        [" ".join(text.split())], padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt"
    )
    ids, mask = tok.input_ids, tok.attention_mask
    out = comps["text_encoder"](ids, mask).last_hidden_state
    n = int(mask.sum())
    return torch.cat([out[:, :n], out.new_zeros(1, TEXT_LEN - n, out.shape[-1])], dim=1)


def _ref_latent(vae, image: Image.Image, generator=None) -> torch.Tensor:
    """One image as a 1-frame video: VAE mean (Phantom) or a sample with the generator (SkyReels), normalised."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = x.sub(0.5).div(0.5)[None, :, None]
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator) if generator is not None else dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (z - mean) * (1.0 / std)


def _model(transformer, x, t, ctx):
    return transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=ctx, return_dict=False)[0]


@torch.no_grad()
def phantom_original(comps, transformer, refs, prompt, neg, steps, g_img, g_text, seed):
    """Phantom_Wan_S2V.generate (subject2video.py), batch 1, fp32."""
    ctx, ctx_null = _text(comps, prompt), _text(comps, neg)
    ref = torch.cat([_ref_latent(comps["vae"], _fit_white(im, W, H)) for im in refs], dim=2)
    n = ref.shape[2]
    f_lat = (FRAMES - 1) // 4 + 1
    latent = torch.randn(1, 16, f_lat + n, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )
    sched.set_timesteps(sigmas=np.linspace(0.999, 0, steps + 1)[:-1])
    for t in sched.timesteps:
        x = torch.cat([latent[:, :, :-n], ref], dim=2)
        x_neg = torch.cat([latent[:, :, :-n], torch.zeros_like(ref)], dim=2)
        pos_it = _model(transformer, x, t, ctx)
        pos_i = _model(transformer, x, t, ctx_null)
        neg_ = _model(transformer, x_neg, t, ctx_null)
        noise = neg_ + g_img * (pos_i - neg_) + g_text * (pos_it - pos_i)
        latent = sched.step(noise, t, latent, return_dict=False)[0]
    return latent[:, :, :-n]


@torch.no_grad()
def skyreels_original(comps, transformer, refs, prompt, neg, steps, g_img, g, seed):
    """WanSkyReelsA2WanT2VPipeline.__call__ (reference_to_video_pipeline.py), batch 1, fp32."""
    ctx, ctx_null = _text(comps, prompt), _text(comps, neg)
    generator = torch.Generator().manual_seed(seed)
    f_lat = (FRAMES - 1) // 4 + 1
    latents = torch.randn(1, 16, f_lat, H // 8, W // 8, generator=generator)
    cond = [_ref_latent(comps["vae"], _fit_white(im, W, H), generator) for im in refs]
    cond += [torch.zeros(1, 16, 1, H // 8, W // 8)] * (4 - len(cond))
    cond = torch.cat(cond, dim=2)
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        c = _model(transformer, torch.cat([latents, cond], dim=2), t, ctx)[:, :, :f_lat]
        if g > 1:
            u_t = _model(transformer, torch.cat([latents, cond], dim=2), t, ctx_null)[:, :, :f_lat]
            u_ti = _model(transformer, torch.cat([latents, torch.zeros_like(cond)], dim=2), t, ctx_null)[:, :, :f_lat]
            c = u_ti + g_img * (u_t - u_ti) + g * (c - u_t)
        latents = sched.step(c, t, latents, return_dict=False)[0]
    return latents


# -- loading -----------------------------------------------------------------------------------------------------


def test_converted_transformer_equals_the_original_weights(files, phantom_pipe):
    """Key by key after Diffusers' conversion, so its forward is the original tiny model's."""
    ours = phantom_pipe.transformer.state_dict()
    theirs = files["phantom"].state_dict()
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    x = torch.randn(1, 16, 3, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([700])
    # Our processors installed, no subjects active: the stock forward.
    assert torch.equal(_model(phantom_pipe.transformer, x, t, ctx), _model(files["phantom"], x, t, ctx))


def test_from_phantom_records_the_style_and_scheduler(phantom_pipe):
    assert phantom_pipe.config.reference_style == "phantom"
    assert isinstance(phantom_pipe.scheduler, UniPCMultistepScheduler)
    assert phantom_pipe.scheduler.config.flow_shift == 5.0 and phantom_pipe.scheduler.config.use_flow_sigmas


@pytest.mark.parametrize("source", ["index", "one_shard", "shard_list", "folder"])
def test_sharded_checkpoint_loads_like_the_pth(files, source):
    from diasr_diffusers.pipelines.public_weights import load_original_wan_state_dict

    shards = sorted((files["root"] / "shards").glob("*.safetensors"))
    arg = {"index": files["index"], "one_shard": shards[1], "shard_list": shards, "folder": files["root"] / "shards"}
    sd = load_original_wan_state_dict(arg[source])
    assert set(sd) == set(files["sd"])
    assert all(torch.equal(sd[k], files["sd"][k]) for k in sd)


def test_hub_repo_id_downloads_the_default_files_per_size(files, monkeypatch):
    import huggingface_hub

    from diasr_diffusers.pipelines.public_weights import load_original_wan_state_dict

    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        folder = files["root"] if filename.endswith(".pth") else files["root"] / "shards"
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert set(load_original_wan_state_dict("bytedance-research/Phantom", size="1.3B")) == set(files["sd"])
    assert asked == [("bytedance-research/Phantom", "Phantom-Wan-1.3B.pth")]
    asked.clear()
    assert set(load_original_wan_state_dict("bytedance-research/Phantom", size="14B")) == set(files["sd"])
    assert asked[0] == ("bytedance-research/Phantom", "Phantom_Wan_14B.safetensors.index.json")
    assert sorted(f for _, f in asked[1:]) == [f"Phantom_Wan_14B-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_loader_errors_name_what_is_wrong(files, tmp_path):
    from diasr_diffusers.pipelines.public_weights import load_original_wan_state_dict, wan_transformer_from_original

    cfg = dict(files["phantom"].config)
    # Not a Wan checkpoint.
    torch.save({"encoder.conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"not a Wan2\.1 transformer.*patch_embedding\.weight"):
        DiasRPipeline.from_phantom(tmp_path / "other.pth", base=str(files["base"]))
    # A pickle that is not a state dict (weights_only refuses arbitrary objects; a plain list is allowed).
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_original_wan_state_dict(tmp_path / "list.pth")
    # Pickled code is refused (weights_only), and a truncated shard is named.
    torch.save(_NotATensor(), tmp_path / "code.pth")
    with pytest.raises(ValueError, match=r"objects other than tensors") as info:
        load_original_wan_state_dict(tmp_path / "code.pth")
    assert "weights_only=False" not in str(info.value)  # torch's hint at the unsafe path is never passed on
    (tmp_path / "cut.safetensors").write_bytes(
        files["index"].with_name("Phantom_Wan_14B-00001-of-00003.safetensors").read_bytes()[:50]
    )
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors"):
        load_original_wan_state_dict(tmp_path / "cut.safetensors")
    # A missing and an unexpected key, listed by name.
    sd = dict(files["sd"])
    sd.pop("blocks.1.ffn.2.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\) \[blocks\.1\.ffn\.net\.2\.bias\].*unexpected 1 .*extra"):
        wan_transformer_from_original(sd, cfg)
    # A size that is not Wan2.1's 1.3B/14B needs its config (the head count is not in the weights).
    with pytest.raises(ValueError, match="pass `transformer_config`"):
        wan_transformer_from_original(files["sd"], None)
    with pytest.raises(ValueError, match="ffn_dim: weights 32, config 64"):
        wan_transformer_from_original(files["sd"], {**cfg, "ffn_dim": 64})
    # Shards: one missing from the folder, and an index naming an absent file.
    folder = tmp_path / "shards"
    folder.mkdir()
    for p in (files["root"] / "shards").iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "Phantom_Wan_14B-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match="absent from .*Phantom_Wan_14B-00002-of-00003"):
        load_original_wan_state_dict(folder / "Phantom_Wan_14B.safetensors.index.json")
    with pytest.raises(ValueError, match="missing shard.*00002-of-00003"):
        load_original_wan_state_dict(folder / "Phantom_Wan_14B-00001-of-00003.safetensors")
    with pytest.raises(ValueError, match="neither an existing file"):
        load_original_wan_state_dict(str(tmp_path / "nope" / "x.pth"))


def test_skyreels_v3_folder_loads_with_its_class_name(files, tmp_path):
    comps = files["comps"]
    folder = tmp_path / "skyreels"
    WanPipeline(**comps).save_pretrained(folder)
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "SkyReelsA2WanI2v3DModel"
    cfg_path.write_text(json.dumps(cfg))
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "WanSkyReelsA2WanT2VPipeline"
    index["transformer"] = ["skyreels_v3.modules.reference_to_video.transformer", "SkyReelsA2WanI2v3DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = DiasRPipeline.from_skyreels_v3(str(folder))
    assert pipe.config.reference_style == "skyreels_v3"
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), comps["transformer"].parameters()))
    cfg["_class_name"] = "UNet2DConditionModel"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="SkyReelsA2WanI2v3DModel"):
        DiasRPipeline.from_skyreels_v3(str(folder))


# -- exactness ---------------------------------------------------------------------------------------------------

# Odd aspect ratios throughout; "two_subjects" gives its first subject two images.
CASES = {
    "two_subjects": ([(40, 28), (61, 17), (17, 61)], ["the man", "the woman"]),
    "three_subjects": ([(40, 28), (33, 33), (90, 20)], ["the man", "the woman", "the dog"]),
}


def _subject_images(case):
    sizes, phrases = CASES[case]
    images = _images(len(sizes), sizes)
    if case == "two_subjects":
        return [images[:2], images[2]], images, phrases
    return images, images, phrases


@pytest.mark.parametrize("case", sorted(CASES))
def test_phantom_dense_reproduces_the_original_sampler(files, phantom_pipe, case):
    subject_images, flat, phrases = _subject_images(case)
    expected = phantom_original(files["comps"], files["phantom"], flat, PROMPT, NEG, 3, 5.0, 7.5, seed=7)
    out = phantom_pipe(
        prompt=PROMPT,
        negative_prompt=NEG,
        subject_images=subject_images,
        subject_phrases=phrases,
        height=H,
        width=W,
        num_frames=FRAMES,
        num_inference_steps=3,
        routing="dense",
        output_type="latent",
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(7),
    ).frames
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_phantom_defaults_are_the_originals(phantom_pipe, monkeypatch):
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(phantom_pipe, "encode_prompt", spy)
    with pytest.raises(RuntimeError, match="stop"):
        phantom_pipe(prompt=PROMPT, subject_images=_images(0, [(8, 8)]), height=H, width=W, routing="dense")
    assert seen["negative_prompt"] == WAN_NEGATIVE_PROMPT
    assert phantom_pipe.guidance_scale == 7.5
    style = phantom_pipe.reference_style
    assert (style.guidance_scale_ref, style.num_inference_steps, style.num_frames, style.fps) == (5.0, 50, 81, 16)


@pytest.mark.parametrize(
    "case, g, g_img",
    [("two_subjects", 3.0, 2.0), ("three_subjects", 1.0, 1.0)],
    ids=["three_way", "shipped_cli_one_pass"],
)
def test_skyreels_dense_reproduces_the_original_sampler(files, case, g, g_img):
    pipe = DiasRPipeline(**files["comps"], reference_style="skyreels_v3")
    pipe.set_reference_style("skyreels_v3")
    subject_images, flat, phrases = _subject_images(case)
    expected = skyreels_original(files["comps"], files["phantom"], flat, PROMPT, NEG, 3, g_img, g, seed=11)
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEG,
        subject_images=subject_images,
        subject_phrases=phrases,
        height=H,
        width=W,
        num_frames=FRAMES,
        num_inference_steps=3,
        guidance_scale=g,
        guidance_scale_ref=g_img,
        routing="dense",
        output_type="latent",
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(11),
    ).frames
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_skyreels_rejects_more_than_four_references(files):
    pipe = DiasRPipeline(**files["comps"], reference_style="skyreels_v3")
    with pytest.raises(ValueError, match="at most 4 reference images in all.*got 5"):
        pipe(
            prompt=PROMPT,
            subject_images=[_images(0, [(8, 8)] * 3), *_images(1, [(8, 8)] * 2)],
            height=H,
            width=W,
            num_frames=FRAMES,
        )


# -- routed modes on the converted model, and the round trip ------------------------------------------------------


def _call(pipe, **kwargs):
    images, _, phrases = _subject_images("two_subjects")
    return pipe(
        prompt=PROMPT,
        negative_prompt=NEG,
        subject_images=images,
        subject_phrases=phrases,
        height=H,
        width=W,
        num_frames=FRAMES,
        num_inference_steps=1,
        output_type="latent",
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(5),
        **kwargs,
    )


def test_routed_modes_run_on_public_styles(files, phantom_pipe):
    skyreels = DiasRPipeline(**files["comps"], reference_style="skyreels_v3")
    kwargs = {"guidance_scale": 3.0, "guidance_scale_ref": 2.0}
    masks = np.zeros((2, H, W), dtype=bool)
    masks[0, :, : W // 2] = True
    masks[1, :, W // 2 :] = True
    runs = [(phantom_pipe, "similarity", {}), (phantom_pipe, "masks", {"subject_masks": masks})]
    runs += [(skyreels, "masks", {"subject_masks": masks})]  # SkyReels' padding frames dropped when routed
    dense = {id(p): _call(p, routing="dense", **kwargs).frames for p in (phantom_pipe, skyreels)}
    for pipe, routing, extra in runs:
        dense_frames = dense[id(pipe)]
        out = _call(pipe, routing=routing, return_routing_maps=True, **kwargs, **extra)
        assert out.frames.shape == dense_frames.shape and torch.isfinite(out.frames).all()
        assert out.routing_maps.shape == (1, 2, H // 16, W // 16)
        assert not torch.allclose(out.frames, dense_frames)
        if routing == "masks":
            assert (out.routing_maps[0, :, :, :1] == 0).all() and (out.routing_maps[0, :, :, -1:] == 1).all()


def test_save_pretrained_round_trip_keeps_the_style(phantom_pipe, tmp_path):
    phantom_pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["reference_style"] == "phantom" and index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    again = DiasRPipeline.from_pretrained(tmp_path / "saved")
    assert again.config.reference_style == "phantom"
    assert isinstance(again.scheduler, UniPCMultistepScheduler) and again.scheduler.config.flow_shift == 5.0
    a = _call(phantom_pipe, routing="dense").frames
    b = _call(again, routing="dense").frames
    for name in ("transformer", "text_encoder", "vae"):
        reloaded = dict(getattr(again, name).state_dict())
        assert all(torch.equal(v, reloaded[k]) for k, v in getattr(phantom_pipe, name).state_dict().items()), name
    # Same weights; float summation order may differ between the two model instances (a few 1e-6).
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_diasr_style_is_the_default_and_unknown_styles_are_rejected(files):
    pipe = DiasRPipeline(**files["comps"])
    assert pipe.config.reference_style == "diasr" and pipe.reference_style.zero_negative_references is False
    with pytest.raises(ValueError, match="`reference_style` must be one of"):
        DiasRPipeline(**files["comps"], reference_style="phantom14b")


def test_wrong_scheduler_and_untrained_size_warn(files, caplog):
    from diffusers.utils import logging as dlogging

    pipe = DiasRPipeline(**files["comps"], reference_style="phantom")  # keeps the base's Euler scheduler
    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            pipe.check_reference_style_inputs([_images(0, [(8, 8)])], H, W, FRAMES, "dense")
    finally:
        dlogging.disable_propagation()
    assert "will not reproduce the original sampler" in caplog.text
    assert "not a size the 'phantom' weights were trained at" in caplog.text


# -- CLI -------------------------------------------------------------------------------------------------------


def test_cli_generate_from_phantom_checkpoint(files, tmp_path, capsys):
    from diasr_diffusers.cli import main

    _images(0, [(40, 28)])[0].save(tmp_path / "man.png")
    out = tmp_path / "clip.mp4"
    args = ["generate", "--phantom", str(files["root"] / "Phantom-Wan-1.3B.pth"), "--base", str(files["base"])]
    args += ["--prompt", PROMPT, "--subject", f"the man={tmp_path / 'man.png'}", "--out", str(out)]
    args += "--frames 5 --height 32 --width 48 --steps 1 --device cpu --routing dense".split()
    assert main(args) == 0
    assert out.is_file() and out.stat().st_size > 0
    assert json.loads(capsys.readouterr().out)["frames"] == 5


def test_cli_rejects_bad_public_weight_sources(files, tmp_path, capsys):
    from diasr_diffusers.cli import main

    common = ["--prompt", PROMPT, "--out", str(tmp_path / "x.mp4")]
    assert main(["generate", "--model", str(files["base"]), "--base", str(files["base"]), *common]) == 2
    assert "--base is only used with --phantom" in capsys.readouterr().err
    torch.save({"encoder.conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    assert main(["generate", "--phantom", str(tmp_path / "other.pth"), "--base", str(files["base"]), *common]) == 2
    err = capsys.readouterr().err
    assert "--phantom" in err and "not a Wan2.1 transformer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.mp4").exists()


def test_phantom_model_card_example_runs(phantom_pipe, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, ModelCardData

    phantom_pipe.save_pretrained(tmp_path / "repo")
    for i, image in enumerate(_images(2, [(40, 28), (17, 61)])):
        image.save(tmp_path / f"ref{i}.png")
    card = ModelCard.from_template(
        ModelCardData(
            library_name="diasr-diffusers", pipeline_tag="text-to-video", base_model="bytedance-research/Phantom"
        ),
        template_path=str(Path(__file__).resolve().parents[1] / "hub_configs" / "README_phantom.md"),
        repo_id=str(tmp_path / "repo"),
        prompt=PROMPT,
        image_0=str(tmp_path / "ref0.png"),
        image_1=str(tmp_path / "ref1.png"),
        phrase_0="the man",
        phrase_1="the woman",
        height=H,
        width=W,
        num_frames=FRAMES,
        num_inference_steps=1,
    )
    text = str(card)
    assert "{{" not in text
    snippet = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "phantom_model_card", "exec"), namespace)  # noqa: S102 - the card's own example
    assert (tmp_path / "output.mp4").stat().st_size > 0
    assert namespace["out"].frames[0].shape == (FRAMES, H, W, 3)
