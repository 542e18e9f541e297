"""One denoising step (a transformer forward without CFG): T2V vs dense references (Phantom) vs routed (DiasR).

A random-weight ``WanTransformer3DModel`` (4 heads of 64 by default, the issue-22 CPU shape: 8 latent frames of
16 x 32 tokens = 4,096 video tokens and N one-frame references of 512 tokens) runs, interleaved round-robin:

* ``T2V``: the video alone (stock attention; plain text-to-video, the floor).
* ``dense (Phantom)``: every token attends to every reference (``mode="dense"``).
* ``routed (masks)``: DiasR with a given routing, equal shares for the subjects and null (``mode="masks"``).
* ``routed (similarity)``: training-free routing (``mode="similarity"``; the routing comes out of random weights, so
  its shares are whatever they are: the floor below uses the shares it produced).
* ``routed (router)``: a random-weight :class:`IDRouter` on every layer with phrase features (``mode="router"``).

The **FLOPs floor** of a workload is the T2V time scaled by the ratio of its FLOPs to T2V's
(:func:`diasr_diffusers.ops.wan_step_flops`, with the routed shares the step actually used): the time the step would
take at T2V's throughput. ``x floor`` = median time / floor. The **router's share** is the time spent in the router's
own calls (anchor encoding and per-layer scoring, timed by wrapping the router's two methods) over the step's time.

    PYTHONPATH=src python benchmarks/bench_step.py --threads 1 --repeats 5 [--md docs/benchmarks.md]

CPU timings on a shared machine are noisy: every ratio is taken within one run, workloads interleaved.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diasr_diffusers import IDRouter, set_subject_sparse_attn_processor
from diasr_diffusers.ops import WanConfig, wan_step_flops

ROOT = Path(__file__).resolve().parents[1]


def build(args: argparse.Namespace):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=16,
        out_channels=16, text_dim=args.text_dim, freq_dim=256, ffn_dim=args.ffn_dim, num_layers=args.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    ).eval()  # fmt: skip
    router = IDRouter.from_transformer(transformer, router_dim=args.router_dim, num_identity_queries=4, num_heads=2)
    return transformer, router.eval()


class RouterClock:
    """Seconds spent inside ``router.encode_anchors`` and ``router.forward`` (the router's whole work in a step)."""

    def __init__(self, router: IDRouter):
        self.seconds = 0.0
        for name in ("encode_anchors", "forward"):
            setattr(router, name, self._timed(getattr(router, name)))

    def _timed(self, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return wrapper


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--frames", type=int, default=8, help="latent frames of the video")
    p.add_argument("--height", type=int, default=32, help="latent height (tokens: height / 2)")
    p.add_argument("--width", type=int, default=64, help="latent width (tokens: width / 2)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--router-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--md", type=Path, default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    transformer, router = build(args)
    clock = RouterClock(router)
    state = set_subject_sparse_attn_processor(transformer)
    n, f = args.subjects, args.frames
    per_frame = (args.height // 2) * (args.width // 2)
    lv = f * per_frame
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, f + n, args.height, args.width, generator=g)
    text = torch.randn(1, args.text_tokens, args.text_dim, generator=g)
    phrases = [torch.randn(1, 3, args.text_dim, generator=g) for _ in range(n)]
    timestep = torch.tensor([500])
    refs = [per_frame] * n
    # Equal shares for the subjects and null, spread over the video (a random permutation: no spatial structure).
    masks = (torch.randperm(lv, generator=g) % (n + 1) - 1).view(1, lv)
    grid = (f, args.height // 2, args.width // 2)

    def forward(x: torch.Tensor, **routing) -> torch.Tensor:
        with torch.no_grad(), state.activate(**routing):
            return transformer(x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

    runs: dict[str, Callable[[], object]] = {
        "T2V": lambda: forward(latents[:, :, :f]),
        "dense (Phantom)": lambda: forward(latents, ref_lengths=refs, mode="dense"),
        "routed (masks)": lambda: forward(latents, ref_lengths=refs, mode="masks", mask_buckets=masks),
        "routed (similarity)": lambda: forward(latents, ref_lengths=refs, mode="similarity"),
        "routed (router)": lambda: forward(
            latents, ref_lengths=refs, mode="router", router=router, phrase_features=phrases, video_grid=grid
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    router_seconds: list[float] = []
    shares: dict[str, list[int]] = {}
    for i in range(args.warmup + args.repeats):
        for name, fn in runs.items():
            clock.seconds = 0.0
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
                if name == "routed (router)":
                    router_seconds.append(clock.seconds / dt)
            if name.startswith("routed") and state.buckets:
                # the tokens each subject got, averaged over the routed layers (the FLOPs model's n_s)
                b = torch.stack(list(state.buckets.values()))
                shares[name] = [round(float((b == s).sum()) / len(b)) for s in range(n)]
    cfg = WanConfig(dim=args.heads * args.head_dim, heads=args.heads, layers=args.layers, ffn_dim=args.ffn_dim)
    common = dict(video_tokens=lv, reference_tokens=per_frame, text_tokens=args.text_tokens)
    flops = {
        "T2V": wan_step_flops(cfg, 0, **common, pattern="video_only"),
        "dense (Phantom)": wan_step_flops(cfg, n, **common, pattern="dense_joint"),
        **{name: wan_step_flops(cfg, n, **common, routed_tokens=shares[name]) for name in shares},
    }
    med = {name: statistics.median(t) for name, t in times.items()}
    lines = [
        "| workload | median step | × T2V | FLOPs × T2V | × FLOPs floor | × dense | routed tokens per subject |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in runs:
        ratio = flops[name]["total"] / flops["T2V"]["total"]
        floor = med["T2V"] * ratio
        lines.append(
            f"| {name} | {med[name] * 1e3:.0f} ms | {med[name] / med['T2V']:.3f} | {ratio:.3f} | "
            f"{med[name] / floor:.3f} | {med[name] / med['dense (Phantom)']:.3f} | {shares.get(name, '')} |"
        )
    share = statistics.median(router_seconds) if router_seconds else float("nan")
    command = "PYTHONPATH=src python benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    head = [
        f"### One step, T2V vs dense vs routed ({_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{command}`. {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}, load average {' '.join(load)}. Random-weight WanTransformer3DModel: "
        f"{args.layers} layers, {args.heads} heads of {args.head_dim}, FFN {args.ffn_dim}, {args.text_tokens} text "
        f"tokens; {lv} video tokens ({f} latent frames of {grid[1]} x {grid[2]}) + {n} x {per_frame} reference "
        f"tokens; median of {args.repeats} interleaved runs after {args.warmup} warm-up.",
        "",
    ]
    tail = ["", f"Router's own share of the routed (router) step: {share:.1%} (median over the runs).", ""]
    text_out = "\n".join(head + lines + tail)
    print(text_out)
    if args.md is not None:
        with open(args.md, "a") as fh:
            fh.write("\n" + text_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
