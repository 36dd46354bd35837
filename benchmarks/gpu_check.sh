#!/usr/bin/env bash
# The one-command GPU check: on a machine with a CUDA GPU (no internet needed), builds the
# extension in place against the torch installed there, runs the GPU tests, runs
# compute-sanitizer (memcheck, racecheck) on a small forward + backward case, and runs the
# op benchmark.  Every step runs to the end even when an earlier one fails; a summary table
# is printed last and the exit status says whether every step passed.
#
#   bash benchmarks/gpu_check.sh            # results in ${OUT:-benchmarks/results}
#
# Environment: GPU_CHECK_BUDGET_S (default 420) caps the whole run; each step gets what is
# left of it (minus a reserve for the later steps), so the run ends inside a short GPU lease.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS" benchmarks/results
RESULTS="$(cd "$RESULTS" && pwd)"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
START=$(date +%s)
SUMMARY=()
FAILED=0

# run_step NAME MAX_SECONDS RESERVE_SECONDS COMMAND...: runs COMMAND under a timeout of
# min(MAX, time left - RESERVE), records its status and duration.
run_step() {
  local name="$1" max="$2" reserve="$3"
  shift 3
  local left=$((BUDGET - ($(date +%s) - START) - reserve))
  local limit=$((left < max ? left : max))
  if [ "$limit" -lt 10 ]; then
    SUMMARY+=("$(printf '%-22s %-8s %5s s' "$name" SKIPPED 0)")
    FAILED=1
    echo "=== $name: skipped (time budget spent)"
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=OK ;;
    124 | 137) status=TIMEOUT; FAILED=1 ;;
    *) status="FAIL($rc)"; FAILED=1 ;;
  esac
  SUMMARY+=("$(printf '%-22s %-8s %5s s' "$name" "$status" $(($(date +%s) - t0)))")
  echo "=== $name: $status"
}

echo "=== environment"
nvidia-smi || echo "nvidia-smi unavailable"
"$PY" - <<'EOF' || true
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
EOF
command -v nvcc >/dev/null && nvcc --version | tail -n 2

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null | tr -c 'A-Za-z0-9_.\n-' '-' | head -n 1)
GPU_NAME="${GPU_NAME:-gpu}"
STAMP="$GPU_NAME-$(date +%Y%m%d-%H%M)"
echo "=== results: $RESULTS/$STAMP.{json,md}, arch $ARCH"

build() {
  rm -f fused_poolformer/_C*.so
  FUSED_POOLFORMER_CUDA=1 FUSED_POOLFORMER_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 \
    "$PY" setup.py build_ext --inplace >"$RESULTS/build.log" 2>&1
  local rc=$?
  # The register / shared-memory / spill report of every kernel of ours.
  grep -A3 "Compiling entry function '_ZN16fused_poolformer" "$RESULTS/build.log" >"$RESULTS/ptxas.txt" || true
  grep -E "spill (stores|loads)" "$RESULTS/ptxas.txt" | grep -v " 0 bytes spill stores, 0 bytes spill loads" \
    && echo "WARNING: register spills above" || echo "ptxas: no spills in fused_poolformer kernels"
  tail -n 5 "$RESULTS/build.log"
  "$PY" -c "import fused_poolformer as f; print('backends: cpu=%s cuda=%s' % (f.ops.HAS_CPU_KERNELS, f.ops.HAS_CUDA_KERNELS)); assert f.ops.HAS_CUDA_KERNELS" || return 1
  return $rc
}
export RESULTS ARCH PY
export -f build
run_step build 220 200 bash -c build

tests() {
  local files=()
  for f in tests/test_cuda.py tests/test_triton.py tests/test_ops_cpu.py; do
    [ -f "$f" ] && files+=("$f")
  done
  # Not -x: one lease must show every failure, not the first one.
  "$PY" -m pytest -q -ra --maxfail=25 -m "not slow" "${files[@]}" \
    --junitxml="$RESULTS/pytest.xml" -p no:cacheprovider
}
export -f tests
run_step tests 130 160 bash -c tests

SANITIZE_PY="$(mktemp /tmp/fpm_sanitize_XXXX.py)"
cat >"$SANITIZE_PY" <<'EOF'
# Forward + backward of every dtype and layout on small shapes (several tiles each).
import torch
import fused_poolformer as fp
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for channels_last in (False, True):
        for shape, k in (((2, 6, 9, 7), 3), ((1, 70, 5, 4), 5), ((1, 2, 47, 45), 3)):
            x = torch.randn(shape, device="cuda", dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            w = torch.rand(shape[1], device="cuda", dtype=dtype, requires_grad=True)
            y = fp.pool_mixer(x, w, None, layer_scale=w.detach(), num_groups=2 if shape[1] % 2 == 0 else 1,
                              pool_size=k, backend="cuda")
            y.backward(torch.randn_like(y))
torch.cuda.synchronize()
print("sanitize case done")
EOF
if command -v compute-sanitizer >/dev/null 2>&1; then
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # so out-of-bounds accesses land outside allocations
  run_step memcheck 50 150 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 1 "$PY" "$SANITIZE_PY"
  run_step racecheck 50 120 compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" "$SANITIZE_PY"
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
  echo "=== compute-sanitizer not found: memcheck/racecheck skipped"
  SUMMARY+=("$(printf '%-22s %-8s %5s s' sanitizer ABSENT 0)")
fi

# Two benchmark runs, so that the slow torch.compile rows cannot cost the whole table:
# (1) the issue's shapes with eager, torch.compile and every fused backend; (2) every
# stage shape and both layouts without torch.compile.
if [ -f fused_poolformer/bench.py ]; then
  run_step bench-compile 150 60 "$PY" -m fused_poolformer.bench --device cuda --ops-only --no-progress \
    --stages 0,2 --layouts contiguous,channels_last --min-run-time 0.2 \
    --json "$RESULTS/$STAMP.json" --markdown "$RESULTS/$STAMP.md"
  run_step bench-all-shapes 90 0 "$PY" -m fused_poolformer.bench --device cuda --ops-only --no-progress \
    --no-compile --min-run-time 0.2 \
    --json "$RESULTS/$STAMP-nocompile.json" --markdown "$RESULTS/$STAMP-nocompile.md"
else
  run_step quick-benchmark 240 0 "$PY" benchmarks/gpu_quick_bench.py \
    --json "$RESULTS/$STAMP.json" --markdown "$RESULTS/$STAMP.md"
fi

if [ "$RESULTS" != "$ROOT/benchmarks/results" ]; then
  cp -f "$RESULTS/$STAMP"*.json "$RESULTS/$STAMP"*.md "$ROOT/benchmarks/results/" 2>/dev/null || true
fi

[ -f "$RESULTS/$STAMP.md" ] && cat "$RESULTS/$STAMP.md"
rm -f "$SANITIZE_PY"
echo
echo "=== summary ($(($(date +%s) - START)) s, log $LOG)"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
