"""DiasR on CogVideoX: the joint-attention adapter, DiasRCogVideoXPipeline and training, on a tiny in-process model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from PIL import Image
from pipeline_tester import SubjectPipelineTesterMixin

from diasr_diffusers import IDRouter
from diasr_diffusers.pipelines import DiasRCogVideoXPipeline
from diasr_diffusers.processors import (
    CogVideoXSubjectSparseAttnProcessor,
    SubjectRoutingState,
    TextSegments,
    set_cogvideox_subject_sparse_attn_processor,
)
from diasr_diffusers.processors.core import block_indices, routed_joint_attention
from diasr_diffusers.routing import masks_to_token_grid, routing_labels_from_coverage, token_grid_factors
from diasr_diffusers.utils.tiny import tiny_cogvideox_components

PROMPT = "the red star and the blue bottle dance in the park"
PHRASES = ["the red star", "the blue bottle"]
KW = dict(prompt=PROMPT, height=32, width=32, num_frames=9, num_inference_steps=2, max_sequence_length=16)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def components():
    return tiny_cogvideox_components()


@pytest.fixture(scope="module")
def pipe(components):
    return DiasRCogVideoXPipeline(**components)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (64, 96), (220, 40, 40)), Image.new("RGB", (80, 40), (40, 90, 230))]


def halves() -> torch.Tensor:
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :, :16], masks[1, :, 16:] = True, True
    return masks


# -- processor ---------------------------------------------------------------------------------------------------


def _reference_joint(attn, hidden, text, rope, visible):
    """Test-only CogVideoX attention with an explicit (L, L) visibility mask over [text | video | refs]."""
    x = torch.cat([text, hidden], 1)
    b, length, _ = x.shape
    q, k, v = (p(x).view(b, length, attn.heads, -1).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    lt = text.shape[1]
    q = torch.cat([q[:, :, :lt], apply_rotary_emb(q[:, :, lt:], rope)], 2)
    k = torch.cat([k[:, :, :lt], apply_rotary_emb(k[:, :, lt:], rope)], 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])
    out = attn.to_out[0](out.transpose(1, 2).reshape(b, length, -1))
    return out[:, lt:], out[:, :lt]


def _visibility(buckets, lt, lv, ref_lengths, owner, ref_attends_video):
    """The documented who-sees-what rules, written out as a (B, L, L) boolean mask. ``owner``: per text token, the
    subject whose phrase it is (-1: general text), or None without text routing."""
    subj_of_ref = torch.cat([torch.full((n,), s) for s, n in enumerate(ref_lengths)])
    length = lt + lv + len(subj_of_ref)
    masks = []
    for bk in buckets:
        m = torch.zeros(length, length, dtype=torch.bool)
        m[:lt, : lt + lv] = True  # text queries: text + video
        for i in range(lv):
            s = int(bk[i])
            m[lt + i, lt : lt + lv] = True
            m[lt + i, :lt] = True if owner is None else (owner == -1) | (owner == s)
            m[lt + i, lt + lv :] = subj_of_ref == s
        for j, s in enumerate(subj_of_ref.tolist()):
            row = lt + lv + j
            m[row, :lt] = True if owner is None else (owner == -1) | (owner == s)
            m[row, lt + lv :] = subj_of_ref == s
            m[row, lt : lt + lv] = ref_attends_video
        masks.append(m)
    return torch.stack(masks)


@pytest.mark.parametrize("text_routing", [False, True])
@pytest.mark.parametrize("ref_attends_video", [False, True])
def test_routed_attention_matches_an_explicit_mask(components, text_routing, ref_attends_video):
    torch.manual_seed(0)
    attn = components["transformer"].transformer_blocks[0].attn1
    lt, grid, ref_lengths = 6, (2, 2, 2), [4, 8]
    lv = math.prod(grid)
    hidden, text = torch.randn(2, lv + sum(ref_lengths), 32), torch.randn(2, lt, 32)
    rope = (torch.randn(lv + sum(ref_lengths), 16), torch.randn(lv + sum(ref_lengths), 16))
    buckets = torch.tensor([[0, 1, -1, 0, 1, 1, -1, 0], [1, 1, 0, -1, -1, 0, 1, 0]])
    owner = torch.tensor([-1, 0, 0, -1, 1, -1]) if text_routing else None
    segments = None
    if text_routing:
        order = torch.tensor([0, 3, 5, 1, 2, 4])
        segments = [TextSegments(order=order, lengths=[2, 1])] * 2
    state = SubjectRoutingState()
    proc = CogVideoXSubjectSparseAttnProcessor(state, layer_idx=0)
    with state.activate(ref_lengths=ref_lengths, mode="masks", mask_buckets=buckets, text_segments=segments,
                        ref_attends_video=ref_attends_video, backend="torch"):  # fmt: skip
        video, txt = proc(attn, hidden, text, None, rope)
    visible = _visibility(buckets, lt, lv, ref_lengths, owner, ref_attends_video)
    ref_video, ref_txt = _reference_joint(attn, hidden, text, rope, visible)
    torch.testing.assert_close(video, ref_video, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)


def test_joint_attention_keeps_each_subject_to_its_tokens():
    """Perturbing subject 1's phrase and references moves only the video tokens routed to 1 (and 1's references)."""
    torch.manual_seed(1)
    lt, lv, refs = 5, 6, [3, 3]
    parts = [tuple(torch.randn(1, n, 2, 8) for _ in range(3)) for n in (lt, lv, sum(refs))]
    buckets = torch.tensor([[0, 1, -1, 1, 0, -1]])
    seg = [TextSegments(order=torch.tensor([0, 4, 1, 2, 3]), lengths=[1, 2])]  # phrase 0: token 1; phrase 1: 2, 3
    state = SubjectRoutingState(ref_lengths=refs, text_segments=seg, backend="torch")
    text_out, video_out, ref_out = routed_joint_attention(state, buckets, *parts)
    moved = [tuple(t.clone() for t in p) for p in parts]
    for t in moved[0][1:]:
        t[:, 2:4] += 5.0  # phrase 1's keys and values
    for t in moved[2][1:]:
        t[:, 3:] += 5.0  # subject 1's reference keys and values
    text2, video2, ref2 = routed_joint_attention(state, buckets, *moved)
    changed = (video2 - video_out).abs().amax(dim=(2, 3))[0] > 1e-4
    assert changed.tolist() == [False, True, False, True, False, False]
    assert torch.equal(ref2[:, :3], ref_out[:, :3]) and not torch.allclose(ref2[:, 3:], ref_out[:, 3:])
    assert not torch.allclose(text2, text_out)  # text sees all text, phrases included ...
    refs_only = [parts[0], parts[1], moved[2]]
    torch.testing.assert_close(routed_joint_attention(state, buckets, *refs_only)[0], text_out)  # ... but no reference


def test_stock_outputs_without_subjects_and_in_dense_mode():
    components = tiny_cogvideox_components()  # its own transformer: the stock processors are still installed
    tr = components["transformer"]
    pipe = CogVideoXPipeline(**components)
    x, text, t = torch.randn(1, 5, 4, 4, 4), torch.randn(1, 7, 32), torch.tensor([500])
    rope = pipe._prepare_rotary_positional_embeddings(32, 32, 5, "cpu")
    stock = tr(x, text, t, image_rotary_emb=rope, return_dict=False)[0]
    state = set_cogvideox_subject_sparse_attn_processor(tr)
    assert [p.layer_idx for p in tr.attn_processors.values()] == [0, 1]
    torch.testing.assert_close(tr(x, text, t, image_rotary_emb=rope, return_dict=False)[0], stock, rtol=0, atol=0)
    with state.activate(ref_lengths=[4, 4], mode="dense"):
        dense = tr(x, text, t, image_rotary_emb=rope, return_dict=False)[0]
    torch.testing.assert_close(dense, stock, rtol=0, atol=0)
    with state.activate(ref_lengths=[4, 4], mode="similarity"):
        routed = tr(x, text, t, image_rotary_emb=rope, return_dict=False)[0]
    assert (routed - stock).abs().max() > 1e-4


def test_block_indices_number_each_block_once():
    wan = ["blocks.0.attn1.processor", "blocks.0.attn2.processor", "blocks.1.attn1.processor"]
    assert list(block_indices(wan).values()) == [0, 0, 1]
    joint = ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor",
             "single_transformer_blocks.0.attn.processor", "extra.processor"]  # fmt: skip
    assert list(block_indices(joint).values()) == [0, 1, 2, None]


# -- grid, router sizing -------------------------------------------------------------------------------------------


def test_token_grid_and_router_sizes_read_cogvideox_configs(components):
    tr, vae = components["transformer"], components["vae"]
    assert token_grid_factors(tr, vae) == {
        "temporal_compression": 4,
        "spatial_compression": 8,
        "patch_size": (1, 2, 2),
    }
    masks = torch.zeros(1, 2, 9, 32, 32)
    masks[0, 0, :, :, :16] = 1.0
    masks[0, 1, 5:, :, 16:] = 1.0  # subject 1 only from the second latent frame on (pixel frames 5..8)
    coverage = masks_to_token_grid(masks, transformer=tr, vae=vae)
    assert coverage.shape == (1, 2, 3, 2, 2)  # 9 frames -> 3 latent frames; 32 px -> 4 latent -> 2 tokens
    labels = routing_labels_from_coverage(coverage).view(3, 2, 2)
    assert labels[:, :, 0].eq(0).all() and labels[0, :, 1].eq(-1).all() and labels[2, :, 1].eq(1).all()
    router = IDRouter.from_transformer(tr, router_dim=16, num_heads=2)
    assert (router.config.hidden_dim, router.config.text_dim, router.config.num_layers) == (32, 32, 2)


# -- pipeline -----------------------------------------------------------------------------------------------------


def test_references_are_appended_after_the_video(pipe, images):
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["hidden_states"].shape)), with_kwargs=True)  # fmt: skip
    try:
        pipe(**{**KW, "num_inference_steps": 1}, subject_images=[images[0], [images[1], images[1]]], output_type="latent",
             guidance_scale_ref=3.0)  # fmt: skip
    finally:
        hook.remove()
    # cond (video + 3 reference frames), uncond (video only), reference-only pass of three-way guidance.
    assert seen == [(1, 6, 4, 4, 4), (1, 3, 4, 4, 4), (1, 6, 4, 4, 4)]
    refs = pipe.encode_references([[images[0]], [images[1]]], 32, 32, torch.device("cpu"), torch.float32)
    assert refs.shape == (1, 2, 4, 4, 4)


def test_text_routing_changes_the_routed_tokens_only(pipe, images):
    common = dict(KW, subject_images=images, subject_phrases=PHRASES, output_type="latent", routing="masks",
                  subject_masks=halves(), guidance_scale=1.0)  # fmt: skip
    routed = pipe(**common, generator=gen()).frames
    plain = pipe(**common, route_text=False, generator=gen()).frames
    assert (routed - plain).abs().max() > 1e-5


def test_bad_inputs(components, pipe, images):
    with pytest.raises(ValueError, match="`sigmas` must be None"):
        pipe(**KW, sigmas=[0.5])
    with pytest.raises(ValueError, match=r"`latents` must be a tensor of shape \(videos, latent frames, channels"):
        pipe(**KW, latents=torch.zeros(1, 4, 3, 4, 4))
    with pytest.raises(ValueError, match="`subject_phrases` must give one phrase per subject"):
        pipe(**KW, subject_images=images, subject_phrases=PHRASES[:1])
    with pytest.raises(ValueError, match="supports at most 1"):
        small = IDRouter.from_transformer(pipe.transformer, router_dim=16, num_heads=2, max_subjects=1)
        DiasRCogVideoXPipeline(**{**pipe.components, "id_router": small})(
            **KW, subject_images=images, routing="router"
        )
    with pytest.raises(ValueError, match="does not fit this CogVideoXTransformer3DModel"):
        DiasRCogVideoXPipeline(**{**pipe.components, "id_router": IDRouter(hidden_dim=8, text_dim=32, num_layers=2)})
    comps = {k: v for k, v in components.items() if k != "transformer"}
    v15 = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                      time_embed_dim=8, text_embed_dim=32, num_layers=1, patch_size_t=2,
                                      use_rotary_positional_embeddings=True)  # fmt: skip
    with pytest.raises(ValueError, match="CogVideoX 1.0 transformers"):
        DiasRCogVideoXPipeline(**comps, transformer=v15)
    with pytest.raises(TypeError, match="pipeline_or_path"):
        DiasRCogVideoXPipeline.from_cogvideox(42)
    state = SubjectRoutingState(ref_lengths=[2], text_segments=[TextSegments(torch.arange(3), [1])] * 2)
    parts = [tuple(torch.zeros(1, n, 1, 4) for _ in range(3)) for n in (3, 2, 2)]
    with pytest.raises(ValueError, match="`text_segments` has 2 entries for a batch of 1"):
        routed_joint_attention(state, torch.zeros(1, 2, dtype=torch.long), *parts)


# -- training -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from diasr_diffusers.data import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_clips=3, seed=0, subjects=(2, 2), num_frames=5, height=32, width=32)
    return out


@pytest.mark.parametrize("stage", ["align", "route", "dense"])
def test_training_step_of_each_stage(data_dir, tmp_path, stage):
    from safetensors.torch import load_file

    from diasr_diffusers.training import DiasRTrainer, TrainConfig

    cfg = TrainConfig.from_dict({
        "stage": stage, "allow_scratch": True, "train_data": str(data_dir), "model_family": "cogvideox",
        "tiny_model": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16}, "height": 32,
        "width": 32, "num_frames": 5, "max_steps": 1, "max_sequence_length": 32, "learning_rate": 1e-2,
        "router": {"router_dim": 16, "num_identity_queries": 2, "num_heads": 2}, "lora_rank": 2, "lora_alpha": 2,
        "eval_fraction": 0.34, "eval_sigmas": [0.5],
        "caption_dropout": 0.0, "reference_dropout": 0.0,  # the one logged sample has every loss of its stage
    })  # fmt: skip
    trainer = DiasRTrainer(cfg, tmp_path / stage)
    trainer.setup()
    assert isinstance(trainer.pipe, DiasRCogVideoXPipeline)
    router_before = {k: v.clone() for k, v in trainer.router.state_dict().items()}
    result = trainer.train()
    record = json.loads((tmp_path / stage / "metrics.jsonl").read_text().splitlines()[0])
    expected = {"align": {"diffusion", "mask", "align"}, "route": {"diffusion", "route"}, "dense": {"diffusion"}}
    assert expected[stage] <= set(record) and all(math.isfinite(record[k]) for k in expected[stage])
    assert math.isfinite(result["diffusion_loss"]) and result["stage"] == stage
    router_moved = any(not torch.equal(v, trainer.router.state_dict()[k]) for k, v in router_before.items())
    assert router_moved == (stage != "dense")
    lora = load_file(str(tmp_path / stage / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.transformer_blocks.") for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained away from its zero init


def test_config_refuses_a_wrong_family(data_dir):
    from diasr_diffusers.training import ConfigError, TrainConfig

    base = {"stage": "dense", "train_data": str(data_dir), "tiny_model": {"num_layers": 1}}
    with pytest.raises(ConfigError, match="`model_family` must be one of"):
        TrainConfig.from_dict({**base, "model_family": "hunyuan"})
    with pytest.raises(ConfigError, match="unknown `tiny_model` key"):
        TrainConfig.from_dict({**base, "model_family": "cogvideox", "tiny_model": {"ffn_dim": 8}})


def test_sincos_positions_cover_the_reference_frames(images):
    """CogVideoX-2B style (no rotary): its patch embedding extends the sincos table to the reference frames; its
    text table is exactly 226 tokens, so it runs at max_sequence_length=226 as the stock pipeline must."""
    kw = dict(KW, max_sequence_length=226, output_type="latent")
    stock = CogVideoXPipeline(**tiny_cogvideox_components(use_rotary_positional_embeddings=False))(
        **kw, generator=gen()
    )
    pipe = DiasRCogVideoXPipeline(**tiny_cogvideox_components(use_rotary_positional_embeddings=False))
    torch.testing.assert_close(pipe(**kw, generator=gen()).frames, stock.frames, rtol=0, atol=0)
    out = pipe(**kw, subject_images=images, routing="masks", subject_masks=halves(), return_routing_maps=True)
    assert out.frames.shape == (1, 3, 4, 4, 4) and out.routing_maps[..., 0].eq(0).all()


def test_readme_cogvideox_example_runs(capsys):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "tiny_cogvideox_components" in b)
    namespace: dict = {}
    exec(compile(block, "README CogVideoX example", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["out"].frames[0].shape == (9, 32, 32, 3)
    assert "(9, 32, 32, 3) (3, 2, 2)" in capsys.readouterr().out


def test_dynamic_cfg_is_honoured(pipe, images):
    """CogVideoXPipeline's `use_dynamic_cfg` (it rewrites `pipe._guidance_scale` each step)."""
    kw = dict(KW, subject_images=images, output_type="latent")
    plain = pipe(**kw, generator=gen()).frames
    assert (pipe(**kw, use_dynamic_cfg=True, generator=gen()).frames - plain).abs().max() > 1e-6
    assert pipe.guidance_scale != 6


class TestCogVideoXPipeline(SubjectPipelineTesterMixin):
    """The shared pipeline checks (tests/pipeline_tester.py) on CogVideoX 1.0."""

    pipeline_class = DiasRCogVideoXPipeline
    stock_class = CogVideoXPipeline
    prompt = PROMPT
    phrases = PHRASES
    inputs = {k: v for k, v in KW.items() if k != "prompt"}

    def get_components(self):
        return tiny_cogvideox_components()
