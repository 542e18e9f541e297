"""Tiny Ingredients checkpoints laid out like the released ``transformer/`` folder (2 safetensors shards + index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.models.transformers.consisid_transformer_3d import ConsisIDTransformer3DModel
from safetensors.torch import save_file

from diasr_diffusers.utils.tiny_ingredients import TINY_INGREDIENTS_TRANSFORMER, tiny_faces

# CogVideoX-5B's layout at toy width (rotary positions, 2/3-width identity tokens, a router after every other
# block), as the released class would write it after a `save_pretrained`.
TINY_CONFIG = {
    "_class_name": "IngredientsTransformer3DModel",
    **TINY_INGREDIENTS_TRANSFORMER,
    "is_train_face": True,
    "is_kps": False,
    "local_face_scale": 1.0,
    "max_identities": 4,
}


def released_router_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """``router.{i}.*`` names and shapes of the released ``MultiIPRouter`` (one per cross-attention)."""
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    id_dim, q, inner = cfg["LFE_output_dim"], cfg["LFE_num_querie"], cfg["router_inner_dim"]
    shapes = {}
    for i in range(cfg["num_layers"] // cfg["cross_attn_interval"]):
        shapes.update({
            f"router.{i}.norm1.weight": (id_dim,), f"router.{i}.norm1.bias": (id_dim,),
            f"router.{i}.norm2.weight": (width,), f"router.{i}.norm2.bias": (width,),
            f"router.{i}.id_merge.weight": (1, q),
            f"router.{i}.to_q.weight": (inner, width),
            f"router.{i}.to_kv.weight": (inner, id_dim),
        })  # fmt: skip
    return shapes


def random_released_state_dict(cfg: dict = TINY_CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a released-layout checkpoint, random (norm weights too, so a swapped name shows)."""
    base_cfg = {
        k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("router_inner_dim", "max_identities")
    }
    shapes = {k: tuple(v.shape) for k, v in ConsisIDTransformer3DModel.from_config(base_cfg).state_dict().items()}
    shapes.update(released_router_shapes(cfg))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        t = torch.randn(shape, generator=gen)
        if len(shape) == 1:  # norm scales around 1, biases around 0
            t = 1.0 + 0.2 * t if name.endswith("weight") else 0.1 * t
        else:
            t = t * 0.5 / max(1.0, t[0].numel() ** 0.5)
        out[name] = t.contiguous()
    return out


def write_released_folder(folder: Path, cfg: dict = TINY_CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    """``folder/config.json`` + two safetensors shards + their index, as the released ``transformer/``."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = random_released_state_dict(cfg, seed)
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:])):
        file = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in chunk}, str(folder / file))
        weight_map.update(dict.fromkeys(chunk, file))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in sd.values())}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(cfg))
    return sd


def random_faces(num_ids: int, batch: int = 1, seed: int = 1):
    """Per-identity ``id_cond`` / ``id_vit_hidden`` for :data:`TINY_CONFIG`."""
    return tiny_faces(num_ids, batch=batch, seed=seed)


def rotary(cfg: dict, frames: int, height: int, width: int):
    """CogVideoX's 3-D rotary embedding for a ``(frames, height, width)`` latent grid (patch units)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p = cfg["patch_size"]
    h, w = height // p, width // p
    return get_3d_rotary_pos_embed(
        embed_dim=cfg["attention_head_dim"], crops_coords=((0, 0), (h, w)), grid_size=(h, w), temporal_size=frames
    )
