"""GPU check of ``bucketed_attention(..., backend="xformers")``: exactness against the dense reference, the backend's
self-check, "auto"'s choice, and that a call reads nothing back to the host. Prints one markdown table row per
(dtype, case) for ``benchmarks/gpu_check.sh``'s table (meant to be called from there; it needs CUDA and xFormers).

Error rule (FlashAttention's): the backend's max error against an fp64 reference is at most twice that of the plain
``"dense"`` backend run in the same low precision, plus a few ulps of the reference's magnitude. Speed is
``bench_attention.py``'s job::

    PYTHONPATH=src python benchmarks/gpu_xformers_check.py
    PYTHONPATH=src python benchmarks/bench_attention.py --device cuda --preset wan1.3b --backward \
        --backends triton xformers torch

Exit status 1 when a row fails, 2 when there is no CUDA device or xFormers cannot run at all.
"""

from __future__ import annotations

import argparse
import sys

import torch

from diasr_diffusers.ops import _xformers_backend as xb
from diasr_diffusers.ops import bucketed_attention, select_backend

# (name, B, Lv, shared keys, segment lengths, heads, head dim)
CASES = [
    ("ragged", 2, 1000, 1000, [130, 0, 257, 64], 4, 64),
    ("no-shared", 1, 700, 0, [96, 160], 2, 128),
    ("many-subjects", 1, 1200, 1200, [40] * 12, 2, 128),
    ("wide-head", 1, 300, 300, [64, 64], 2, 256),
]


def _run(backend, q, k, v, buckets, lengths, bias, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = bucketed_attention(*leaves[:3], buckets, lengths, segment_bias=leaves[3], backend=backend)
    (out * grad.to(out.dtype)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def check_case(case, dtype) -> tuple[bool, str]:
    name, b, lq, shared, lengths, h, d = case
    g = torch.Generator(device="cuda").manual_seed(0)
    lk = shared + sum(lengths)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", generator=g) for n in (lq, lk, lk))
    buckets = torch.randint(-1, len(lengths), (b, lq), device="cuda", generator=g)
    bias = torch.randn(b, lq, device="cuda", generator=g)
    grad = torch.randn(b, lq, h, d, device="cuda", generator=g)
    ref = _run("dense", *(t.double() for t in (q, k, v)), buckets, lengths, bias.double(), grad.double())
    low = [q.to(dtype), k.to(dtype), v.to(dtype)]
    plain = _run("dense", *low, buckets, lengths, bias, grad)
    try:
        got = _run("xformers", *low, buckets, lengths, bias, grad)
    except Exception as err:  # an unsupported head dim/dtype on this GPU: a row, not a crash
        return False, f"| xformers | {name} | {dtype} | error: {type(err).__name__}: {str(err).splitlines()[0][:120]} |"
    worst, failed = 0.0, []
    for what, a, p, r in zip(["out", "dq", "dk", "dv", "dbias"], got, plain, ref):
        err = (a.double() - r).abs().max().item()
        base = (p.double() - r).abs().max().item()
        if not err <= 2 * base + 4 * torch.finfo(dtype).eps * max(1.0, r.abs().max().item()):
            failed.append(what)
        worst = max(worst, err / (base + 1e-12))
    verdict = "ok" if not failed else f"FAIL ({', '.join(failed)})"
    return not failed, f"| xformers | {name} | {dtype} | {verdict} (worst err / plain-{dtype} err: {worst:.2f}) |"


def check_no_sync() -> str:
    q = torch.randn(1, 512, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 512 + 96, 4, 128, device="cuda", dtype=torch.bfloat16)
    buckets = torch.randint(-1, 3, (1, 512), device="cuda")
    xb.xformers_bucketed_attention(q, k, k, buckets, [32, 0, 64], scale=0.1)  # warm: caches the small tables
    torch.cuda.set_sync_debug_mode("error")
    try:
        xb.xformers_bucketed_attention(q, k, k, buckets, [32, 0, 64], scale=0.1)
        return "no host sync in the backend's forward (torch.cuda sync debug mode 'error')"
    except RuntimeError as err:
        return f"HOST SYNC: {str(err).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    p.add_argument("--dry-run", action="store_true", help="gpu_check.sh's CPU dry run: report the row as not run")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        # gpu_check.sh collects lines starting with ROW (tab-separated: part, item, result, detail).
        result = "NOT RUN" if args.dry_run else "FAIL"
        print(f"ROW\txformers\txFormers backend\t{result}\tno CUDA device")
        return 0 if args.dry_run else 2
    probe = torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    reason = xb.unsupported_reason(probe, needs_grad=True)
    import xformers

    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; xformers {xformers.__version__}")
    print(f"self-check (bf16, head dim 64, forward+backward): {reason or 'passed'}")
    print(f"auto picks: {select_backend(probe)!r}")
    if reason is not None and "not installed" in reason:
        print(f"ROW\txformers\txFormers backend\tNOT RUN\t{reason}")
        return 0
    print("\n| backend | case | dtype | result |\n|---|---|---|---|")
    ok = True
    for dtype in args.dtypes:
        for case in CASES:
            row_ok, row = check_case(case, getattr(torch, dtype))
            ok &= row_ok
            print(row, flush=True)
            print(f"ROW\txformers\t{case[0]} {dtype} vs fp64\t{'OK' if row_ok else 'FAIL'}\t{row.strip('| ')}")
    sync = check_no_sync()
    ok &= not sync.startswith("HOST SYNC")
    print("\n" + sync)
    print(f"ROW\txformers\tno host sync (forward)\t{'FAIL' if sync.startswith('HOST SYNC') else 'OK'}\t{sync}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
