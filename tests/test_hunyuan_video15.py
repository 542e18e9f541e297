"""DiasR on HunyuanVideo-1.5: the joint-attention adapter (text padding mask, text refiner left alone) on a tiny
in-process transformer. The adapter reuses the core unchanged but for the padding mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.embeddings import apply_rotary_emb

from diasr_diffusers import IDRouter
from diasr_diffusers.processors import (
    HunyuanVideo15SubjectSparseAttnProcessor,
    SubjectRoutingState,
    TextSegments,
    set_hunyuan_video15_subject_sparse_attn_processor,
)


def tiny_transformer() -> HunyuanVideo15Transformer3DModel:
    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
        rope_axes_dim=(4, 6, 6), task_type="t2v",
    ).eval()  # fmt: skip


def text_inputs(batch: int = 2) -> dict:
    torch.manual_seed(1)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[:, 4:] = False
    mask[0, 3] = False  # the samples have different padding
    return dict(
        timestep=torch.full((batch,), 500.0), encoder_hidden_states=torch.randn(batch, 6, 16),
        encoder_attention_mask=mask, encoder_hidden_states_2=torch.randn(batch, 3, 8),
        encoder_attention_mask_2=torch.ones(batch, 3, dtype=torch.bool), image_embeds=torch.zeros(batch, 2, 8),
    )  # fmt: skip


def test_stock_outputs_and_refiner_untouched():
    tr = tiny_transformer()
    x = torch.randn(2, 4, 5, 4, 4)  # 3 video + 2 reference frames
    stock = tr(x, **text_inputs(), return_dict=False)[0]
    refiner = tr.attn_processors["context_embedder.token_refiner.refiner_blocks.0.attn.processor"]
    state = set_hunyuan_video15_subject_sparse_attn_processor(tr)
    procs = tr.attn_processors
    assert procs["context_embedder.token_refiner.refiner_blocks.0.attn.processor"] is refiner
    assert [procs[f"transformer_blocks.{i}.attn.processor"].layer_idx for i in range(2)] == [0, 1]
    torch.testing.assert_close(tr(x, **text_inputs(), return_dict=False)[0], stock, rtol=0, atol=0)
    with state.activate(ref_lengths=[16, 16], mode="dense"):
        torch.testing.assert_close(tr(x, **text_inputs(), return_dict=False)[0], stock, rtol=0, atol=0)
    masks = torch.tensor([0, 1] * 24).view(1, 48).expand(2, -1)  # alternating columns
    for mode, extra in [("similarity", {}), ("masks", {"mask_buckets": masks})]:
        with state.activate(ref_lengths=[16, 16], mode=mode, record=True, **extra):
            routed = tr(x, **text_inputs(), return_dict=False)[0]
        assert routed.isfinite().all() and (routed - stock).abs().max() > 1e-4
        assert set(state.buckets) == {0, 1}
    router = IDRouter.from_transformer(tr, router_dim=16, num_heads=2)
    assert (router.config.hidden_dim, router.config.text_dim, router.config.num_layers) == (32, 16, 2)
    with state.activate(ref_lengths=[16, 16], mode="router", router=router, video_grid=(3, 4, 4)):
        assert tr(x, **text_inputs(), return_dict=False)[0].isfinite().all()


@pytest.mark.parametrize("text_routing", [False, True])
def test_routed_attention_matches_an_explicit_mask(text_routing):
    attn = tiny_transformer().transformer_blocks[0].attn
    torch.manual_seed(2)
    lv, refs, lt = 6, [2, 4], 5
    hidden, text = torch.randn(2, lv + 6, 32), torch.randn(2, lt, 32)
    pad = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    rope = (torch.randn(lv + 6, 16), torch.randn(lv + 6, 16))
    buckets = torch.tensor([[0, 1, -1, 1, 0, 0], [1, -1, 0, 0, 1, 1]])
    owner = torch.tensor([-1, 0, -1, 1, -1]) if text_routing else None
    segments = [TextSegments(torch.tensor([0, 2, 4, 1, 3]), [1, 1])] * 2 if text_routing else None
    state = SubjectRoutingState()
    with state.activate(ref_lengths=refs, mode="masks", mask_buckets=buckets, text_segments=segments, backend="torch"):
        visual, txt = HunyuanVideo15SubjectSparseAttnProcessor(state, 0)(attn, hidden, text, pad, rope)

    # Test-only reference: [video | refs | text] with an explicit visibility mask.
    q, k, v = (p(hidden).unflatten(2, (2, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = (
        apply_rotary_emb(attn.norm_q(q), rope, sequence_dim=1),
        apply_rotary_emb(attn.norm_k(k), rope, sequence_dim=1),
    )
    tq, tk, tv = (p(text).unflatten(2, (2, -1)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
    q, k, v = (torch.cat(pair, 1).transpose(1, 2) for pair in ((q, tq), (k, tk), (v, tv)))
    subj = torch.tensor([0, 0, 1, 1, 1, 1])
    length = lv + 6 + lt
    visible = torch.zeros(2, length, length, dtype=torch.bool)
    for b in range(2):
        for i in range(lv):
            s = int(buckets[b, i])
            visible[b, i, :lv] = True
            visible[b, i, lv : lv + 6] = subj == s
            visible[b, i, lv + 6 :] = pad[b] & ((owner == -1) | (owner == s)) if owner is not None else pad[b]
        for j in range(6):
            s = int(subj[j])
            visible[b, lv + j, lv : lv + 6] = subj == s
            visible[b, lv + j, lv + 6 :] = pad[b] & ((owner == -1) | (owner == s)) if owner is not None else pad[b]
        visible[b, lv + 6 :, :lv] = True
        visible[b, lv + 6 :, lv + 6 :] = pad[b]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None]).transpose(1, 2).flatten(2, 3)
    out_text = out[:, lv + 6 :] * pad[:, :, None]  # padding queries: zeros, as SDPA gives a fully masked row
    torch.testing.assert_close(visual, attn.to_out[0](out[:, : lv + 6]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, attn.to_add_out(out_text), atol=1e-5, rtol=1e-5)


def test_text_mask_is_checked():
    from diasr_diffusers.processors.core import routed_joint_attention

    parts = [tuple(torch.zeros(1, n, 1, 4) for _ in range(3)) for n in (3, 2, 2)]
    with pytest.raises(ValueError, match=r"`text_mask` must be a bool tensor of shape \(B, Lt\) = \(1, 3\)"):
        routed_joint_attention(SubjectRoutingState(ref_lengths=[2]), torch.zeros(1, 2, dtype=torch.long), *parts,
                               text_mask=torch.ones(1, 4, dtype=torch.bool))  # fmt: skip
