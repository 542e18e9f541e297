"""FLOPs model against hand-computed numbers."""

from __future__ import annotations

import pytest

from diasr_diffusers.ops import WAN_TOKENS, attention_flops, equal_routing, wan_step_flops

KW = dict(heads=4, head_dim=64)  # 4 * d * H = 1024


def test_video_only_and_dense_joint():
    assert attention_flops(4096, [512] * 3, pattern="video_only", **KW) == 17_179_869_184  # 4096^2 * 1024
    assert attention_flops(4096, [512] * 3, pattern="dense_joint", **KW) == 32_480_690_176  # 5632^2 * 1024


def test_routed_with_explicit_and_default_routing():
    # 4096^2 + 3 * 1000 * 512 + 3 * 512^2 = 19,099,648 token pairs
    got = attention_flops(4096, [512] * 3, routed_tokens=[1000] * 3, **KW)
    assert got == 19_099_648 * 1024
    assert equal_routing(4096, 3) == [1024, 1024, 1024]
    # default: equal shares for 3 subjects and null -> 4096^2 + 3 * 1024 * 512 + 3 * 512^2 = 19,136,512
    assert attention_flops(4096, [512] * 3, **KW) == 19_136_512 * 1024
    # ragged references and routing
    assert attention_flops(10, [2, 0, 3], routed_tokens=[4, 1, 5], heads=1, head_dim=1) == 4 * (
        100 + 8 + 0 + 15 + 4 + 9
    )


def test_backward_and_batch():
    fwd = attention_flops(100, [10], routed_tokens=[30], **KW)
    assert fwd == 1024 * (10_000 + 300 + 100)
    assert attention_flops(100, [10], routed_tokens=[30], which="backward", **KW) == 2.5 * fwd
    assert attention_flops(100, [10], routed_tokens=[30], which="forward+backward", **KW) == 3.5 * fwd
    assert attention_flops(100, [10], routed_tokens=[30], batch=3, **KW) == 3 * fwd


def test_bad_arguments():
    with pytest.raises(ValueError, match="pattern"):
        attention_flops(10, [1], pattern="sparse", **KW)
    with pytest.raises(ValueError, match="which"):
        attention_flops(10, [1], which="fwd", **KW)
    with pytest.raises(ValueError, match="routed_tokens"):
        attention_flops(10, [1, 2], routed_tokens=[3], **KW)
    with pytest.raises(ValueError, match="routed_tokens"):
        attention_flops(10, [1], routed_tokens=[11], **KW)


def test_brief_ratios_at_wan_480p():
    lv, r = WAN_TOKENS["480p"]["video"], WAN_TOKENS["480p"]["reference"]
    assert (lv, r) == (32_760, 1_560) and WAN_TOKENS["720p"] == {"video": 75_600, "reference": 3_600}
    kw = dict(heads=12, head_dim=128)
    routed = attention_flops(lv, [r] * 4, **kw)
    assert 1.33 < attention_flops(lv, [r] * 4, pattern="dense_joint", **kw) / routed < 1.38  # brief: ~1.36x
    assert 1.01 < routed / attention_flops(lv, [], pattern="video_only", **kw) < 1.06


def test_wan_step_flops_by_hand():
    # Wan2.1-1.3B, plain T2V at 480p: T = 32,760 tokens, dim 1536, 30 layers, ffn 8960, 512 text tokens.
    t, d, ffn, text, layers = 32_760, 1536, 8960, 512, 30
    got = wan_step_flops("wan2.1-1.3b", 0, video_tokens=t, reference_tokens=1560, pattern="video_only")
    assert got["self_attention"] == layers * 4 * t * t * d
    assert got["projections"] == layers * (12 * t * d * d + 4 * text * d * d)
    assert got["cross_attention"] == layers * 4 * t * text * d
    assert got["ffn"] == layers * 4 * t * d * ffn
    assert got["total"] == pytest.approx(282.98001383424e12, rel=1e-12)
    # Two subjects routed: every linear term sees T = 32,760 + 2 * 1,560 tokens; attention is the routed pattern.
    two = wan_step_flops("wan2.1-1.3b", 2, video_tokens=t, reference_tokens=1560, routed_tokens=[10_000, 5_000])
    t2 = t + 3120
    assert two["ffn"] == layers * 4 * t2 * d * ffn
    assert two["self_attention"] == layers * 4 * d * (t * t + 10_000 * 1560 + 5_000 * 1560 + 2 * 1560**2)
    dense = wan_step_flops("wan2.1-1.3b", 2, video_tokens=t, reference_tokens=1560, pattern="dense_joint")
    assert dense["self_attention"] == layers * 4 * d * t2 * t2
    assert dense["total"] - two["total"] == dense["self_attention"] - two["self_attention"]
