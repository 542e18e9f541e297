"""Parts of ``benchmarks/gpu_check.sh``: the Triton op against SDPA, the no-sync checks, a Wan-1.3B transformer step.

Each part prints table rows as ``ROW<TAB>part<TAB>item<TAB>result<TAB>detail`` lines (the shell script collects them
into one table) and stops starting new measurements when its ``--budget`` seconds are spent, so the whole check has a
fixed upper bound. ``--dry-run`` runs the same code on CPU with tiny shapes and the portable backend (to test the
plumbing on a machine without a GPU); its numbers mean nothing.

    PYTHONPATH=src python benchmarks/gpu_check.py op --budget 170
    PYTHONPATH=src python benchmarks/gpu_check.py syncs --budget 40
    PYTHONPATH=src python benchmarks/gpu_check.py step --budget 120
    PYTHONPATH=src python benchmarks/gpu_check.py op --dry-run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diasr_diffusers.ops import attention_flops, bucketed_attention, wan_step_flops


def row(part: str, item: str, result: str, detail: str = "") -> None:
    print("\t".join(["ROW", part, item, result, detail.replace("\t", " ")]), flush=True)


@dataclass(frozen=True)
class Layout:
    name: str
    heads: int
    video: int
    ref: int  # reference tokens per subject (one latent frame)
    head_dim: int = 128


# Wan 2.1 self-attention: 81 frames -> 21 latent frames; 480p = 30 x 52 tokens per frame, 720p = 45 x 80.
LAYOUTS = [
    Layout("Wan-1.3B 480p", 12, 32_760, 1_560),
    Layout("Wan-14B 480p", 40, 32_760, 1_560),
    Layout("Wan-1.3B 720p", 12, 75_600, 3_600),
    Layout("Wan-14B 720p", 40, 75_600, 3_600),
]
DRY_LAYOUTS = [Layout("tiny (dry run)", 2, 256, 32, head_dim=32)]


class Timer:
    """Median wall time of ``fn`` (CUDA events on a GPU)."""

    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn: Callable[[], object], warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return statistics.median(times)


def _inputs(layout: Layout, n: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    total = layout.video + n * layout.ref
    q, k, v = (torch.randn(1, total, layout.heads, layout.head_dim, device=device, dtype=dtype, generator=g)
               for _ in range(3))  # fmt: skip
    video_buckets = torch.randint(-1, n, (1, layout.video), device=device, generator=g)
    ref_buckets = torch.arange(n, device=device).repeat_interleave(layout.ref)[None]
    return q, k, v, video_buckets, ref_buckets


def _routed(backend, q, k, v, vb, rb, layout, n):
    """The full routed self-attention layer: video queries (shared video keys + their subject's reference) and
    reference queries (their own reference), through the trusted path."""
    lv, refs = layout.video, [layout.ref] * n
    out_v = bucketed_attention(q[:, :lv], k, v, vb, refs, backend=backend, check_inputs=False)
    out_r = bucketed_attention(q[:, lv:], k[:, lv:], v[:, lv:], rb, refs, backend=backend, check_inputs=False)
    return torch.cat([out_v, out_r], dim=1)


def _sdpa(q, k, v, device):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def part_op(args) -> None:
    """Triton op forward / forward+backward TFLOP/s against FlashAttention-2 (SDPA) on the same tokens."""
    device, dtype = args.device, args.dtype
    backend = "triton" if device == "cuda" else "torch"
    layouts = DRY_LAYOUTS if args.dry_run else LAYOUTS
    subjects = [1, 2] if args.dry_run else [1, 2, 3, 4]
    timer, t0 = Timer(device), time.time()
    for which in ("forward", "forward+backward"):
        for layout in layouts:
            for n in subjects:
                label = f"{which}: {layout.name}, {n} subject(s), H={layout.heads}, D={layout.head_dim}"
                if time.time() - t0 > args.budget:
                    row("op", label, "SKIPPED", f"time budget of {args.budget:.0f} s spent")
                    continue
                try:
                    _op_row(layout, n, which, backend, device, dtype, timer, label)
                except Exception as err:  # report and go on: one failing shape must not hide the others
                    row("op", label, "ERROR", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                if device == "cuda":
                    torch.cuda.empty_cache()


def _op_row(layout, n, which, backend, device, dtype, timer, label) -> None:
    grad = which != "forward"
    q, k, v, vb, rb = _inputs(layout, n, device, dtype)
    lv = layout.video
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))

    def run(fn):
        def step():
            out = fn()
            if grad:
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

        return step

    workloads = {
        "routed": run(lambda: _routed(backend, q, k, v, vb, rb, layout, n)),
        "video-only": run(lambda: _sdpa(q[:, :lv], k[:, :lv], v[:, :lv], device)),
        "dense joint": run(lambda: _sdpa(q, k, v, device)),
    }
    kw = dict(heads=layout.heads, head_dim=layout.head_dim, which=which)
    counts = [int(c) for c in torch.bincount(vb[0] + 1, minlength=n + 1)[1:].tolist()]
    flops = {
        "routed": attention_flops(lv, [layout.ref] * n, pattern="routed", routed_tokens=counts, **kw),
        "video-only": attention_flops(lv, [], pattern="video_only", **kw),
        "dense joint": attention_flops(lv, [layout.ref] * n, pattern="dense_joint", **kw),
    }
    sdpa = "FA2" if device == "cuda" else "SDPA"
    big = layout.video * layout.heads > 2_000_000
    secs = {name: timer(fn, warmup=1, repeats=2 if big else 3) for name, fn in workloads.items()}
    tf = {name: flops[name] / secs[name] / 1e12 for name in secs}
    floor = secs["video-only"] * flops["routed"] / flops["video-only"]
    row("op", label, f"{backend} {tf['routed']:.0f} TFLOP/s",
        f"{sdpa} video-only {tf['video-only']:.0f}, {sdpa} dense joint {tf['dense joint']:.0f} TFLOP/s; "
        f"{backend}/{sdpa} throughput {tf['routed'] / tf['video-only']:.2f}; time x video-only "
        f"{secs['routed'] / secs['video-only']:.3f}, x dense {secs['routed'] / secs['dense joint']:.3f}, "
        f"x FLOPs floor {secs['routed'] / floor:.3f}; routed {secs['routed'] * 1e3:.1f} ms")  # fmt: skip


def part_syncs(args) -> None:
    """The op's trusted path under ``torch.cuda.set_sync_debug_mode("error")``, after a warm-up."""
    device, dtype = args.device, args.dtype
    if device != "cuda":
        row("syncs", "op trusted path (all backends)", "N/A", "dry run: set_sync_debug_mode needs CUDA")
        return
    layout = Layout("Wan-1.3B 480p", 12, 32_760, 1_560)
    small = Layout("small", 4, 4_096, 512)
    # FlexAttention last: its first call compiles (tens of seconds).
    cases = [("triton", layout, True), ("torch", layout, False), ("dense", small, True), ("flex", layout, True)]
    t0 = time.time()
    for backend, lay, grad in cases:
        label = f"{backend}, {lay.name}, 2 subjects, {'forward+backward' if grad else 'forward (no autograd)'}"
        if time.time() - t0 > args.budget:
            row("syncs", label, "SKIPPED", f"time budget of {args.budget:.0f} s spent")
            continue
        try:
            q, k, v, vb, rb = _inputs(lay, 2, device, dtype)
            leaves = [t.requires_grad_(grad) for t in (q, k, v)]

            def step(backend=backend, lay=lay, grad=grad, leaves=leaves, vb=vb, rb=rb):
                with torch.set_grad_enabled(grad):
                    out = _routed(backend, *leaves, vb, rb, lay, 2)
                    if grad:
                        torch.autograd.grad(out, leaves, torch.ones_like(out))

            step()  # compilation, autotuning, the one-time SDPA self-check: allowed to sync
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
                row("syncs", label, "OK: no sync")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        except Exception as err:
            row("syncs", label, "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")


def _wan_config(dry_run: bool) -> dict:
    from diasr_diffusers.pipelines.public_weights import WAN21_TRANSFORMER_CONFIGS

    config = dict(WAN21_TRANSFORMER_CONFIGS[(1536, 30)])  # the real Wan2.1-T2V-1.3B transformer
    if dry_run:
        config.update(num_attention_heads=2, attention_head_dim=32, num_layers=2, ffn_dim=128, text_dim=32)
    return config


def part_step(args) -> None:
    """One transformer forward (a denoising step without CFG) of a random-weight Wan-1.3B: T2V, dense (Phantom),
    routed (DiasR, training-free similarity routing), against the FLOPs model; then the routed forward under
    ``set_sync_debug_mode("error")``."""
    from diffusers import WanTransformer3DModel

    from diasr_diffusers.processors.wan import set_subject_sparse_attn_processor

    device, dtype = args.device, args.dtype
    t0 = time.time()
    config = _wan_config(args.dry_run)
    with torch.device(device):
        transformer = WanTransformer3DModel(**config).to(dtype).eval()
    state = set_subject_sparse_attn_processor(transformer)
    frames, h, w = (3, 8, 8) if args.dry_run else (21, 60, 104)  # 81 frames at 832 x 480
    tokens_per_frame = (h // 2) * (w // 2)
    text = torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype)
    timestep = torch.tensor([500], device=device)
    timer = Timer(device)
    params = sum(p.numel() for p in transformer.parameters())
    name = "tiny Wan (dry run)" if args.dry_run else "Wan-1.3B architecture (real config)"
    row("step", "model", f"{name}, random weights, {params / 1e6:,.0f} M params",
        f"built in {time.time() - t0:.0f} s; {frames} latent frames of {h} x {w}; one forward = one step without CFG")
    for n in ([2] if args.dry_run else [2, 4]):
        if time.time() - t0 > args.budget:
            row("step", f"{n} subjects", "SKIPPED", f"time budget of {args.budget:.0f} s spent")
            continue
        try:
            g = torch.Generator(device=device).manual_seed(n)
            latents = torch.randn(1, 16, frames + n, h, w, device=device, dtype=dtype, generator=g)
            refs = [tokens_per_frame] * n

            def forward(x, **routing):
                with torch.no_grad(), state.activate(**routing):
                    return transformer(x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

            runs = {
                "T2V": lambda x=latents: forward(x[:, :, :frames]),
                "dense (Phantom)": lambda x=latents, r=refs: forward(x, ref_lengths=r, mode="dense"),
                "routed (DiasR)": lambda x=latents, r=refs: forward(x, ref_lengths=r, mode="similarity"),
            }
            reps = 1 if args.dry_run else 3
            secs = {name: timer(fn, warmup=1, repeats=reps) for name, fn in runs.items()}
            model = "wan2.1-1.3b"
            lv = frames * tokens_per_frame
            fl = {
                "T2V": wan_step_flops(model, 0, video_tokens=lv, reference_tokens=0, pattern="video_only"),
                "dense (Phantom)": wan_step_flops(model, n, video_tokens=lv, reference_tokens=tokens_per_frame,
                                                  pattern="dense_joint"),
                "routed (DiasR)": wan_step_flops(model, n, video_tokens=lv, reference_tokens=tokens_per_frame),
            }  # fmt: skip
            fl = {name: f["total"] for name, f in fl.items()}
            for name, s in secs.items():
                floor = secs["T2V"] * fl[name] / fl["T2V"]
                row("step", f"{n} subjects: {name}", f"{s * 1e3:.0f} ms",
                    f"x T2V {s / secs['T2V']:.3f} (FLOPs model x{fl[name] / fl['T2V']:.3f}), x floor {s / floor:.3f}, "
                    f"x dense {s / secs['dense (Phantom)']:.3f}")  # fmt: skip
        except Exception as err:
            row("step", f"{n} subjects", "ERROR", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if device != "cuda":
        row("syncs", "routed transformer forward", "N/A", "dry run: set_sync_debug_mode needs CUDA")
        return
    # The processors call the op's trusted path (check_inputs=False) and check their inputs in `activate`, outside
    # the forward: zero syncs expected (tests/test_processors_hotpath.py proves it on CPU with a dispatch recorder).
    n = 2
    latents = torch.randn(1, 16, frames + n, h, w, device=device, dtype=dtype)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        with torch.no_grad(), state.activate(ref_lengths=[tokens_per_frame] * n, mode="similarity"):
            transformer(latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        row("syncs", "routed Wan-1.3B transformer forward (similarity)", "OK: no sync")
    except Exception as err:
        row("syncs", "routed Wan-1.3B transformer forward (similarity)", "FAIL",
            f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")


def part_env(args) -> None:
    import platform

    info = f"torch {torch.__version__}, Python {platform.python_version()}"
    for mod in ("triton", "diffusers", "xformers"):
        try:
            info += f", {mod} {__import__(mod).__version__}"
        except Exception:
            info += f", {mod} not installed"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run: numbers mean nothing)"
    row("env", "device", device, info)


PARTS = {"env": part_env, "op": part_op, "syncs": part_syncs, "step": part_step}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=list(PARTS))
    p.add_argument("--budget", type=float, default=120.0, help="seconds after which no new measurement starts")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, portable backend: test the plumbing")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.dtype = "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            print("gpu_check.py: no CUDA device (torch.cuda.is_available() is False); use --dry-run on CPU",
                  file=sys.stderr)  # fmt: skip
            return 2
        args.device, args.dtype = "cuda", torch.bfloat16
    PARTS[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
