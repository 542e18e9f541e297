"""One-step FLOPs of Wan 2.1 with 1-4 subjects: plain T2V vs Phantom (dense joint) vs DiasR (routed).

One transformer forward (one denoising step without CFG; multiply by the number of guidance passes), counted by
:func:`diasr_diffusers.ops.wan_step_flops`. Routing: video tokens split in equal shares between the subjects and
null (``equal_routing``). Prints a markdown table and, with ``--md``, appends it to that file.

    PYTHONPATH=src python benchmarks/flops_table.py --md docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diasr_diffusers.ops import WAN_TOKENS, wan_step_flops

SETUPS = [("Wan2.1-1.3B", "wan2.1-1.3b", "480p"), ("Wan2.1-14B", "wan2.1-14b", "720p")]


def table(max_subjects: int = 4) -> str:
    lines = [
        "### One-step FLOPs, Wan 2.1 with N subjects (one transformer forward, no CFG)",
        "",
        f"Command: `PYTHONPATH=src python {' '.join(sys.argv)}`. Model: `diasr_diffusers.ops.wan_step_flops` "
        "(Q/K/V/O and cross-attention projections, self- and cross-attention cores over 512 text tokens, FFN; "
        "embeddings, head, norms and modulation left out). 81 frames; a reference is one latent frame; routed = "
        "video split in equal shares between the subjects and null. Attention-only columns count the "
        "self-attention core alone.",
        "",
        "| model | video tokens | N | ref tokens | T2V TFLOPs | Phantom (dense joint) TFLOPs | DiasR (routed) TFLOPs "
        "| routed / T2V | dense / routed | self-attn: routed / video-only | self-attn: dense / routed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, model, res in SETUPS:
        lv, r = WAN_TOKENS[res]["video"], WAN_TOKENS[res]["reference"]
        t2v = wan_step_flops(model, 0, video_tokens=lv, reference_tokens=r, pattern="video_only")
        for n in range(1, max_subjects + 1):
            routed = wan_step_flops(model, n, video_tokens=lv, reference_tokens=r, pattern="routed")
            dense = wan_step_flops(model, n, video_tokens=lv, reference_tokens=r, pattern="dense_joint")
            lines.append(
                f"| {label} {res} | {lv:,} | {n} | {n * r:,} | {t2v['total'] / 1e12:,.1f} | "
                f"{dense['total'] / 1e12:,.1f} | {routed['total'] / 1e12:,.1f} | "
                f"{routed['total'] / t2v['total']:.3f} | {dense['total'] / routed['total']:.3f} | "
                f"{routed['self_attention'] / t2v['self_attention']:.3f} | "
                f"{dense['self_attention'] / routed['self_attention']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--md", type=Path, default=None, help="append the table to this markdown file")
    args = p.parse_args()
    text = table()
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        if not args.md.exists():
            args.md.write_text("# Benchmarks\n")
        with args.md.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
