"""Test-only re-implementation of the released Ingredients transformer forward (feizc/Ingredients,
``models/transformer_ingredients.py`` + ``models/local_facial_extractor.py``), written from its description.

It works on a plain state dict with the released tensor names and reproduces the released semantics on purpose,
limits included: the two faces are run through the facial extractor one at a time and stacked into a one-element
list; the router scores only the samples that have an entry in that list (batch element 0); each face's feature is
the cross-attention of that face with batch element 0 repeated twice; the softmax-weighted sum is computed with the
released matmul/transposes; and the resulting ``(1, L, C)`` feature is added to *every* batch element.

The unchanged CogVideoX parts (patch embedding, time embedding, blocks, output norm) run in Diffusers' own modules
(the released code imports the same classes); every face module is written here with functional ops only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.transformers.consisid_transformer_3d import ConsisIDTransformer3DModel


def _ln(sd, prefix, x, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _lin(sd, prefix, x):
    return F.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"))


def _heads(x, heads):
    b, n, w = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _attend(q, k, v, dim_head):
    scale = 1 / math.sqrt(math.sqrt(dim_head))
    weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).type(q.dtype)
    out = weight @ v
    b, h, n, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, n, h * d)


def perceiver_attention(sd, prefix, x, latents, heads, dim_head):
    """Released ``PerceiverAttention``: keys/values over ``cat(x, latents)``."""
    x = _ln(sd, f"{prefix}.norm1", x)
    latents = _ln(sd, f"{prefix}.norm2", latents)
    q = _lin(sd, f"{prefix}.to_q", latents)
    k, v = _lin(sd, f"{prefix}.to_kv", torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
    return _lin(sd, f"{prefix}.to_out", _attend(_heads(q, heads), _heads(k, heads), _heads(v, heads), dim_head))


def perceiver_cross_attention(sd, prefix, x, latents, heads, dim_head):
    """Released ``PerceiverCrossAttention``: keys/values over ``x`` only."""
    x = _ln(sd, f"{prefix}.norm1", x)
    latents = _ln(sd, f"{prefix}.norm2", latents)
    q = _lin(sd, f"{prefix}.to_q", latents)
    k, v = _lin(sd, f"{prefix}.to_kv", x).chunk(2, dim=-1)
    return _lin(sd, f"{prefix}.to_out", _attend(_heads(q, heads), _heads(k, heads), _heads(v, heads), dim_head))


def _mlp(sd, prefix, x):
    # nn.Sequential(Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear)
    x = F.leaky_relu(_ln(sd, f"{prefix}.1", _lin(sd, f"{prefix}.0", x)))
    x = F.leaky_relu(_ln(sd, f"{prefix}.4", _lin(sd, f"{prefix}.3", x)))
    return _lin(sd, f"{prefix}.6", x)


def local_facial_extractor(sd, cfg, id_cond, vit_hidden):
    """Released ``LocalFacialExtractor.forward`` for one identity."""
    p = "local_facial_extractor"
    dim, num_scale = cfg["LFE_vit_dim"], cfg["LFE_num_scale"]
    per_scale = cfg["LFE_depth"] // num_scale
    latents = sd[f"{p}.latents"].repeat(id_cond.size(0), 1, 1)
    x = _mlp(sd, f"{p}.id_embedding_mapping", id_cond).reshape(-1, cfg["LFE_num_id_token"], dim)
    latents = torch.cat((latents, x), dim=1)
    for i in range(num_scale):
        ctx = torch.cat((x, _mlp(sd, f"{p}.mapping_{i}", vit_hidden[i])), dim=1)
        for j in range(i * per_scale, (i + 1) * per_scale):
            latents = (
                perceiver_attention(sd, f"{p}.layers.{j}.0", ctx, latents, cfg["LFE_num_heads"], cfg["LFE_dim_head"])
                + latents
            )
            ff = f"{p}.layers.{j}.1"
            h = _ln(sd, f"{ff}.0", latents)
            h = _lin(sd, f"{ff}.3", F.gelu(_lin(sd, f"{ff}.1", h)))
            latents = h + latents
    return latents[:, : cfg["LFE_num_querie"]] @ sd[f"{p}.proj_out"]


def multi_ip_router(sd, prefix, x_list, latents):
    """Released ``MultiIPRouter.forward``: ``x_list`` holds one ``(N, Q, D)`` entry per scored sample."""
    x_list = [_ln(sd, f"{prefix}.norm1", item) for item in x_list]
    latents = _ln(sd, f"{prefix}.norm2", latents)
    x_list = [F.linear(item.transpose(-2, -1), sd[f"{prefix}.id_merge.weight"]).squeeze(-1) for item in x_list]
    q = _lin(sd, f"{prefix}.to_q", latents)
    kv = [_lin(sd, f"{prefix}.to_kv", item) for item in x_list]
    return [sub_q.unsqueeze(0) @ sub_kv.transpose(-2, -1) for sub_q, sub_kv in zip(q, kv)]


def released_forward(
    sd, cfg, hidden_states, encoder_hidden_states, timestep, id_cond, id_vit_hidden, image_rotary_emb=None
):
    """The released ``IngredientsTransformer3DModel.forward`` (inference, ``index_mask=None``)."""
    base_cfg = {
        k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("router_inner_dim", "max_identities")
    }
    base = ConsisIDTransformer3DModel.from_config({**base_cfg, "is_train_face": False}).eval()
    base.load_state_dict({k: v for k, v in sd.items() if k in base.state_dict()}, strict=True)

    face1 = local_facial_extractor(sd, cfg, id_cond[0], id_vit_hidden[0])
    face2 = local_facial_extractor(sd, cfg, id_cond[1], id_vit_hidden[1])
    valid_face_emb = [torch.cat([face1, face2], dim=0)]

    batch_size, num_frames, channels, height, width = hidden_states.shape
    emb = base.time_embedding(base.time_proj(timestep).to(hidden_states.dtype), None)
    hidden_states = base.patch_embed(encoder_hidden_states, hidden_states)
    text_len = encoder_hidden_states.shape[1]
    encoder_hidden_states, hidden_states = hidden_states[:, :text_len], hidden_states[:, text_len:]
    ca_idx = 0
    for i, block in enumerate(base.transformer_blocks):
        hidden_states, encoder_hidden_states = block(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=emb,
            image_rotary_emb=image_rotary_emb,
        )  # fmt: skip
        if i % cfg["cross_attn_interval"] == 0:
            routing_logits = multi_ip_router(sd, f"router.{ca_idx}", valid_face_emb, hidden_states)
            mask_id_feats = []
            for routing_logit, sub_img in zip(routing_logits, hidden_states):
                sub_img = sub_img.repeat(2, 1, 1)
                id_feat = perceiver_cross_attention(
                    sd, f"perceiver_cross_attention.{ca_idx}", valid_face_emb[0], sub_img,
                    cfg["cross_attn_num_heads"], cfg["cross_attn_dim_head"],
                )  # fmt: skip
                routing_logit = torch.softmax(routing_logit.float(), dim=-1).to(routing_logit.dtype)
                mask_id_feat = routing_logit.transpose(1, 0) @ id_feat.transpose(1, 0)
                mask_id_feats.append(mask_id_feat.transpose(1, 0))
            hidden_states = hidden_states + cfg["local_face_scale"] * torch.cat(mask_id_feats)
            ca_idx += 1
    hidden_states = base.norm_final(torch.cat([encoder_hidden_states, hidden_states], dim=1))[:, text_len:]
    hidden_states = base.proj_out(base.norm_out(hidden_states, temb=emb))
    p = cfg["patch_size"]
    output = hidden_states.reshape(batch_size, num_frames, height // p, width // p, -1, p, p)
    return output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
