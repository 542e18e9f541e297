"""benchmarks/bench_step.py: the step table's rows, routed shares and FLOPs ratios come from the step it ran."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from diasr_diffusers.ops import WanConfig, wan_step_flops

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_one_row_per_workload(bench, tmp_path, capsys):
    md = tmp_path / "bench.md"
    args = ["--subjects", "2", "--frames", "1", "--height", "8", "--width", "8", "--heads", "2", "--head-dim", "16",
            "--layers", "1", "--ffn-dim", "32", "--text-dim", "16", "--text-tokens", "4", "--router-dim", "8",
            "--warmup", "0", "--repeats", "1", "--md", str(md)]  # fmt: skip
    assert bench.main(args) == 0
    table = md.read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines() if line.startswith("| ")}
    assert {"T2V", "dense (Phantom)", "routed (masks)", "routed (similarity)", "routed (router)"} <= set(rows)
    # masks mode routes equal shares of the 16 video tokens to the 2 subjects and null: 16 // 3 or 16 // 3 + 1 each
    shares = eval(rows["routed (masks)"][7])  # noqa: S307 (our own table)
    assert len(shares) == 2 and all(s in (5, 6) for s in shares)
    cfg = WanConfig(dim=32, heads=2, layers=1, ffn_dim=32)
    common = dict(video_tokens=16, reference_tokens=16, text_tokens=4)
    want = (
        wan_step_flops(cfg, 2, **common, pattern="dense_joint")["total"]
        / wan_step_flops(cfg, 0, **common, pattern="video_only")["total"]
    )
    assert float(rows["dense (Phantom)"][4]) == pytest.approx(want, abs=1e-3)
    assert "Router's own share" in table and "Command: `PYTHONPATH=src python benchmarks/bench_step.py" in table
