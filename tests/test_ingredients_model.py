"""IngredientsTransformer3DModel: loading the released layout, exactness against the released forward, N identities,
batch > 1 / CFG, hard vs soft routing, routing logits, save/load, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from _ingredients_fixtures import (
    TINY_CONFIG,
    random_faces,
    released_router_shapes,
    rotary,
    write_released_folder,
)
from _ingredients_reference import perceiver_cross_attention, released_forward

from diasr_diffusers.models import IngredientsTransformer3DModel
from diasr_diffusers.models.transformer_ingredients import is_released_config, translate_released_config

F_LAT, H, W = 3, 8, 12


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingredients")
    sd = write_released_folder(root / "transformer")
    model = IngredientsTransformer3DModel.from_pretrained(root, subfolder="transformer").eval()
    return root, sd, model


def _inputs(batch=1, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, F_LAT, TINY_CONFIG["in_channels"], H, W, generator=gen)
    text = torch.randn(batch, TINY_CONFIG["max_text_seq_length"], TINY_CONFIG["text_embed_dim"], generator=gen)
    return x, text, torch.full((batch,), 500), rotary(TINY_CONFIG, F_LAT, H, W)


@torch.no_grad()
def test_released_layout_matches_released_forward(released):
    _, sd, model = released
    x, text, t, rope = _inputs()
    id_cond, id_vit = random_faces(2)
    ours = model(x, text, t, image_rotary_emb=rope, id_cond=id_cond, id_vit_hidden=id_vit).sample
    ref = released_forward(sd, dict(model.config), x, text, t, id_cond, id_vit, image_rotary_emb=rope)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # The faces matter at this scale: another second face moves the output far beyond the tolerance (soft routing
    # is symmetric in the order of the identities, so swapping them would not).
    other_cond, other_vit = random_faces(2, seed=9)
    changed = model(x, text, t, image_rotary_emb=rope, id_cond=[id_cond[0], other_cond[1]],
                    id_vit_hidden=[id_vit[0], other_vit[1]]).sample  # fmt: skip
    assert (changed - ref).abs().max() > 1e-3
    # Precomputed identity tokens give the same answer as per-step face features.
    faces = model.encode_faces(id_cond, id_vit)
    assert faces.shape == (1, 2, TINY_CONFIG["LFE_num_querie"], TINY_CONFIG["LFE_output_dim"])
    torch.testing.assert_close(
        model(x, text, t, image_rotary_emb=rope, face_embeds=faces).sample, ours, rtol=0, atol=1e-6
    )


@torch.no_grad()
def test_every_batch_element_routed_with_its_own_hidden_states(released):
    """N = 3, batch 2 (a CFG pair): each element equals its own batch-1 run; the released code does not do this."""
    _, sd, model = released
    x, text, t, rope = _inputs(batch=2)
    id_cond, id_vit = random_faces(3)
    out = model(x, text, t, image_rotary_emb=rope, id_cond=id_cond, id_vit_hidden=id_vit, return_routing_logits=True)
    assert len(out.routing_logits) == model.num_routed_layers == 2
    for b in range(2):
        one = model(x[b : b + 1], text[b : b + 1], t[b : b + 1], image_rotary_emb=rope, id_cond=id_cond,
                    id_vit_hidden=id_vit, return_routing_logits=True)  # fmt: skip
        torch.testing.assert_close(out.sample[b : b + 1], one.sample, rtol=0, atol=1e-5)
        for many, single in zip(out.routing_logits, one.routing_logits):
            assert many.shape == (2, F_LAT * (H // 2) * (W // 2), 3)
            torch.testing.assert_close(many[b : b + 1], single, rtol=0, atol=1e-5)
    # The released forward hands batch element 0's identity feature to element 1 as well (2 faces only).
    two_cond, two_vit = random_faces(2)
    ours = model(x, text, t, image_rotary_emb=rope, id_cond=two_cond, id_vit_hidden=two_vit).sample
    ref = released_forward(sd, dict(model.config), x, text, t, two_cond, two_vit, image_rotary_emb=rope)
    torch.testing.assert_close(ours[:1], ref[:1], rtol=0, atol=1e-5)
    assert (ours[1:] - ref[1:]).abs().max() > 1e-3


@torch.no_grad()
def test_per_sample_identities(released):
    """``id_cond`` with a batch dimension gives each sample its own faces."""
    _, _, model = released
    x, text, t, rope = _inputs(batch=2)
    a_cond, a_vit = random_faces(2, seed=5)
    b_cond, b_vit = random_faces(2, seed=6)
    both_cond = [torch.cat([a, b]) for a, b in zip(a_cond, b_cond)]
    both_vit = [[torch.cat([a, b]) for a, b in zip(av, bv)] for av, bv in zip(a_vit, b_vit)]
    out = model(x, text, t, image_rotary_emb=rope, id_cond=both_cond, id_vit_hidden=both_vit).sample
    first = model(x[:1], text[:1], t[:1], image_rotary_emb=rope, id_cond=a_cond, id_vit_hidden=a_vit).sample
    second = model(x[1:], text[1:], t[1:], image_rotary_emb=rope, id_cond=b_cond, id_vit_hidden=b_vit).sample
    torch.testing.assert_close(out, torch.cat([first, second]), rtol=0, atol=1e-5)


@torch.no_grad()
def test_hard_and_soft_routing(released):
    """``route``: soft = softmax-weighted sum of the per-identity features, hard = the argmax identity's feature,
    both checked against the released cross-attention run on each face on its own."""
    _, sd, model = released
    gen = torch.Generator().manual_seed(7)
    width = TINY_CONFIG["num_attention_heads"] * TINY_CONFIG["attention_head_dim"]
    hidden = torch.randn(2, 20, width, generator=gen)
    faces = model.encode_faces(*random_faces(3))
    hard, logits = model.route(0, faces, hidden, "hard")
    soft, logits_soft = model.route(0, faces, hidden, "soft")
    torch.testing.assert_close(logits, logits_soft, rtol=0, atol=0)
    per_id = torch.stack(
        [
            perceiver_cross_attention(
                sd,
                "perceiver_cross_attention.0",
                faces[:, n].expand(2, -1, -1),
                hidden,
                TINY_CONFIG["cross_attn_num_heads"],
                TINY_CONFIG["cross_attn_dim_head"],
            )
            for n in range(3)
        ],
        dim=1,
    )  # fmt: skip  (B, N, L, C)
    top = logits.argmax(-1)
    assert len(top.unique()) > 1  # the check below must select different identities for different tokens
    expected_hard = per_id.gather(1, top[:, None, :, None].expand(-1, 1, -1, width)).squeeze(1)
    torch.testing.assert_close(hard, expected_hard, rtol=0, atol=1e-5)
    expected_soft = (logits.softmax(-1).permute(0, 2, 1)[..., None] * per_id).sum(1)
    torch.testing.assert_close(soft, expected_soft, rtol=0, atol=1e-5)
    assert (hard - soft).abs().max() > 1e-3
    x, text, t, rope = _inputs()
    id_cond, id_vit = random_faces(2)
    out_h = model(x, text, t, image_rotary_emb=rope, id_cond=id_cond, id_vit_hidden=id_vit, routing="hard").sample
    out_s = model(x, text, t, image_rotary_emb=rope, id_cond=id_cond, id_vit_hidden=id_vit, routing="soft").sample
    assert (out_h - out_s).abs().max() > 1e-4


def test_save_load_round_trip(released, tmp_path):
    _, _, model = released
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["_class_name"] == "IngredientsTransformer3DModel" and config["router_inner_dim"] == 8
    again = IngredientsTransformer3DModel.from_pretrained(tmp_path / "saved").eval()
    assert set(again.state_dict()) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    x, text, t, rope = _inputs()
    faces = model.encode_faces(*random_faces(3))
    with torch.no_grad():
        a = model(x, text, t, image_rotary_emb=rope, face_embeds=faces, routing="hard").sample
        b = again(x, text, t, image_rotary_emb=rope, face_embeds=faces, routing="hard").sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # equal weights; kernels may round differently


def test_released_config_translation_and_real_layout():
    """A config written by the released class (its own argument names, `LFE_output_dim: 768` that it never used)
    builds the 5B layout: 21 routers and cross-attentions with the released names and shapes."""
    released_cfg = {
        "_class_name": "IngredientsTransformer3DModel", "num_attention_heads": 48, "attention_head_dim": 64,
        "in_channels": 32, "out_channels": 16, "num_layers": 42, "text_embed_dim": 4096, "time_embed_dim": 512,
        "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True,
        "is_train_face": True, "is_kps": False, "cross_attn_interval": 2, "LFE_num_tokens": 32,
        "LFE_output_dim": 768, "LFE_heads": 12, "local_face_scale": 1.0,
    }  # fmt: skip
    assert is_released_config(released_cfg)
    cfg = translate_released_config(released_cfg)
    assert not {"LFE_num_tokens", "LFE_heads", "LFE_output_dim"} & cfg.keys() and cfg["router_inner_dim"] == 2048
    assert translate_released_config({"num_layers": 2}) == {"num_layers": 2}  # ours: untouched
    assert translate_released_config({"LFE_heads": 12})["cross_attn_interval"] == 1  # released default
    with torch.device("meta"):
        model = IngredientsTransformer3DModel.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = released_router_shapes({**model.config, "LFE_output_dim": 2048, "LFE_num_querie": 32})
    assert {k: shapes[k] for k in shapes if k.startswith("router.")} == expected
    assert len(expected) == 21 * 7
    # Released PerceiverCrossAttention(dim=3072, dim_head=128, heads=16, kv_dim=2048) and LocalFacialExtractor().
    assert shapes["perceiver_cross_attention.20.to_q.weight"] == (2048, 3072)
    assert shapes["perceiver_cross_attention.20.to_kv.weight"] == (4096, 2048)
    assert "perceiver_cross_attention.21.to_q.weight" not in shapes
    assert shapes["local_facial_extractor.id_embedding_mapping.0.weight"] == (1024, 1280)
    assert shapes["local_facial_extractor.proj_out"] == (1024, 2048)
    assert shapes["local_facial_extractor.layers.9.1.1.weight"] == (4096, 1024)


def test_checkpoint_without_routers_is_refused(tmp_path):
    """A ConsisID folder (no `router.*`) must not load with silently random routers."""
    sd = write_released_folder(tmp_path / "t")
    from safetensors.torch import save_file

    for f in tmp_path.joinpath("t").glob("*.safetensors*"):
        f.unlink()
    save_file(
        {k: v for k, v in sd.items() if not k.startswith("router.")},
        str(tmp_path / "t" / "diffusion_pytorch_model.safetensors"),
    )
    with pytest.raises((ValueError, RuntimeError, OSError), match="router"):
        IngredientsTransformer3DModel.from_pretrained(tmp_path / "t")


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("count", ValueError, "`id_cond` has 2 identities but `id_vit_hidden` has 1"),
        ("too_many", ValueError, "at most 4"),
        ("empty", ValueError, "at least one identity"),
        ("tensor", TypeError, "one entry per identity"),
        ("scales", ValueError, r"id_vit_hidden\[0\]` must hold 2 hidden states"),
        ("width", ValueError, r"id_cond\[1\]` must be a \(20,\)"),
        ("routing", ValueError, "`routing` must be one of"),
        ("missing", ValueError, "pass the faces"),
        ("face_batch", ValueError, "expected 1 \\(shared\\) or the batch size 1"),
    ],
)
def test_bad_input(released, case, error, match):
    _, _, model = released
    x, text, t, rope = _inputs()
    id_cond, id_vit = random_faces(2)
    kwargs = {"id_cond": id_cond, "id_vit_hidden": id_vit}
    if case == "count":
        kwargs["id_vit_hidden"] = id_vit[:1]
    elif case == "too_many":
        kwargs = dict(zip(("id_cond", "id_vit_hidden"), random_faces(5)))
    elif case == "empty":
        kwargs = {"id_cond": [], "id_vit_hidden": []}
    elif case == "tensor":
        kwargs["id_cond"] = torch.cat(id_cond)
    elif case == "scales":
        kwargs["id_vit_hidden"] = [v[:1] for v in id_vit]
    elif case == "width":
        kwargs["id_cond"] = [id_cond[0], torch.randn(1, 7)]
    elif case == "routing":
        kwargs["routing"] = "top1"
    elif case == "missing":
        kwargs = {}
    elif case == "face_batch":
        kwargs = {"face_embeds": model.encode_faces(*random_faces(2, batch=3))}
    with pytest.raises(error, match=match):
        model(x, text, t, image_rotary_emb=rope, **kwargs)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_layers": 3}, "multiple of `cross_attn_interval`"),
        ({"LFE_output_dim": 16}, "2/3 of the model width"),
        ({"max_identities": 0}, "`max_identities` must be an integer >= 1"),
        ({"cross_attn_interval": 0}, "`cross_attn_interval` must be an integer >= 1"),
    ],
)
def test_bad_config(change, match):
    cfg = {k: v for k, v in TINY_CONFIG.items() if not k.startswith("_")}
    with pytest.raises(ValueError, match=match):
        IngredientsTransformer3DModel(**{**cfg, **change})


def _released_routing_loss(layer_logits, index_mask):
    """The released training forward's loss: per sample, CE summed over layers (NaN -> 0) / layers; batch mean."""
    loss = torch.zeros(index_mask.shape[0])
    for logits in layer_logits:
        for b in range(index_mask.shape[0]):
            loss[b] += torch.nn.functional.cross_entropy(logits[b], index_mask[b], ignore_index=-1)
    loss = torch.where(torch.isnan(loss), torch.zeros_like(loss), loss)
    return (loss / len(layer_logits)).mean()


def test_routing_loss_matches_released_and_trains_the_router():
    """``ingredients_routing_loss`` = the released loss (a sample without faces counts 0); optimising only the
    routers with it (the paper's router fine-tuning stage, without LoRA) teaches them a layout."""
    from diasr_diffusers.routing import ingredients_routing_loss, masks_to_token_grid, routing_labels_from_coverage

    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_CONFIG.items() if not k.startswith("_")}
    model = IngredientsTransformer3DModel(**cfg).train()
    model.requires_grad_(False)
    model.router.requires_grad_(True)
    x, text, t, rope = _inputs(batch=2)
    faces = model.encode_faces(*random_faces(2)).detach()
    # Pixel masks of the 9-frame 64x96 video (as documented): face 0 left, face 1 right, the top 16 rows background.
    masks = torch.zeros(2, 2, 9, 64, 96, dtype=torch.bool)
    masks[0, 0, :, 16:, :48], masks[0, 1, :, 16:, 48:] = True, True  # sample 1: no face at all
    coverage = masks_to_token_grid(masks, temporal_compression=4, spatial_compression=8, patch_size=(1, 2, 2))
    index_mask = routing_labels_from_coverage(coverage)
    assert index_mask.shape == (2, F_LAT * (H // 2) * (W // 2)) and set(index_mask[0].tolist()) == {-1, 0, 1}
    opt = torch.optim.Adam(model.router.parameters(), lr=3e-2)
    losses, accuracy = [], []
    labelled = index_mask[0] >= 0
    for _ in range(25):
        logits = model(x, text, t, image_rotary_emb=rope, face_embeds=faces, return_routing_logits=True).routing_logits
        loss = ingredients_routing_loss(logits, index_mask)
        torch.testing.assert_close(loss, _released_routing_loss(logits, index_mask), rtol=1e-6, atol=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accuracy.append((logits[-1][0].argmax(-1)[labelled] == index_mask[0][labelled]).float().mean().item())
    assert losses[-1] < 0.4 * losses[0]
    assert accuracy[0] < 0.7 and accuracy[-1] > 0.85  # last routed layer, labelled tokens (measured 0.54 -> 0.89)
    with pytest.raises(ValueError, match="`index_mask` must be"):
        ingredients_routing_loss(logits, index_mask[:, :5])
