"""The family registry (diasr_diffusers.families) and what reads it: the one installer on every family, router sizing,
token grids, the loader's family choice, and the refusals by name."""

from __future__ import annotations

import json

import pytest
import torch

from diasr_diffusers import set_subject_sparse_attn_processor
from diasr_diffusers.families import (
    FAMILIES,
    UnsupportedFamilyError,
    family_for_pipeline,
    family_for_transformer,
    resolve,
)
from diasr_diffusers.processors import (
    CogVideoXSubjectSparseAttnProcessor,
    HunyuanVideo15SubjectSparseAttnProcessor,
    LTXSubjectSparseAttnProcessor,
    SubjectSparseAttnProcessor,
    set_cogvideox_subject_sparse_attn_processor,
    set_hunyuan_video15_subject_sparse_attn_processor,
    set_ltx_subject_sparse_attn_processor,
    set_wan_subject_sparse_attn_processor,
)
from diasr_diffusers.routing import IDRouter, token_grid_factors
from diasr_diffusers.utils import tiny

ADAPTERS = {
    "wan": SubjectSparseAttnProcessor,
    "ltx": LTXSubjectSparseAttnProcessor,
    "cogvideox": CogVideoXSubjectSparseAttnProcessor,
    "hunyuan_video15": HunyuanVideo15SubjectSparseAttnProcessor,
}
INSTALLERS = {
    "wan": set_wan_subject_sparse_attn_processor,
    "ltx": set_ltx_subject_sparse_attn_processor,
    "cogvideox": set_cogvideox_subject_sparse_attn_processor,
    "hunyuan_video15": set_hunyuan_video15_subject_sparse_attn_processor,
}


def test_every_entry_names_importable_objects():
    for name, spec in FAMILIES.items():
        assert spec.name == name
        assert spec.transformer_types()
        assert spec.pipeline_class().__name__ == spec.pipeline_class_name
        assert callable(spec.tiny_builder())
        assert spec.training().name == name  # the training family is this entry's
        if spec.processor is not None:
            assert spec.processor_class() is ADAPTERS[name]
            assert resolve(spec.installer) is INSTALLERS[name]
        if spec.convert is not None:
            assert callable(getattr(spec.pipeline_class(), spec.convert))
        for cls in spec.checkpoint_classes:
            assert family_for_pipeline(cls) is spec
    with pytest.raises(UnsupportedFamilyError, match="expected one of: DiasRPipeline, WanPipeline"):
        family_for_pipeline("StableDiffusionPipeline")


def test_spec_is_frozen():
    with pytest.raises(AttributeError):
        FAMILIES["wan"].processor = None


def _wan():
    tr = tiny.tiny_wan_components(num_layers=1)["transformer"]
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 16, 3, 8, 8, generator=g), torch.tensor([500.0, 300.0]), torch.randn(2, 7, 32, generator=g))
    return tr, lambda: tr(*args, return_dict=False)[0]


def _ltx():
    tr = tiny.tiny_ltx_components(num_layers=1)["transformer"]
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    x, text, t = torch.randn(2, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g), torch.tensor([500.0, 300.0])
    return tr, lambda: tr(x, text, t, mask, num_frames=2, height=2, width=2, return_dict=False)[0]


def _cogvideox():
    from diffusers import CogVideoXPipeline

    comps = tiny.tiny_cogvideox_components(num_layers=1)
    tr = comps["transformer"]
    rope = CogVideoXPipeline(**comps)._prepare_rotary_positional_embeddings(32, 32, 3, "cpu")
    g = torch.Generator().manual_seed(0)
    x, text, t = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 7, 32, generator=g), torch.tensor([500, 300])
    return tr, lambda: tr(x, text, t, image_rotary_emb=rope, return_dict=False)[0]


def _hunyuan_video15():
    tr = tiny.tiny_hunyuan_video15_components(num_layers=1)["transformer"]
    cfg = tr.config
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False  # padded text: the mask the blocks receive
    inputs = dict(
        timestep=torch.tensor([500.0, 300.0]), encoder_hidden_states=torch.randn(2, 6, cfg.text_embed_dim, generator=g),
        encoder_attention_mask=mask, encoder_hidden_states_2=torch.randn(2, 3, cfg.text_embed_2_dim, generator=g),
        encoder_attention_mask_2=torch.ones(2, 3, dtype=torch.bool), image_embeds=torch.zeros(2, 2, cfg.image_embed_dim),
    )  # fmt: skip
    x = torch.randn(2, cfg.in_channels, 3, 4, 4, generator=g)
    return tr, lambda: tr(x, **inputs, return_dict=False)[0]


STOCK = {
    "wan": lambda: resolve("diffusers.models.transformers.transformer_wan:WanAttnProcessor"),
    "ltx": lambda: resolve("diffusers.models.transformers.transformer_ltx:LTXVideoAttnProcessor"),
    "cogvideox": lambda: resolve("diffusers.models.attention_processor:CogVideoXAttnProcessor2_0"),
    "hunyuan_video15": lambda: resolve(
        "diffusers.models.transformers.transformer_hunyuan_video15:HunyuanVideo15AttnProcessor2_0"
    ),
}
BUILD = {"wan": _wan, "ltx": _ltx, "cogvideox": _cogvideox, "hunyuan_video15": _hunyuan_video15}


@pytest.mark.parametrize("family", list(BUILD))
def test_one_installer_is_stock_exact_on_every_family(family):
    """`set_subject_sparse_attn_processor` picks each family's adapter; with no subjects (and in `dense` mode) the
    outputs and the weight gradients are bit-identical to the stock processors'."""
    transformer, forward = BUILD[family]()
    assert family_for_transformer(transformer).name == family

    def run():
        transformer.zero_grad(set_to_none=True)
        out = forward()
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    stock_out, stock_grads = run()
    state = set_subject_sparse_attn_processor(transformer)
    procs = [p for n, p in transformer.attn_processors.items() if isinstance(p, ADAPTERS[family])]
    assert procs and all(p.state is state for p in procs)
    assert issubclass(ADAPTERS[family], STOCK[family]())  # its stock path is `super().__call__`, not an unbound call
    out, grads = run()
    assert torch.equal(out, stock_out)
    assert grads.keys() == stock_grads.keys() and all(torch.equal(grads[k], stock_grads[k]) for k in grads)
    with state.activate(ref_lengths=[4], mode="dense"):
        assert torch.equal(forward().detach(), stock_out)


@pytest.mark.parametrize("family", list(BUILD))
def test_family_installers_are_aliases_that_check_the_family(family):
    transformer, _ = BUILD[family]()
    state = INSTALLERS[family](transformer)
    assert all(p.state is state for p in transformer.attn_processors.values() if isinstance(p, ADAPTERS[family]))
    other = next(f for f in INSTALLERS if f != family)
    with pytest.raises(UnsupportedFamilyError, match=f"installer is for {FAMILIES[other].title}"):
        INSTALLERS[other](transformer)


def test_unsupported_transformers_are_refused_at_install_time_with_the_supported_list():
    from diasr_diffusers.utils.tiny_ingredients import tiny_ingredients_components

    with pytest.raises(UnsupportedFamilyError, match="Linear.*supported: WanTransformer3DModel.*LTXVideoTransformer3DModel"):
        set_subject_sparse_attn_processor(torch.nn.Linear(2, 2))
    ingredients = tiny_ingredients_components()["transformer"]
    before = dict(ingredients.attn_processors)
    with pytest.raises(UnsupportedFamilyError, match="IngredientsTransformer3DModel: Ingredients routes identities"):
        set_subject_sparse_attn_processor(ingredients)
    assert ingredients.attn_processors == before  # nothing installed
    assert family_for_transformer(ingredients).name == "ingredients"  # a subclass of ConsisID: the specific entry


@pytest.mark.parametrize(
    "family, grid, text_dim",
    [
        ("wan", (4, 8, (1, 2, 2)), 32),
        ("ltx", (8, 32, (1, 1, 1)), 32),
        ("cogvideox", (4, 8, (1, 2, 2)), 32),
        ("hunyuan_video15", (2, 4, (1, 1, 1)), 16),
    ],
)
def test_grid_and_router_sizes_come_from_the_registry(family, grid, text_dim):
    comps = FAMILIES[family].tiny_builder()(num_layers=1)
    got = token_grid_factors(comps["transformer"], comps["vae"])
    assert (got["temporal_compression"], got["spatial_compression"], got["patch_size"]) == grid
    # The same facts from the JSON configs, as the loader reads them before any weights load.
    spec = FAMILIES[family]
    json_grid = spec.token_grid(json.loads(json.dumps(dict(comps["transformer"].config))), dict(comps["vae"].config))
    assert json_grid == got
    sizes = IDRouter.host_sizes(comps["transformer"])
    assert sizes["text_dim"] == text_dim and sizes["num_layers"] == 1


def test_training_families_are_read_from_the_registry():
    from diasr_diffusers.training.families import FAMILIES as TRAINING

    assert list(TRAINING) == list(FAMILIES)  # every registry entry, in its order: nothing registers itself
    with pytest.raises(TypeError):
        TRAINING["mine"] = object()  # read-only: a family is added by its registry entry
    assert TRAINING["ltx"].frame_multiple == 8 and TRAINING["ltx"].size_multiple == 32
    assert TRAINING["cogvideox"].size_multiple == 16 and TRAINING["wan"].frame_multiple == 4
    assert TRAINING["hunyuan_video15"].pipeline_classes == ("HunyuanVideo15Pipeline", "DiasRHunyuanVideo15Pipeline")
    assert type(TRAINING["ingredients"]).__name__ == "IngredientsTrainingFamily"
    assert TRAINING["wan"] is TRAINING["wan"]  # one instance per family


def test_training_config_takes_the_family_from_the_model_folder(tmp_path):
    from diasr_diffusers.training.config import _family_of_model_folder

    for spec in FAMILIES.values():
        for class_name in spec.checkpoint_classes:
            folder = tmp_path / class_name
            folder.mkdir()
            (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
            assert _family_of_model_folder(str(folder)) == spec.name
    assert _family_of_model_folder(str(tmp_path / "missing")) == "wan"  # the model checks then name the problem
