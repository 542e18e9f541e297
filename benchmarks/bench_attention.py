"""Benchmark subject-bucketed attention against dense joint SDPA (Phantom) and video-only SDPA (the floor).

Workloads, all over one self-attention layer on ``[video | ref_1 | ... | ref_N]`` tokens (B=1):

* ``routed[<backend>]``: DiasR. Video queries via ``bucketed_attention`` (shared keys = video, segment s = the
  references of subject s, buckets = a random routing with roughly equal shares for the subjects and null), plus the
  reference queries attending to their own reference (``bucketed_attention`` with no shared keys), outputs
  concatenated: exactly the FLOPs of the routed pattern ``4dH[Lv^2 + sum n_s R_s + sum R_s^2]``.
  A backend may carry a suffix: ``torch:trusted`` calls the op with ``check_inputs=False`` (the processors' path: no
  argument checks, no host read of the bucket range), ``torch:static`` the torch backend's sync-free route (what the
  trusted path runs on a GPU without autograd; on CPU only when forced, as here).
* ``dense_joint_sdpa``: ``scaled_dot_product_attention`` over all tokens (what Phantom pays).
* ``video_only_sdpa``: ``scaled_dot_product_attention`` over the video tokens (plain text-to-video, the floor).

The FLOPs floor of a workload is the video-only time scaled by its FLOPs ratio (own pattern / video-only): the time it
would take at video-only SDPA's throughput. ``× floor`` = median time / floor time.

Time is the median of ``--repeats`` runs after ``--warmup`` runs. TFLOP/s are counted on each workload's own pattern
(the routed rows on the routed FLOPs). Peak memory: CUDA ``max_memory_allocated`` above the inputs; on CPU the
increase of the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the call; ``ru_maxrss`` where
that is unavailable) over the RSS before the call, measured once per workload in a fresh subprocess
(``--cpu-memory``), else reported as n/a.

``--wan-cpu-forward`` runs only the torch backend forward at the Wan-1.3B shape on CPU and reports its peak RSS next
to the size an ``Lq x Lk`` score matrix would have.

Examples::

    PYTHONPATH=src python benchmarks/bench_attention.py --device cpu --preset cpu-small --cpu-memory
    PYTHONPATH=src python benchmarks/bench_attention.py --device cuda --preset wan1.3b --backward
    PYTHONPATH=src python benchmarks/bench_attention.py --wan-cpu-forward
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diasr_diffusers.ops import _torch_backend, attention_flops, bucketed_attention
from diasr_diffusers.ops.bucketed_attention import _check_inputs

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    video: int
    refs: tuple[int, ...]
    heads: int
    head_dim: int


PRESETS = {
    "cpu-small": Shape(4096, (512,) * 3, 4, 64),
    "wan1.3b": Shape(32_760, (1_560,) * 3, 12, 128),
    "wan1.3b-4": Shape(32_760, (1_560,) * 4, 12, 128),
    "wan14b": Shape(75_600, (3_600,) * 3, 40, 128),
    "wan14b-4": Shape(75_600, (3_600,) * 4, 40, 128),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0, requires_grad: bool = False):
    """q, k, v (1, T, H, D) over ``[video | refs]``; video buckets (1, Lv) with ~equal shares for subjects + null."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = shape.video + sum(shape.refs)
    qkv = [
        torch.randn(1, total, shape.heads, shape.head_dim, generator=g).to(device=device, dtype=dtype)
        for _ in range(3)
    ]
    for t in qkv:
        t.requires_grad_(requires_grad)
    n = len(shape.refs)
    video_buckets = torch.randint(-1, n, (1, shape.video), generator=g).to(device)
    ref_buckets = torch.cat([torch.full((r,), s) for s, r in enumerate(shape.refs)])[None].to(device)
    return qkv, video_buckets, ref_buckets


def routed(backend: str, q, k, v, video_buckets, ref_buckets, shape: Shape):
    lv, refs = shape.video, list(shape.refs)
    backend, _, mode = backend.partition(":")
    kw = dict(backend=backend, check_inputs=mode not in ("trusted", "static"))
    saved = _torch_backend.HOST_READS_ON_CPU
    _torch_backend.HOST_READS_ON_CPU = mode != "static"
    try:
        out_video = bucketed_attention(q[:, :lv], k, v, video_buckets, refs, **kw)
        out_refs = bucketed_attention(q[:, lv:], k[:, lv:], v[:, lv:], ref_buckets, refs, **kw)
    finally:
        _torch_backend.HOST_READS_ON_CPU = saved
    return torch.cat([out_video, out_refs], dim=1)


def check_inputs_cost(shape: Shape, inputs, repeats: int = 500) -> float:
    """Median seconds of the op's argument checks alone (two calls per routed layer, as in ``routed``)."""
    (q, k, v), vb, rb = inputs
    lv, refs = shape.video, list(shape.refs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _check_inputs(q[:, :lv], k, v, vb, refs, None)
        _check_inputs(q[:, lv:], k[:, lv:], v[:, lv:], rb, refs, None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sdpa(q, k, v):
    # Same (B, L, H, D) activations a Diffusers processor holds, viewed as (B, H, L, D).
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def workloads(shape: Shape, backends: list[str]):
    lv = shape.video
    wl = {f"routed[{b}]": (lambda q, k, v, vb, rb, b=b: routed(b, q, k, v, vb, rb, shape)) for b in backends}
    wl["dense_joint_sdpa"] = lambda q, k, v, vb, rb: sdpa(q, k, v)
    wl["video_only_sdpa"] = lambda q, k, v, vb, rb: sdpa(q[:, :lv], k[:, :lv], v[:, :lv])
    return wl


def flops_of(name: str, shape: Shape, video_buckets: torch.Tensor, which: str) -> float:
    kw = dict(heads=shape.heads, head_dim=shape.head_dim, which=which)
    if name == "dense_joint_sdpa":
        return attention_flops(shape.video, shape.refs, pattern="dense_joint", **kw)
    if name == "video_only_sdpa":
        return attention_flops(shape.video, [], pattern="video_only", **kw)
    counts = [int((video_buckets == s).sum()) for s in range(len(shape.refs))]
    return attention_flops(shape.video, shape.refs, pattern="routed", routed_tokens=counts, **kw)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_workloads(wl: dict, inputs, device: str, backward: bool, warmup: int, repeats: int) -> dict[str, list]:
    """Per-workload run times, interleaved round-robin so that load from other processes hits all of them alike.

    A workload that raises (e.g. flex backward on CPU) maps to the exception instead of a list of times.
    """
    qkv, vb, rb = inputs

    def step(fn):
        out = fn(*qkv, vb, rb)
        if backward:
            out.backward(torch.ones_like(out))
            for t in qkv:
                t.grad = None

    live: dict[str, object] = {}
    for name, fn in wl.items():
        try:
            for _ in range(warmup):
                step(fn)
            live[name] = []
        except Exception as err:
            live[name] = err
    _sync(device)
    for _ in range(repeats):
        for name, fn in wl.items():
            if isinstance(live[name], Exception):
                continue
            start = time.perf_counter()
            step(fn)
            _sync(device)
            live[name].append(time.perf_counter() - start)
    return live


def cuda_peak_memory(fn, inputs, backward: bool) -> int:
    qkv, vb, rb = inputs
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*qkv, vb, rb)
    if backward:
        out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that import-time peaks cannot hide the run's (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_baseline() -> int:
    """Baseline for a peak-RSS delta: the current RSS after a reset of the peak mark, else the peak so far."""
    return _current_rss_bytes() if _reset_peak_rss() else max(_current_rss_bytes(), _maxrss_bytes())


def cpu_peak_memory_subprocess(args, name: str) -> int | None:
    """Peak-RSS increase of one run of ``name`` in a fresh process (so earlier runs cannot hide its peak)."""
    cmd = [sys.executable, __file__, "--_measure", name, "--preset", args.preset, "--dtype", args.dtype]
    cmd += ["--device", "cpu", "--backends", *args.backends] + (["--backward"] if args.backward else [])
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return int(proc.stdout.strip().splitlines()[-1])


def _measure_child(args) -> None:
    shape = PRESETS[args.preset]
    inputs = make_inputs(shape, "cpu", DTYPES[args.dtype], requires_grad=args.backward)
    fn = workloads(shape, args.backends)[args._measure]
    before = _peak_baseline()
    qkv, vb, rb = inputs
    out = fn(*qkv, vb, rb)
    if args.backward:
        out.backward(torch.ones_like(out))
    print(max(0, _maxrss_bytes() - before))


def load_average() -> str:
    """1-minute load average before and after a run: other processes on the machine skew CPU timings."""
    try:
        import os

        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def versions() -> dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "diffusers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = "not installed"
    return info


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import os

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def run_benchmark(args) -> dict:
    shape = PRESETS[args.preset]
    dtype = DTYPES[args.dtype]
    load_before = load_average()
    inputs = make_inputs(shape, args.device, dtype, requires_grad=args.backward)
    which = "forward+backward" if args.backward else "forward"
    rows = []
    wl = workloads(shape, args.backends)
    timed = time_workloads(wl, inputs, args.device, args.backward, args.warmup, args.repeats)
    for name, fn in wl.items():
        times = timed[name]
        if isinstance(times, Exception):  # e.g. flex backward on CPU: record why, keep going
            rows.append({"workload": name, "error": f"{type(times).__name__}: {str(times).splitlines()[0]}"})
            continue
        if args.device == "cuda":
            mem = cuda_peak_memory(fn, inputs, args.backward)
        elif args.cpu_memory:
            mem = cpu_peak_memory_subprocess(args, name)
        else:
            mem = None
        flops = flops_of(name, shape, inputs[1], which)
        median = statistics.median(times)
        rows.append({
            "workload": name, "median_s": median, "min_s": min(times), "times_s": times, "flops": flops,
            "tflops_per_s": flops / median / 1e12, "peak_memory_bytes": mem,
            "flops_x_video_only": flops / flops_of("video_only_sdpa", shape, inputs[1], which),
        })  # fmt: skip
        print(f"{name:24s} {median * 1e3:10.2f} ms  {flops / median / 1e12:8.3f} TFLOP/s  ({_gib(mem)})", flush=True)
    by_name = {r["workload"]: r for r in rows if "median_s" in r}
    for r in rows:
        if "median_s" in r:
            r["x_video_only"] = r["median_s"] / by_name["video_only_sdpa"]["median_s"]
            r["x_dense_joint"] = r["median_s"] / by_name["dense_joint_sdpa"]["median_s"]
            r["x_floor"] = r["x_video_only"] / r["flops_x_video_only"]
    check_seconds = check_inputs_cost(shape, inputs) if args.device == "cpu" else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "device": device_name(args.device),
        "versions": versions(),
        "preset": args.preset,
        "shape": {"video": shape.video, "refs": list(shape.refs), "heads": shape.heads, "head_dim": shape.head_dim},
        "routed_video_tokens": [int((inputs[1] == s).sum()) for s in range(len(shape.refs))],
        "dtype": args.dtype,
        "triton_shared_forward": args.triton_shared_forward,
        "pass": which,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "load_average_1min": f"{load_before} -> {load_average()}",
        "check_inputs_seconds_per_layer": check_seconds,
        "rows": rows,
    }


def run_wan_cpu_forward(args) -> dict:
    """Torch backend forward at the Wan-1.3B self-attention shape on CPU: show that no Lq x Lk buffer is needed."""
    shape = PRESETS["wan1.3b"]
    load_before = load_average()
    (q, k, v), vb, rb = make_inputs(shape, "cpu", torch.float32)
    lv, refs = shape.video, list(shape.refs)
    before = _peak_baseline()
    start = time.perf_counter()
    with torch.no_grad():
        out = bucketed_attention(q[:, :lv], k, v, vb, refs, backend="torch")
    seconds = time.perf_counter() - start
    peak_increase = max(0, _maxrss_bytes() - before)
    lk = k.shape[1]
    score_bytes = lv * lk * shape.heads * 4
    res = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "device": device_name("cpu"),
        "versions": versions(),
        "shape": {"video": lv, "refs": refs, "heads": shape.heads, "head_dim": shape.head_dim, "dtype": "fp32"},
        "seconds": seconds,
        "load_average_1min": f"{load_before} -> {load_average()}",
        "peak_rss_increase_bytes": peak_increase,
        "peak_rss_bytes": _maxrss_bytes(),
        "output_bytes": out.numel() * out.element_size(),
        "score_matrix_bytes_lq_x_lk_fp32_all_heads": score_bytes,
        "bool_mask_bytes_lq_x_lk": lv * lk,
        "flops": flops_of("routed[torch]", shape, vb, "forward")
        - attention_flops(0, refs, heads=shape.heads, head_dim=shape.head_dim, routed_tokens=[0] * len(refs)),
    }
    print(json.dumps(res, indent=2))
    return res


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def markdown_benchmark(res: dict) -> str:
    s = res["shape"]
    v = res["versions"]
    lines = [
        f"### {res['preset']} · {res['dtype']} · {res['pass']} · {res['device']}",
        "",
        f"- {res['date']}; torch {v['torch']}, triton {v['triton']}, diffusers {v['diffusers']}, "
        f"Python {v['python']}",
        f"- Shape: Lv = {s['video']:,}, references {s['refs']}, H = {s['heads']}, D = {s['head_dim']}, B = 1; "
        f"video tokens routed per subject {res['routed_video_tokens']} (rest null)",
        f"- Median of {res['repeats']} runs after {res['warmup']} warm-up runs, workloads interleaved round-robin; "
        f"{res['threads']} torch threads; machine load average (1 min) {res['load_average_1min']}. "
        f"Command: `{res['command']}`",
        "",
        "| workload | median time | × video-only | × dense joint | FLOPs × video-only | × FLOPs floor "
        "| GFLOP (own pattern) | TFLOP/s | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['workload']} | error: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['workload']} | {r['median_s'] * 1e3:.1f} ms | {r['x_video_only']:.3f} | {r['x_dense_joint']:.3f} "
            f"| {r.get('flops_x_video_only', float('nan')):.3f} | {r.get('x_floor', float('nan')):.3f} "
            f"| {r['flops'] / 1e9:,.1f} | {r['tflops_per_s']:.3f} | {_gib(r['peak_memory_bytes'])} |"
        )
    if res.get("check_inputs_seconds_per_layer") is not None:
        lines += ["", f"Argument checks alone (both calls of one routed layer, median of 500): "
                  f"{res['check_inputs_seconds_per_layer'] * 1e6:.0f} µs."]  # fmt: skip
    return "\n".join(lines) + "\n"


def markdown_wan_cpu(res: dict) -> str:
    s = res["shape"]
    v = res["versions"]
    return "\n".join([
        f"### Wan-1.3B self-attention shape, torch backend forward on CPU · {res['device']}",
        "",
        f"- {res['date']}; torch {v['torch']}, triton {v['triton']}, diffusers {v['diffusers']}. "
        f"Command: `{res['command']}`",
        f"- Lv = {s['video']:,} video queries, keys = video + references {s['refs']}, H = {s['heads']}, "
        f"D = {s['head_dim']}, fp32, one layer, forward (no grad)",
        f"- Time: {res['seconds']:.1f} s ({res['flops'] / res['seconds'] / 1e12:.3f} TFLOP/s on the routed FLOPs; "
        f"machine load average {res['load_average_1min']})",
        f"- Peak RSS increase during the call: {_gib(res['peak_rss_increase_bytes'])} (process peak "
        f"{_gib(res['peak_rss_bytes'])}; output alone {_gib(res['output_bytes'])}). An Lq × Lk fp32 score matrix "
        f"over all heads would be {_gib(res['score_matrix_bytes_lq_x_lk_fp32_all_heads'])}, a boolean Lq × Lk mask "
        f"{_gib(res['bool_mask_bytes_lq_x_lk'])}.",
    ]) + "\n"  # fmt: skip


def append_markdown(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmarks\n\nAppended by `benchmarks/bench_attention.py` and `benchmarks/flops_table.py`.\n")
    with path.open("a") as f:
        f.write("\n" + text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu-small")
    p.add_argument("--backends", nargs="+", default=None, help="default: torch on CPU; triton flex torch on CUDA")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument(
        "--triton-shared-forward", choices=["auto", "triton"], default="auto",
        help="Triton backend forward: shared keys by cuDNN/FA2 SDPA + Triton segments (auto), or all in Triton",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's choice")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cpu-memory", action="store_true", help="CPU: peak RSS per workload in fresh subprocesses")
    p.add_argument("--wan-cpu-forward", action="store_true", help="torch backend forward at the Wan-1.3B shape, CPU")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown file to append to")
    p.add_argument("--no-md", action="store_true", help="do not append to the markdown file")
    p.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.backends = args.backends or (["triton", "flex", "torch"] if args.device == "cuda" else ["torch"])
    if args.threads:
        torch.set_num_threads(args.threads)
    if "triton" in args.backends and args.triton_shared_forward != "auto":
        from diasr_diffusers.ops.triton import _op

        _op.SHARED_FORWARD = args.triton_shared_forward
    if args._measure:
        _measure_child(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    torch.manual_seed(0)
    if args.wan_cpu_forward:
        res, text = run_wan_cpu_forward(args), None
        text = markdown_wan_cpu(res)
    else:
        res = run_benchmark(args)
        text = markdown_benchmark(res)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    if not args.no_md:
        append_markdown(args.md, text)


if __name__ == "__main__":
    main()
