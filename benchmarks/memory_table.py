"""Estimated GPU memory of DiasRPipeline on Wan2.1 1.3B / 14B, 480p / 720p, 1-4 subjects, under each memory option.

Computed, not measured: parameter counts come from the real Wan2.1 / UMT5-XXL / Wan-VAE configurations instantiated
on the ``meta`` device (exact, no memory used); activations from the token counts and layer shapes (the model is
explained in ``docs/memory.md``). Rewrites the generated part of ``docs/memory.md`` (between its markers):

    PYTHONPATH=src python benchmarks/memory_table.py --md docs/memory.md
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from diasr_diffusers.ops import WAN_TOKENS
from diasr_diffusers.ops.flops import WAN_CONFIGS
from diasr_diffusers.utils.io import atomic_write_text

BEGIN, END = "<!-- memory_table:begin -->", "<!-- memory_table:end -->"
GB = 1e9
TEXT_TOKENS = 512
# Q8_0 stores 32 weights in 34 bytes, Q4_0 in 18: 8.5 and 4.5 bits per weight.
GGUF_BITS = {"Q8_0": 8.5, "Q4_0": 4.5}


@dataclass
class Weights:
    """Bytes of one model's weights under each storage choice."""

    bf16: float  # as Diffusers loads it with dtype=bfloat16 (`_keep_in_fp32_modules` stay float32)
    fp8: float  # enable_layerwise_casting(storage_dtype=float8_e4m3fn); skipped layers stay as in bf16
    gguf: dict[str, float]  # every 2D Linear weight of the blocks quantized, the rest as in bf16
    non_block: float  # bf16 bytes outside `blocks` (embeddings, head, modulation): resident under block offload
    block: float  # bf16 bytes of one transformer block
    largest_leaf: float  # bf16 bytes of the largest leaf module


def _param_bytes(model: torch.nn.Module, keep_fp32: list[str]) -> dict[str, float]:
    return {name: p.numel() * (4 if any(k in name for k in keep_fp32) else 2) for name, p in model.named_parameters()}


def transformer_weights(model_id: str) -> tuple[Weights, int]:
    from diffusers import WanTransformer3DModel

    c = WAN_CONFIGS[model_id]
    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=c.heads, attention_head_dim=c.head_dim, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=c.ffn_dim, num_layers=c.layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        )  # fmt: skip
    count = sum(p.numel() for p in model.parameters())
    bf16 = _param_bytes(model, model._keep_in_fp32_modules)
    linear2d = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.")
    }
    gguf = {q: sum(model.get_parameter(n).numel() * bits / 8 if n in linear2d else b for n, b in bf16.items())
            for q, bits in GGUF_BITS.items()}  # fmt: skip
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    fp8 = sum(p.numel() if p.dtype == torch.float8_e4m3fn else bf16[n] for n, p in model.named_parameters())
    block = sum(b for n, b in bf16.items() if n.startswith("blocks.0."))
    leaves = [
        sum(p.numel() * 2 for p in m.parameters(recurse=False)) for m in model.modules() if not list(m.children())
    ]
    weights = Weights(
        bf16=sum(bf16.values()),
        fp8=fp8,
        gguf=gguf,
        non_block=sum(b for n, b in bf16.items() if not n.startswith("blocks.")),
        block=block,
        largest_leaf=max(leaves),
    )
    return weights, count


def other_components() -> dict[str, tuple[int, float]]:
    """(parameters, bytes) of the UMT5-XXL text encoder (bf16) and the Wan VAE (float32, as Wan's examples load it)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        text = UMT5EncoderModel(
            UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       feed_forward_proj="gated-gelu")
        )  # fmt: skip
        vae = AutoencoderKLWan()
    n_text = sum(p.numel() for p in text.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    return {"text_encoder": (n_text, 2 * n_text), "vae": (n_vae, 4 * n_vae)}


def activation_bytes(model_id: str, res: str, num_subjects: int, routed: bool = True) -> float:
    """Peak activation bytes of one transformer forward (batch 1, bf16 compute, inference).

    Live across layers: hidden states ``2 T d`` and rotary cos/sin tables ``2 * 4 T d_head``, text ``2 * 512 d``.
    Inside a block, the larger of the attention phase (fp32 norm input ``4 T d``, normed input ``2 T d``, q/k/v
    ``6 T d``, normed + rotated q/k ``4 T d``, rotary fp32 temporaries ``4 T d``, output ``2 T d``; routing adds the
    fp32 routing features of the video queries ``4 Lv d`` and the concatenated output ``2 T d``) and the FFN phase
    (fp32 residual ``4 T d``, normed input ``2 T d``, intermediate and its GELU ``2 * 2 T f``). Attention kernels are
    flash-style (no ``T x T`` matrix): the Triton backend on CUDA, SDPA for the stock paths.
    """
    c = WAN_CONFIGS[model_id]
    lv, r = WAN_TOKENS[res]["video"], WAN_TOKENS[res]["reference"]
    t = lv + num_subjects * r
    d, f = c.dim, c.ffn_dim
    persistent = 2 * t * d + 2 * 4 * t * c.head_dim + 2 * TEXT_TOKENS * d
    attention = 22 * t * d + ((4 * lv * d + 2 * t * d) if routed and num_subjects else 0)
    ffn = 6 * t * d + 4 * t * f
    return persistent + max(attention, ffn)


OPTIONS = [
    ("bf16, all on GPU", '`pipe.to("cuda")`'),
    ("model offload", "`enable_model_cpu_offload()`"),
    ("FP8 + model offload", "layerwise casting FP8 + `enable_model_cpu_offload()`"),
    ("GGUF Q8_0 + model offload", "`from_single_file(..Q8_0.gguf)` + `enable_model_cpu_offload()`"),
    ("GGUF Q4_0 + model offload", "`from_single_file(..Q4_0.gguf)` + `enable_model_cpu_offload()`"),
    ("group offload, block, stream", "`enable_group_offload(block_level, num_blocks_per_group=1, use_stream=True)`"),
    ("group offload, leaf, stream", "`enable_group_offload(leaf_level, use_stream=True)`"),
    ("sequential offload", "`enable_sequential_cpu_offload()`"),
]


def resident_weights(option: str, w: Weights, others: dict[str, tuple[int, float]]) -> float:
    """GPU-resident weight bytes while the transformer denoises (the peak phase for video lengths that matter)."""
    if option == "bf16, all on GPU":
        return w.bf16 + others["text_encoder"][1] + others["vae"][1]
    if option == "model offload":
        return w.bf16
    if option == "FP8 + model offload":
        return w.fp8 + w.largest_leaf  # plus one layer upcast to bf16 at a time
    if option.startswith("GGUF"):
        return w.gguf[option.split()[1]] + w.largest_leaf  # plus one layer dequantized at a time
    if option == "group offload, block, stream":
        return w.non_block + 2 * w.block  # the running block and the prefetched one
    if option == "group offload, leaf, stream":
        return 2 * w.largest_leaf
    if option == "sequential offload":
        return w.largest_leaf
    raise ValueError(option)


def table() -> str:
    others = other_components()
    lines = [
        f"Generated by `PYTHONPATH=src python {' '.join(sys.argv)}`: estimates in GB (1e9 bytes), nothing measured.",
        "",
        "Parameters (exact, from the configurations): "
        + ", ".join(f"{name} {n / 1e9:.3f} B ({b / GB:.2f} GB as loaded)" for name, (n, b) in others.items())
        + ".",
        "",
    ]
    weights = {}
    for model_id in WAN_CONFIGS:
        w, n = transformer_weights(model_id)
        weights[model_id] = w
        lines.append(
            f"- {model_id} transformer: {n / 1e9:.3f} B parameters; bf16 {w.bf16 / GB:.2f} GB, FP8 storage "
            f"{w.fp8 / GB:.2f} GB, GGUF Q8_0 {w.gguf['Q8_0'] / GB:.2f} GB, Q4_0 {w.gguf['Q4_0'] / GB:.2f} GB; one "
            f"block {w.block / GB:.3f} GB, outside the blocks {w.non_block / GB:.3f} GB, largest layer "
            f"{w.largest_leaf / GB:.3f} GB."
        )
    lines += ["", "### Resident weights on the GPU while denoising (GB)", ""]
    lines += ["| option | code | " + " | ".join(WAN_CONFIGS) + " |", "|---|---|" + "---:|" * len(WAN_CONFIGS)]
    for option, code in OPTIONS:
        cells = " | ".join(f"{resident_weights(option, w, others) / GB:.2f}" for w in weights.values())
        lines.append(f"| {option} | {code} | {cells} |")
    for model_id, w in weights.items():
        lines += ["", f"### {model_id}: weights + activations, peak while denoising (GB)", ""]
        lines.append("| size | subjects | tokens | activations (routed) | " + " | ".join(o for o, _ in OPTIONS) + " |")
        lines.append("|---|---:|---:|---:|" + "---:|" * len(OPTIONS))
        for res in WAN_TOKENS:
            for n in range(1, 5):
                act = activation_bytes(model_id, res, n)
                tokens = WAN_TOKENS[res]["video"] + n * WAN_TOKENS[res]["reference"]
                cells = " | ".join(f"{(resident_weights(o, w, others) + act) / GB:.1f}" for o, _ in OPTIONS)
                lines.append(f"| {res} | {n} | {tokens:,} | {act / GB:.2f} | {cells} |")
    dense = activation_bytes("wan2.1-14b", "720p", 4, routed=False)
    routed = activation_bytes("wan2.1-14b", "720p", 4)
    lines += [
        "",
        f"Routing's own cost in activations (14B, 720p, 4 subjects): {routed / GB:.2f} GB routed vs {dense / GB:.2f} GB "
        'for `routing="dense"` (the fp32 routing features of the video queries and the concatenated output).',
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--md", type=Path, default=None, help=f"replace the text between {BEGIN} and {END} in this file")
    args = p.parse_args()
    text = table()
    print(text)
    if args.md:
        doc = args.md.read_text()
        if BEGIN not in doc or END not in doc:
            raise SystemExit(f"{args.md} has no {BEGIN} ... {END} markers")
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}{END}", doc, flags=re.S)
        atomic_write_text(args.md, doc)


if __name__ == "__main__":
    main()
