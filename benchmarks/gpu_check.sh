#!/usr/bin/env bash
# One GPU check, one table, at most 8 minutes on one H100. Run from anywhere:
#
#     bash benchmarks/gpu_check.sh            # needs CUDA; fails within seconds without it
#     bash benchmarks/gpu_check.sh --dry-run  # CPU, tiny shapes: tests the plumbing (numbers mean nothing)
#
# Parts (each under a hard `timeout`, each Python part also stops starting new measurements when its budget is
# spent, so a slow part shows up as SKIPPED rows instead of a hang):
#   1. the @pytest.mark.gpu tests;
#   2. the Triton op forward / forward+backward TFLOP/s against FlashAttention-2 (SDPA) on the same tokens:
#      Wan-1.3B and Wan-14B self-attention layouts, 480p and 720p, 1-4 subjects, bf16;
#   3. the op's trusted path (check_inputs=False) under torch.cuda.set_sync_debug_mode("error");
#   4. one transformer forward of a random-weight Wan-1.3B (the real config, no download): T2V vs dense (Phantom)
#      vs routed (DiasR), against the FLOPs model, and the routed forward under set_sync_debug_mode("error");
#   5. the xFormers row (see the marked block below).
# Exit status: 0 when every row is OK/measured, 1 when a row failed, 2 without CUDA, 3 when rows were SKIPPED for
# lack of time (incomplete).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
DRY=""
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY="--dry-run"
elif [[ $# -gt 0 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2
    exit 2
fi

START=$(date +%s)
TOTAL_S=${GPU_CHECK_TOTAL_S:-460}  # every part is cut to what is left of this (8 minutes minus a margin)
DEADLINE=$((START + TOTAL_S))
ROWS="$(mktemp)"
trap 'rm -f "$ROWS"' EXIT

# Fail fast (seconds, not a hang) without a usable CUDA device.
if [[ -z "$DRY" ]]; then
    if ! timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: no CUDA device visible to torch (torch.cuda.is_available() is False, or the probe" \
             "timed out). Run on a GPU machine, or use --dry-run to test the script on CPU." >&2
        exit 2
    fi
fi

left() { echo $((DEADLINE - $(date +%s))); }

# run_part NAME TIMEOUT_S CMD...: keeps the ROW lines of CMD's output; a timeout or crash becomes a FAIL row. The
# timeout is cut to the time left before the deadline; with under 10 s left the part is SKIPPED.
run_part() {
    local name="$1" limit="$2"
    shift 2
    local out status
    if (( $(left) < limit )); then limit=$(left); fi
    if (( limit < 10 )); then
        printf 'ROW\t%s\t%s\tSKIPPED\t%s\n' "$name" "whole part" "the ${TOTAL_S} s budget of the check is spent" >>"$ROWS"
        return
    fi
    out="$(timeout --kill-after=10 "$limit" "$@" 2>/tmp/gpu_check_$$.err)"
    status=$?
    grep -a '^ROW' <<<"$out" >>"$ROWS"
    if [[ $status -ne 0 ]]; then
        local why="exit status $status"
        [[ $status -eq 124 || $status -eq 137 ]] && why="killed after ${limit} s"
        printf 'ROW\t%s\t%s\tFAIL\t%s\n' "$name" "part did not finish" \
            "$why; $(tail -c 300 /tmp/gpu_check_$$.err | tr '\n\t' '  ')" >>"$ROWS"
    fi
    rm -f /tmp/gpu_check_$$.err
}

run_part env 60 "$PY" benchmarks/gpu_check.py env $DRY

# 1. GPU-marked tests (the dry run only checks that the marker selects them).
# The tests check correctness: DIASR_TRITON_AUTOTUNE=0 compiles one tile configuration per kernel instead of timing
# five, and a test that hangs fails alone (--timeout) instead of eating the part.
LIMIT=150
(( $(left) < LIMIT )) && LIMIT=$(left)
if (( LIMIT < 10 )); then
    printf 'ROW\ttests\t%s\tSKIPPED\t%s\n' "pytest -m gpu" "the ${TOTAL_S} s budget of the check is spent" >>"$ROWS"
else
    if [[ -z "$DRY" ]]; then
        TESTS_OUT="$(DIASR_TRITON_AUTOTUNE=0 timeout --kill-after=10 "$LIMIT" "$PY" -m pytest tests -q -m gpu \
            -p no:cacheprovider --timeout=90 2>&1)"
        status=$?
    else
        TESTS_OUT="$(timeout "$LIMIT" "$PY" -m pytest tests/test_triton_backend.py tests/test_flex_backend.py -q \
            -m gpu --collect-only -p no:cacheprovider 2>&1)"
        status=$?
    fi
    SUMMARY="$(grep -aE '[0-9]+ (passed|failed|error|skipped|selected|tests? collected)|no tests ran' <<<"$TESTS_OUT" | tail -1)"
    if [[ $status -eq 0 ]]; then RESULT="OK"; else RESULT="FAIL (exit $status)"; fi
    [[ $status -eq 124 || $status -eq 137 ]] && RESULT="FAIL (killed after ${LIMIT} s)"
    FAILED="$(grep -aE '^(FAILED|ERROR) ' <<<"$TESTS_OUT" | head -5 | tr '\n\t' '  ')"
    printf 'ROW\ttests\t%s\t%s\t%s\n' "pytest -m gpu" "$RESULT" "${SUMMARY:-no summary} ${FAILED}" >>"$ROWS"
fi

# 2.-4. The op, the syncs, the transformer step.
# Each Python part stops starting new shapes when its budget is spent; the hard timeout leaves room for the last one.
if [[ -z "$DRY" ]]; then OP_BUDGET=160; SYNC_BUDGET=40; STEP_BUDGET=60; else OP_BUDGET=60; SYNC_BUDGET=30; STEP_BUDGET=60; fi
budget() { local b=$1 l; l=$(( $(left) - $2 )); (( l < b )) && b=$l; (( b < 1 )) && b=1; echo "$b"; }
B=$(budget $OP_BUDGET 40); run_part op $((B + 40)) "$PY" benchmarks/gpu_check.py op --budget "$B" $DRY
B=$(budget $SYNC_BUDGET 30); run_part syncs $((B + 30)) "$PY" benchmarks/gpu_check.py syncs --budget "$B" $DRY
B=$(budget $STEP_BUDGET 40); run_part step $((B + 40)) "$PY" benchmarks/gpu_check.py step --budget "$B" $DRY

# ---------------------------------------------------------------------------------------------------------------
# xFormers rows: exactness of backend="xformers" against fp64 per (case, dtype), and no host sync in its forward.
# "NOT RUN" (not a failure) where xFormers is not installed.
run_part xformers 90 "$PY" benchmarks/gpu_xformers_check.py $DRY
# ---------------------------------------------------------------------------------------------------------------

ELAPSED=$(( $(date +%s) - START ))
echo
echo "## GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), ${ELAPSED} s${DRY:+, DRY RUN on CPU: numbers mean nothing})"
echo
echo "| part | item | result | detail |"
echo "|---|---|---|---|"
awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $2, $3, $4, $5 }' "$ROWS"
if grep -aqP '\t(FAIL|ERROR)' "$ROWS"; then
    exit 1
fi
if grep -aqP '\tSKIPPED\t' "$ROWS"; then
    echo "(SKIPPED rows: the time budget ran out; the check is incomplete.)"
    exit 3
fi
exit 0
