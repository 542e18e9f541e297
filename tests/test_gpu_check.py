"""benchmarks/gpu_check.sh: fails fast and loudly without CUDA; its CPU dry run produces the full table."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _run(*args, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    start = time.time()
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)
    return proc, time.time() - start


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_fails_fast_with_a_clear_message():
    proc, seconds = _run(env_extra={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert seconds < 60
    assert "| part |" not in proc.stdout  # no table pretending to be a result


def test_rejects_unknown_arguments():
    proc, _ = _run("--fast", timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.slow
def test_dry_run_prints_one_table_with_every_part():
    proc, _ = _run("--dry-run", timeout=600)
    out = proc.stdout
    assert "DRY RUN on CPU" in out and "| part | item | result | detail |" in out, out + proc.stderr
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| part")]
    parts = {line.split("|")[1].strip() for line in rows}
    assert {"env", "tests", "op", "syncs", "step", "xformers"} <= parts, out
    assert not any("| FAIL" in line or "| ERROR" in line for line in rows), out
    op_rows = [line for line in rows if line.startswith("| op ")]
    assert any("forward+backward" in line for line in op_rows) and all("TFLOP/s" in line for line in op_rows), out
    step_rows = [line for line in rows if line.startswith("| step ")]
    assert {"T2V", "dense (Phantom)", "routed (DiasR)"} <= {r.split("|")[2].split(": ")[-1].strip() for r in step_rows}
    assert proc.returncode == 0, out + proc.stderr


def test_a_spent_time_budget_skips_parts_instead_of_running_over():
    proc, seconds = _run("--dry-run", env_extra={"GPU_CHECK_TOTAL_S": "1"}, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # incomplete, not OK
    assert seconds < 30
    assert proc.stdout.count("| SKIPPED |") >= 5, proc.stdout
