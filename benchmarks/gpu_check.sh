#!/usr/bin/env bash
# The one-command GPU check, for a machine with an NVIDIA GPU and no internet.  Steps:
#   env       the machine, driver, torch, Triton, nvcc
#   build     the extension in place against the torch installed there (sm_90 only on an sm_90 GPU)
#   warm      in the background while tests and sanitizer run: torch.compile of every baseline
#             the benchmarks time, so their compile caches are warm (waited for before timing)
#   tests     the GPU tests (`pytest -m "gpu and not slow"`: the CUDA backend's, then Triton's)
#   memcheck, racecheck   compute-sanitizer on small forward + backward cases (benchmarks/gpu_sanitize.py)
#   ops       host-overhead table and op benchmark (eager loop, CUDA-graph replay, profiler kernels)
#   models    timm poolformer_s12, batch 64, bf16 autocast, NCHW and channels_last, training step and
#             inference: original, original + torch.compile, converted, converted + torch.compile
#   notes     GPU_NOTES.md: byte floor, predicted and measured times per stage shape
# Every step has its own time limit (and the run a budget); a failed or timed-out step is logged
# and the run goes on.  Results go to benchmarks/results/<device>-<date>-<time>-* (and to $OUT).
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine: under 7 minutes on an H100/H200
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: every step that needs no GPU, on the CPU
#
# Options: --dry-run; --out DIR (default: $OUT, else benchmarks/results; a dry run: a new temp dir);
# --budget S (whole run, default 380: with the 10 s grace of each step's kill, under 7 minutes);
# --skip STEPS (comma list of the step names above); -h.
set -u
START=$(date +%s)
usage() { sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY=0 BUDGET=380 SKIP="" OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="${2:?--out needs a directory}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --skip) SKIP="${2:?--skip needs a comma list of steps}"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in '' | *[!0-9]*) echo "gpu_check.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  RESULTS="${OUT_DIR:-$(mktemp -d /tmp/gpu_check_dry_XXXX)}"
  GPU_NAME=cpu-dry-run
  ARCH=9.0
  export CUDA_VISIBLE_DEVICES=""  # the dry run must not touch a GPU, even where there is one
else
  RESULTS="${OUT_DIR:-benchmarks/results}"
  GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null | tr -c 'A-Za-z0-9_.\n-' '-' | head -n 1)
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
fi
GPU_NAME="${GPU_NAME:-no-gpu}"
mkdir -p "$RESULTS" && RESULTS="$(cd "$RESULTS" && pwd)"
STAMP="$GPU_NAME-$(date +%Y-%m-%d-%H%M)"
LOG="$RESULTS/$STAMP-gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
SUMMARY=()
FAILED=0

skipped() { case ",$SKIP," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

record() {  # record NAME STATUS SECONDS
  SUMMARY+=("$(printf '%-10s %-10s %5s s' "$1" "$2" "$3")")
  case "$2" in OK | SKIPPED | PARTIAL) ;; *) FAILED=1 ;; esac
}

# run_step NAME MAX_SECONDS RESERVE_SECONDS COMMAND...: COMMAND under a limit of
# min(MAX, budget left - RESERVE); its status and duration go to the summary.
run_step() {
  local name="$1" max="$2" reserve="$3" t0 rc status limit
  shift 3
  if skipped "$name"; then record "$name" SKIPPED 0; echo "=== $name: skipped (--skip)"; return; fi
  limit=$((BUDGET - ($(date +%s) - START) - reserve))
  [ "$limit" -gt "$max" ] && limit=$max
  if [ "$limit" -lt 10 ]; then
    record "$name" NO-TIME 0
    echo "=== $name: not run (the time budget is spent)"
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  STEP_LIMIT=$limit timeout --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=OK ;;
    124 | 137) status=TIMEOUT ;;
    *) status="FAIL($rc)" ;;
  esac
  record "$name" "$status" $(($(date +%s) - t0))
  echo "=== $name: $status"
}

env_report() {
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import platform, torch
gpu = torch.cuda.is_available()
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if gpu else None,
      "| capability", torch.cuda.get_device_capability() if gpu else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not available:", exc)
import fused_poolformer as f
print("fused_poolformer as found now (before the build): cpu=%s cuda=%s" % (f.HAS_CPU_KERNELS, f.HAS_CUDA_KERNELS))
EOF
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not on PATH"; fi
  command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)" \
    || echo "compute-sanitizer: not on PATH"
  echo "results: $RESULTS/$STAMP-*  |  build arch: $ARCH  |  budget: ${BUDGET}s"
}

build() {
  # sm_90 only on an sm_90 GPU (one arch compiles fastest); another GPU gets its own arch.
  local cmd=(env FUSED_POOLFORMER_CUDA=1 FUSED_POOLFORMER_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16
             "$PY" setup.py build_ext --inplace)
  if [ "$DRY" = 1 ]; then
    echo "dry run: would run: rm -f fused_poolformer/_C*.so; ${cmd[*]}"
    [ -f setup.py ]
    return
  fi
  rm -f fused_poolformer/_C*.so
  "${cmd[@]}" >"$RESULTS/$STAMP-build.log" 2>&1
  local rc=$?
  # The register / shared-memory / spill report of every kernel of ours.
  grep -A3 "Compiling entry function '_ZN16fused_poolformer" "$RESULTS/$STAMP-build.log" >"$RESULTS/$STAMP-ptxas.txt"
  grep -E "spill (stores|loads)" "$RESULTS/$STAMP-ptxas.txt" | grep -v " 0 bytes spill stores, 0 bytes spill loads" \
    && echo "WARNING: register spills above" || echo "ptxas: no spills in fused_poolformer kernels"
  tail -n 5 "$RESULTS/$STAMP-build.log"
  "$PY" -c "import fused_poolformer as f; print('backends: cpu=%s cuda=%s' % (f.HAS_CPU_KERNELS, f.HAS_CUDA_KERNELS)); assert f.HAS_CUDA_KERNELS" || return 1
  return $rc
}

gpu_tests() {
  # The tests marked gpu: the CUDA kernels' first (what backend="auto" runs), then the rest
  # (Triton); if the step's limit cuts the second run, the first one's results are in the log.
  # Not -x: one run must show every failure, not the first.
  local args=(-q -ra -p no:cacheprovider --maxfail=25 -m "gpu and not slow")
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest "${args[@]}" --collect-only | tail -n 1
    return
  fi
  "$PY" -m pytest "${args[@]}" -k "not triton" --junitxml="$RESULTS/$STAMP-pytest-cuda.xml"
  local rc=$?
  "$PY" -m pytest "${args[@]}" -k "triton" --junitxml="$RESULTS/$STAMP-pytest-triton.xml" || rc=$?
  return $rc
}

sanitize() {  # sanitize TOOL
  set -o pipefail
  if [ "$DRY" = 1 ]; then  # the script's arguments; memcheck's turn also runs its cases on the CPU
    "$PY" benchmarks/gpu_sanitize.py --help | head -n 3 || return 1
    if [ "$1" = memcheck ]; then "$PY" benchmarks/gpu_sanitize.py --device cpu | tail -n 2; fi
    return
  fi
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer: not on PATH"; return 3; }
  # No caching allocator, so an out-of-bounds access lands outside every allocation.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --error-exitcode 1 \
    $([ "$1" = memcheck ] && echo --leak-check no) "$PY" benchmarks/gpu_sanitize.py --backends cuda
}

# The benchmark arguments: the real ones, or tiny CPU ones that exercise the same code.
if [ "$DRY" = 1 ]; then
  COMMON=(--device cpu --threads 1 --no-progress)
  OPS=(--stages none --shape 2,8,6,6 --dtypes fp32 --layouts contiguous,channels_last --min-run-time 0.01
       --compile-backend aot_eager)
  # Models: one layout (tracing a model for torch.compile takes a while on a small CPU); the
  # warm step: the op baselines only (the models step compiles its own here).
  MODELS=(--models s12 --latency-models s12 --compile-models s12 --model-batch 2 --model-image-size 32
          --model-reps 1 --model-dtype fp32 --model-layouts channels_last --compile-backend eager)
  WARM=(--parts ops "${OPS[@]}")
else
  COMMON=(--device cuda --no-progress)
  OPS=(--min-run-time 0.05)
  MODELS=(--models s12 --latency-models s12 --compile-models s12 --model-batch 64 --model-dtype bf16
          --model-layouts contiguous,channels_last --model-reps 10)
  WARM=(--parts ops,models "${OPS[@]}" "${MODELS[@]}")
fi
bench() {  # bench NAME ARGS...: the harness, its time budget inside the step's limit
  local name="$1"
  shift
  "$PY" -m fused_poolformer.bench "$@" --time-budget $((STEP_LIMIT * 3 / 4)) \
    --json "$RESULTS/$STAMP-$name.json" --markdown "$RESULTS/$STAMP-$name.md"
}

notes() {
  # The recorded kernel versions, then this run; hand-written parts of the notes are kept.
  local runs=() f
  for f in benchmarks/results/NVIDIA-H200-2026-11-26-ops-nocompile.json \
           benchmarks/results/NVIDIA-H200-2026-11-26-ops-compile.json; do
    [ -f "$f" ] && runs+=(--notes-run "2026-11-26 kernels=$f")
  done
  [ -f "$RESULTS/$STAMP-ops.json" ] && runs+=(--notes-run "this run ($STAMP)=$RESULTS/$STAMP-ops.json")
  [ -f benchmarks/results/GPU_NOTES.md ] && [ "$RESULTS" != "$ROOT/benchmarks/results" ] \
    && cp benchmarks/results/GPU_NOTES.md "$RESULTS/GPU_NOTES.md"
  "$PY" -m fused_poolformer.bench --gpu-notes "$RESULTS/GPU_NOTES.md" "${runs[@]}"
}

export -f build gpu_tests sanitize bench notes env_report
export DRY RESULTS STAMP ARCH PY BUDGET

# Limits: each step gets min(its maximum, budget left - what the later steps need at least).
run_step env 30 330 bash -c env_report
run_step build 150 250 bash -c build

# The compile warm-up runs beside the tests and the sanitizer (which time nothing); it stops
# early enough to leave the timing steps 180 s (what it did not compile, they compile).
WARM_PID=""
if ! skipped warm && ! { skipped ops && skipped models; }; then
  WARM_LIMIT=$((BUDGET - ($(date +%s) - START) - 180))
  if [ "$WARM_LIMIT" -ge 30 ]; then
    echo "=== warm (background, limit ${WARM_LIMIT}s, log $STAMP-warm.log)"
    timeout --kill-after=10 "$WARM_LIMIT" "$PY" -m fused_poolformer.bench "${COMMON[@]}" --warm-compile \
      "${WARM[@]}" >"$RESULTS/$STAMP-warm.log" 2>&1 &
    WARM_PID=$!
    WARM_T0=$(date +%s)
  fi
fi

run_step tests 75 210 bash -c gpu_tests
run_step memcheck 45 190 bash -c "sanitize memcheck"
run_step racecheck 30 180 bash -c "sanitize racecheck"

if [ -n "$WARM_PID" ]; then  # bounded by its own timeout; nothing is timed while it compiles
  t0=$(date +%s)
  wait "$WARM_PID"
  rc=$?
  tail -n 1 "$RESULTS/$STAMP-warm.log"
  # Timed out: the timing steps compile what is left.  The time shown is the wait for it.
  case $rc in 0) status=OK ;; 124 | 137) status=PARTIAL ;; *) status="FAIL($rc)" ;; esac
  record warm "$status" $(($(date +%s) - t0))
  echo "=== warm: $status after $(($(date +%s) - WARM_T0)) s in the background"
fi

run_step ops 130 90 bash -c 'bench "$@"' bench ops --parts host,ops "${COMMON[@]}" "${OPS[@]}"
run_step models 120 10 bash -c 'bench "$@"' bench models --parts models "${COMMON[@]}" "${MODELS[@]}"
run_step notes 30 0 bash -c notes

if [ "$DRY" = 0 ] && [ "$RESULTS" != "$ROOT/benchmarks/results" ]; then
  mkdir -p "$ROOT/benchmarks/results"
  cp -f "$RESULTS/$STAMP"* "$RESULTS/GPU_NOTES.md" "$ROOT/benchmarks/results/" 2>/dev/null
fi

echo
echo "=== summary ($(($(date +%s) - START)) s; log $LOG)"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
