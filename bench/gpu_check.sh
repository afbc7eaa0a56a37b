#!/usr/bin/env bash
# The one call to make on a lent GPU machine (repo copied, not installed; no network), in <= 9 minutes
# (at most about 8 with the default timeouts; the estimate is in docs/benchmarks.md):
#   1. python -m bench.run --quick --device cuda (with the routed-LoRA decode cases, T in 1, 16, 64,
#      against the base linear): the numbers no CPU can give, first;
#   2. the routed-LoRA Triton tests that matter most on a GPU (MoDE's layout in float32, bf16 and
#      fp16, the weight gradients in their own pass and summed by the dx GEMM, the TMA path, the
#      public API, offsets past 2^31), compiled for real (conftest sets
#      TRITON_INTERPRET=1 only without nvidia-smi). Compilation dominates (each kernel
#      specialisation, and each autotune config of a half-precision GEMM, compiles once): the whole
#      suite would not fit; TESTS / TESTS_K choose others;
#   3. the top-k KD Triton tests (tests/kernels/test_kd_topk.py -k triton): the selection kernel's sorts and
#      the grad kernel's scatter, barrier and read-back, which the interpreter runs one program at a time;
#   4. optional (COMPILE_TIMEOUT > 0): the Triton compile check for sm_90 (it needs no GPU, and CI
#      runs it under Triton 3.6 and 3.9).
# Each step has its own timeout; a failed or timed-out step is recorded and the later steps still run.
# Output is unbuffered and written as it comes (bench.run rewrites its results after every case,
# pytest -v prints one line per test), so a timeout leaves what was measured.
# Logs, results and summary.txt go to $OUT when set, else bench/results/gpu-check-<UTC date>.
# The bench results are also copied as <date>-<gpu>.json/.md, the names to commit under bench/results/.
#
# Packages the machine lacks travel as wheels: every bench/wheels/*.whl (or $WHEELS/*.whl) is installed
# with --no-index --no-deps into $DEST/site, put first on PYTHONPATH. Before the call, on this side:
#   pip download liger-kernel==0.8.5 --no-deps -d bench/wheels     # Liger's fused linear JSD baseline
#
# Knobs (environment), mostly to exercise the flow on a machine without a GPU:
#   BENCH_DEVICE=cpu      run the benchmark on CPU (scaled-down shapes) instead of cuda
#   BENCH_ARGS="--tiny"   extra arguments for bench.run
#   TESTS="tests/x.py"    what pytest runs (default: tests/kernels/test_routed_lora_triton.py)
#   TESTS_K="expr"        pytest -k expression (default: the subset above; TESTS_K="" runs all of TESTS)
#   COMPILE_ARCH="90"     archs for the compile check; COMPILE_ARGS its other arguments (default --default-only)
#   BENCH_TIMEOUT, TESTS_TIMEOUT, KD_TOPK_TIMEOUT, COMPILE_TIMEOUT   seconds per step (default 200, 180, 90,
#                         0 = skipped)
#   PYTHON                interpreter (default python3)
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
STAMP="$(date -u +%Y-%m-%d)"
DEST="${OUT:-$REPO/bench/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$DEST"
SUMMARY="$DEST/summary.txt"
BENCH_DEVICE="${BENCH_DEVICE:-cuda}"
FAILED=0

WHEEL_DIR="${WHEELS:-$REPO/bench/wheels}"
if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
    if "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$DEST/site" "$WHEEL_DIR"/*.whl \
            > "$DEST/wheels.log" 2>&1; then
        export PYTHONPATH="$DEST/site:$PYTHONPATH"
    else
        echo "installing wheels from $WHEEL_DIR failed (see wheels.log); going on without them"
    fi
fi

{
    echo "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" - <<'EOF' 2>&1
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for name in ("triton", "transformers", "liger_kernel.transformers.fused_linear_jsd"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "importable"))
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        print(name, "not importable:", type(exc).__name__, exc)
EOF
} > "$DEST/environment.txt" 2>&1
cat "$DEST/environment.txt"
echo "steps (name, exit status, seconds, log):" > "$SUMMARY"

# run_step NAME TIMEOUT_S COMMAND...: run with a timeout, log to $DEST/NAME.log, record the outcome.
run_step() {
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS rc
    echo "== $name (timeout ${limit}s): $*"
    timeout -k 10 "$limit" "$@" > "$DEST/$name.log" 2>&1
    rc=$?
    local outcome="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then outcome="TIMEOUT"; elif [ "$rc" -ne 0 ]; then outcome="FAILED"; fi
    [ "$rc" -ne 0 ] && FAILED=1
    printf '%-14s %-8s rc=%-4s %4ss  %s\n' "$name" "$outcome" "$rc" "$((SECONDS - start))" "$name.log" >> "$SUMMARY"
    tail -n 3 "$DEST/$name.log"
}

# shellcheck disable=SC2086  # TESTS, COMPILE_*, BENCH_ARGS are word lists on purpose
run_step bench "${BENCH_TIMEOUT:-200}" "$PYTHON" -m bench.run --quick --device "$BENCH_DEVICE" --output "$DEST/bench" ${BENCH_ARGS:-}
# shellcheck disable=SC2086
run_step tests "${TESTS_TIMEOUT:-180}" "$PYTHON" -m pytest -v -ra -p no:cacheprovider --durations=10 \
    ${TESTS:-tests/kernels/test_routed_lora_triton.py} -k "${TESTS_K-layout_4_1_r8 or (tma_path and not weight_grads_fused) or public_api or offsets}"
run_step kd_topk_tests "${KD_TOPK_TIMEOUT:-90}" "$PYTHON" -m pytest -v -ra -p no:cacheprovider --durations=5 \
    tests/kernels/test_kd_topk.py -k triton
if [ "${COMPILE_TIMEOUT:-0}" -gt 0 ]; then
    # shellcheck disable=SC2086
    run_step compile_check "$COMPILE_TIMEOUT" "$PYTHON" -m mode_kernels.tools.compile_check --arch ${COMPILE_ARCH:-90} ${COMPILE_ARGS---default-only}
fi

# Copy the bench results under the names to commit: bench/results/<date>-<gpu>.json / .md.
if [ -f "$DEST/bench/results.json" ]; then
    SLUG="$("$PYTHON" - "$DEST/bench/results.json" <<'EOF'
import json, re, sys
meta = json.load(open(sys.argv[1]))["meta"]
name = "cpu" if meta["device"] == "cpu" else meta["device_name"].lower().replace("nvidia", "")
print(re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown")
EOF
)"
    cp "$DEST/bench/results.json" "$DEST/$STAMP-$SLUG.json"
    cp "$DEST/bench/results.md" "$DEST/$STAMP-$SLUG.md"
    echo "results to commit: $STAMP-$SLUG.json, $STAMP-$SLUG.md" >> "$SUMMARY"
else
    echo "no bench results were written" >> "$SUMMARY"
fi

{
    echo
    echo "tests:";         grep -E '^(FAILED|ERROR)|passed|failed|error' "$DEST/tests.log" | tail -n 15
    echo "top-k KD tests:"; grep -E '^(FAILED|ERROR)|passed|failed|error' "$DEST/kd_topk_tests.log" | tail -n 5
    [ -f "$DEST/compile_check.log" ] && { echo "compile check:"; tail -n 5 "$DEST/compile_check.log"; }
    echo "bench rows not ok:"
    grep -E '\*\*(OOM|error|skipped)\*\*' "$DEST/bench/results.md" 2>/dev/null | cut -c1-240 || true
} >> "$SUMMARY" 2>&1
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
exit "$FAILED"
