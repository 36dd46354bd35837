#!/usr/bin/env bash
# The GPU check: one call on an H100/H200 (torch, Triton and nvcc of that machine; nothing
# built here loads there) that gives the whole verdict in under 7 minutes, build included;
# --core, the decisive part alone, in under 4.  Its first minutes answer the questions that
# matter; every later minute only adds.  How to read the results: benchmarks/results/GPU_NOTES.md.
#
# Steps, in order (start: expected second on an H100; limit: the step's own, in seconds --
# the run's budget also cuts a step that would end past it).  [bg] = in the background,
# niced, beside steps that time nothing or while the CPU is otherwise idle; a background
# job is reaped by the step that needs it.
#   step            start  limit  yields
#   env                 0     20  GPU, driver, torch, Triton, CUDA, nvcc, timm, fvcore versions
#   [bg] warm-ops       5    300  inductor caches of the ops-core compile cases, in ops-core's order
#   [bg] warm-triton    5    150  Triton cache: the pinned kernels of the stage shapes (no autotuning; full run)
#   [bg] warm-models    5    240  inductor caches of S12 original+compile, inference + training, per layout
#   build               5    150  the extension, sm_90 only (expected ~90 s, see below); ptxas regs/spills
#   [bg] worker-<L>    95      -  per model layout, once built: S12 original / mixer / block, eager and
#                                 compiled, built and warmed (compiled), then waiting for its models step
#   [bg] memcheck      95     45  compute-sanitizer memcheck on small cases (beside the smoke runs)
#   [bg] racecheck     95     45  compute-sanitizer racecheck, the same cases
#   smoke-cuda         95     40  CUDA_LAUNCH_BLOCKING=1, 4 S12 stages (batch 64) x fp32/bf16 x NCHW/CL x
#                                 fwd/bwd against float64: 32 lines (PASS/FAIL + max errors, or ERROR)
#   smoke-triton      115     45  the same 32 cases for Triton, pinned kernels (full run)
#   sanitizer     115/140      -  memcheck, racecheck reaped: OK / FAIL / UNSUPPORTED (the sandbox refused it)
#   ops-core      115/140     80  eager, fused-cuda, compile: 4 stages x fp32/bf16 x NCHW/CL x fwd, fwd+bwd
#                                 (96 rows: eager loop, CUDA-graph replay, profiler kernels) + host table
#                                 (F.group_norm, fused-cuda, the unfused graph);
#                                 a mismatch or an exception is a row that says so, the run goes on
#   ops-block           -      -  slot: block-operator rows (BLOCK_OP_ARGS, empty until they exist)
#   ops-triton        220     50  fused-triton, the same 32 cases, pinned configs, speed-ups vs ops-core's (full run)
#   models-core   195/270     30  worker-contiguous times: S12 batch 64 bf16 autocast, training step +
#                                 inference, original / mixer / block, eager and compiled, NCHW
#   models-cl         300     30  worker-channels_last: the same rows in channels_last (full run)
#   notes         225/330     15  GPU_NOTES.md regenerated at this run's copy bandwidth
#   tests             345     70  GPU tests in value order (pytest -v, 20 s per test, SIGINT at the limit:
#                                 summary + junit XML) (full run)
#   archive           415      5  the results folder as one .tar.gz (rewritten after every step)
# (a/b: a with --core, which leaves out the steps marked "full run", b in the full run.)
# Expected ends: --core ~235 s (budget 235), full ~415 s (budget 415), both build included.
# The build, measured without a GPU (2026-12-07, this repository's kernels, 2 shared CPU cores,
# `TORCH_CUDA_ARCH_LIST=9.0 FUSED_POOLFORMER_CUDA=1 python setup.py build_ext` into a scratch
# build dir): 378 s of CPU (362 user + 16 sys), 9 min 43 s wall at 64 % of the CPU beside other
# jobs -- the upper bound.  On the GPU machine's 16 cores the longest unit bounds it: csrc/cpu/
# backward.cpp alone took 73 s of CPU here (70 user + 2 sys, compiled by itself), so ~90 s with
# the rest in parallel and the link; the build runs un-niced, the background jobs niced.
#
# Every result is written as it is measured (rows, lines, logs), so a cut run keeps what it
# had.  Results: <out>/<device>-<date>-<time>/ (default out: benchmarks/results; a dry run: a
# new temp dir); the archive: ${OUT:-<out>}/<device>-<date>-<time>.tar.gz.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine: under 7 minutes
#   bash benchmarks/gpu_check.sh --core       # the decisive core alone: under 4 minutes
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: every step in order on the CPU (tiny shapes,
#                                             # the CPU kernels for the CUDA ones), GPU-only ones skipped
#
# Options: --dry-run; --core; --out DIR; --budget S (whole run; default 415, --core 235; a dry
# run twice that); --skip STEPS (comma list of step names above); --limit STEP=S (a step's
# limit, repeatable); -h.  GPU_CHECK_INJECT (tests/test_gpu_check.py only): comma list of
# "mismatch" (ops-core's fused rows miss the reference) and "kill=STEP" (the step's process is
# killed outright after its first row; STEP: ops-core, ops-triton, models-core, models-cl).
set -u
START=$(date +%s)
usage() { sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY=0 CORE=0 BUDGET="" SKIP="" OUT_DIR="" LIMITS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --core) CORE=1 ;;
    --out) OUT_DIR="${2:?--out needs a directory}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --skip) SKIP="${2:?--skip needs a comma list of steps}"; shift ;;
    --limit)
      case "${2:-}" in
        [a-z]*=[0-9]*) LIMITS="$LIMITS ${2}" ;;
        *) echo "gpu_check.sh: --limit takes STEP=SECONDS, got '${2:-}'" >&2; exit 2 ;;
      esac
      shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# A dry run on a small shared CPU is slower than the GPU machine: twice each limit and the budget.
SCALE=1
[ "$DRY" = 1 ] && SCALE=2
[ -z "$BUDGET" ] && { [ "$CORE" = 1 ] && BUDGET=$((235 * SCALE)) || BUDGET=$((415 * SCALE)); }
case "$BUDGET" in '' | *[!0-9]*) echo "gpu_check.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
INJECT="${GPU_CHECK_INJECT:-}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FUSED_POOLFORMER_TRITON_PINNED=1  # no Triton autotuning in the window (fused_poolformer/triton/pinned.py)
if [ "$DRY" = 1 ]; then
  BASE="${OUT_DIR:-$(mktemp -d /tmp/gpu_check_dry_XXXX)}"
  GPU_NAME=cpu-dry-run
  ARCH=9.0
  export CUDA_VISIBLE_DEVICES=""  # the dry run must not touch a GPU, even where there is one
else
  BASE="${OUT_DIR:-benchmarks/results}"
  GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null | tr -c 'A-Za-z0-9_.\n-' '-' | head -n 1)
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
fi
GPU_NAME="${GPU_NAME:-no-gpu}" ARCH="${ARCH:-9.0}"
STAMP="$GPU_NAME-$(date +%Y-%m-%d-%H%M%S)"
mkdir -p "$BASE/$STAMP" && RESULTS="$(cd "$BASE/$STAMP" && pwd)"
ARCHIVE_DIR="${OUT:-$(dirname "$RESULTS")}"
mkdir -p "$ARCHIVE_DIR" && ARCHIVE="$(cd "$ARCHIVE_DIR" && pwd)/$STAMP.tar.gz"
LOG="$RESULTS/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
SUMMARY=()
FAILED=0
SKIP_RC=75 UNSUPPORTED_RC=76  # step functions exit with these to say "skipped" / "unsupported here"

# ---------------------------------------------------------------------------------------
# Bookkeeping: the summary (also in summary.txt) and the archive, rewritten after every step.

elapsed() { echo $(($(date +%s) - START)); }
skipped() { case ",$SKIP," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
injected() { case ",$INJECT," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

archive() {
  tar -czf "$ARCHIVE.tmp" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null \
    && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
}

record() {  # record NAME STATUS SECONDS [WHAT IT YIELDED] [informs]
  local yield="${4:-}"
  if [ -z "$yield" ] && [ -f "$RESULTS/.yield-$1" ]; then yield="$(cat "$RESULTS/.yield-$1")"; fi
  rm -f "$RESULTS/.yield-$1"
  SUMMARY+=("$(printf '%-13s %-12s %5s s  at %4s s  %s' "$1" "$2" "$3" "$(elapsed)" "$yield")")
  case "$2" in OK | SKIPPED | UNSUPPORTED | STOPPED | SLOT) ;; *) [ "${5:-counts}" = counts ] && FAILED=1 ;; esac
  printf '%s\n' "${SUMMARY[@]}" >"$RESULTS/summary.txt"
  archive
}

status_of() {  # status_of EXIT_CODE
  case $1 in
    0) echo OK ;;
    124) echo TIMEOUT ;;
    137) echo KILLED ;;
    "$SKIP_RC") echo SKIPPED ;;
    "$UNSUPPORTED_RC") echo UNSUPPORTED ;;
    *) echo "FAIL($1)" ;;
  esac
}

limit_for() {  # limit_for NAME MAX: MAX (or --limit NAME=S), cut to the budget left
  local name="$1" max=$(($2 * SCALE)) pair left
  for pair in $LIMITS; do [ "${pair%%=*}" = "$name" ] && max="${pair#*=}"; done
  left=$((BUDGET - $(elapsed) - 5))
  [ "$left" -lt "$max" ] && max=$left
  echo "$max"
}

not_in_core() {  # not_in_core NAME: with --core, records the step as skipped and returns 0
  [ "$CORE" = 1 ] || return 1
  record "$1" SKIPPED 0 "--core: not in the core"
  echo "=== $1: skipped (--core)"
}

# run_step NAME MAX COMMAND...: COMMAND (a function below) under its limit, in the foreground.
run_step() {
  local name="$1" max="$2" t0 rc limit
  shift 2
  if skipped "$name"; then record "$name" SKIPPED 0 "--skip"; echo "=== $name: skipped (--skip)"; return; fi
  limit=$(limit_for "$name" "$max")
  if [ "$limit" -lt 5 ]; then record "$name" NO-TIME 0 "the budget is spent"; echo "=== $name: no time left"; return; fi
  echo "=== $name (at $(elapsed) s, limit ${limit} s)"
  t0=$(date +%s)
  STEP="$name" STEP_LIMIT=$limit timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@"
  rc=$?
  record "$name" "$(status_of $rc)" $(($(date +%s) - t0))
  echo "=== $name: $(status_of $rc)"
}

yields() { echo "$*" >"$RESULTS/.yield-$STEP"; }  # what a step yielded, for its summary line

# Background jobs: niced, each with its own limit and log; reaped by a later step.
declare -A BG_PID BG_T0
start_bg() {  # start_bg NAME LIMIT COMMAND...
  local name="$1" limit="$2"
  shift 2
  if skipped "$name"; then record "$name" SKIPPED 0 "--skip"; return; fi
  echo "=== [bg] $name (at $(elapsed) s, limit ${limit} s, log $name.log)"
  STEP="$name" nice -n 10 timeout --kill-after=5 "$limit" "$@" >"$RESULTS/$name.log" 2>&1 &
  BG_PID[$name]=$!
  BG_T0[$name]=$(date +%s)
}

running() {  # running NAME: its process exists and has not exited (an exited child stays a zombie until waited)
  local state
  [ -n "${BG_PID[$1]:-}" ] || return 1
  state=$(ps -o stat= -p "${BG_PID[$1]}" 2>/dev/null) || return 1
  case "$state" in Z* | "") return 1 ;; *) return 0 ;; esac
}

wait_bg() {  # wait_bg NAME SECONDS: wait up to SECONDS, then stop it; sets BG_RC and BG_STOPPED
  local name="$1" until=$(($(date +%s) + $2))
  BG_RC="" BG_STOPPED=0
  [ -z "${BG_PID[$name]:-}" ] && return 1
  while running "$name" && [ "$(date +%s)" -lt "$until" ]; do sleep 0.2; done
  if running "$name"; then kill -TERM "${BG_PID[$name]}" 2>/dev/null; BG_STOPPED=1; fi
  wait "${BG_PID[$name]}"
  BG_RC=$?
  unset "BG_PID[$name]"
}

reap_bg() {  # reap_bg NAME SECONDS: wait_bg, then its summary line (its last log line); a helper's
  local name="$1" status  # failure only informs: the step it serves says what it cost
  wait_bg "$name" "$2" || return
  status=$(status_of "$BG_RC")
  [ "$BG_STOPPED" = 1 ] && status=STOPPED  # still running when the step it serves began
  record "$name" "$status" $(($(date +%s) - BG_T0[$name])) "$(tail -n 1 "$RESULTS/$name.log" 2>/dev/null)" informs
  echo "=== [bg] $name: $status"
}

cleanup() {  # on exit: stop the background jobs, let the log's tee finish, write the archive
  local name i
  for name in "${!BG_PID[@]}"; do kill -TERM "${BG_PID[$name]}" 2>/dev/null; done
  for name in "${!BG_PID[@]}"; do wait "${BG_PID[$name]}" 2>/dev/null; done
  # Not a bare `wait`: it would also wait for the tee, which ends only when this shell's
  # output closes.  Close it, give the tee a moment to flush the log, then archive.
  exec >/dev/null 2>&1
  for i in $(seq 50); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done
  kill "$TEE_PID" 2>/dev/null
  archive
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
# The benchmark and check arguments: the real ones, or tiny CPU ones through the same code.

if [ "$DRY" = 1 ]; then
  COMMON=(--device cpu --threads 1 --no-progress)
  OPS=(--stages none --shape 2,8,6,6 --dtypes fp32 --layouts contiguous,channels_last --passes fwd,fwd+bwd
       --case-order variant --min-run-time 0.01 --compile-backend aot_eager)
  FUSED_CORE=fused-cpu  # the C++ CPU kernels stand in for the CUDA ones
  MODELS=(--models s12 --latency-models s12 --compile-models s12 --model-batch 2 --model-image-size 32
          --model-reps 1 --model-dtype fp32 --compile-backend eager)
  SMOKE=(--device cpu --shape 2,8,6,6 --dtypes fp32)
  SMOKE_CUDA_BACKEND=cpu
else
  COMMON=(--device cuda --no-progress)
  OPS=(--stages all --dtypes fp32,bf16 --layouts contiguous,channels_last --passes fwd,fwd+bwd
       --case-order variant --min-run-time 0.03)
  FUSED_CORE=fused-cuda
  MODELS=(--models s12 --latency-models s12 --compile-models s12 --model-batch 64 --model-dtype bf16
          --model-reps 10)
  SMOKE=(--device cuda)
  SMOKE_CUDA_BACKEND=cuda
fi
CORE_IMPLS="eager,$FUSED_CORE,compile"
MODEL_LAYOUTS=(contiguous channels_last)
[ "$CORE" = 1 ] && MODEL_LAYOUTS=(contiguous)
MODEL_LAYOUT_LIST=$(IFS=,; echo "${MODEL_LAYOUTS[*]}")
# Slot for what another issue adds: the whole-block operator's op rows (arguments of
# `python -m fused_poolformer.bench` for them).  Empty: the step says "slot".  (Block-fused
# model rows are model variants: the models steps time them, or say "unavailable".)
BLOCK_OP_ARGS=()
# Test-only faults (GPU_CHECK_INJECT, see the header).
OPS_INJECT=()
injected mismatch && OPS_INJECT=(--inject-mismatch "$FUSED_CORE")
kill_args() { injected "kill=$1" && echo "--inject-kill-after-rows 1"; }

# ---------------------------------------------------------------------------------------
# The steps.

env_report() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import importlib, platform, torch
gpu = torch.cuda.is_available()
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| CUDA driver", torch._C._cuda_getDriverVersion() if gpu else None,
      "| gpu", torch.cuda.get_device_name() if gpu else None,
      "| capability", torch.cuda.get_device_capability() if gpu else None)
for name in ("triton", "timm", "fvcore", "hypothesis"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "(no version)"))
    except ImportError as exc:
        print(f"{name}: not installed ({exc})")
EOF
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 1; else echo "nvcc: not on PATH"; fi
  command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)" \
    || echo "compute-sanitizer: not on PATH"
  echo "results: $RESULTS | archive: $ARCHIVE | arch $ARCH | budget ${BUDGET} s | core $CORE | dry run $DRY"
}

env_step() {  # env_report into env.txt and the log
  env_report >"$RESULTS/env.txt" 2>&1
  local rc=$?
  cat "$RESULTS/env.txt"
  yields "$(grep -m1 -o "| torch [^ ]*" "$RESULTS/env.txt" | head -n 1 | sed 's/^| //')"
  exit $rc
}

build() {
  # sm_90 only on an sm_90 GPU (one arch compiles fastest); another GPU gets its own arch.
  local cmd=(env FUSED_POOLFORMER_CUDA=1 FUSED_POOLFORMER_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16
             "$PY" setup.py build_ext --inplace)
  if [ "$DRY" = 1 ]; then
    echo "dry run: would run: rm -f fused_poolformer/_C*.so; ${cmd[*]}"
    yields "dry run: not built (the GPU machine's torch builds it)"
    exit "$SKIP_RC"
  fi
  rm -f fused_poolformer/_C*.so
  "${cmd[@]}" >"$RESULTS/build.log" 2>&1
  local rc=$?
  # The register / shared-memory / spill report of every kernel of ours.
  grep -A3 "Compiling entry function '_ZN16fused_poolformer" "$RESULTS/build.log" >"$RESULTS/ptxas.txt"
  grep -E "spill (stores|loads)" "$RESULTS/ptxas.txt" | grep -v " 0 bytes spill stores, 0 bytes spill loads" \
    && echo "WARNING: register spills above" || echo "ptxas: no spills in fused_poolformer kernels"
  tail -n 5 "$RESULTS/build.log"
  "$PY" -c "import fused_poolformer as f; print('backends: cpu=%s cuda=%s' % (f.HAS_CPU_KERNELS, f.HAS_CUDA_KERNELS)); assert f.HAS_CUDA_KERNELS" || exit 1
  yields "built for sm_${ARCH/./}"
  exit $rc
}

smoke() {  # smoke BACKEND ARGS...
  local backend="$1"
  shift
  CUDA_LAUNCH_BLOCKING=1 "$PY" benchmarks/gpu_smoke.py "$@" --backends "$backend" --jsonl "$RESULTS/smoke.jsonl" \
    | tee -a "$RESULTS/smoke.txt"
  local rc=${PIPESTATUS[0]}
  yields "$(tail -n 1 "$RESULTS/smoke.txt")"
  exit "$rc"
}

sanitizer_command() {  # sanitizer_command TOOL: the background command of a sanitizer run
  if [ "$DRY" = 1 ]; then  # the cases themselves, on the CPU (no compute-sanitizer)
    [ "$1" = memcheck ] && echo "$PY benchmarks/gpu_sanitize.py --device cpu" || echo "true"
    return
  fi
  # No caching allocator, so an out-of-bounds access lands outside every allocation.
  echo "env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $1 --error-exitcode 1" \
       "$([ "$1" = memcheck ] && echo --leak-check no) $PY benchmarks/gpu_sanitize.py --backends cuda"
}

sanitizer_verdict() {  # sanitizer_verdict TOOL EXIT_CODE: OK / FAIL / TIMEOUT / UNSUPPORTED, with a reason
  local log="$RESULTS/$1.log"
  if [ "$DRY" = 1 ]; then
    [ "$2" = 0 ] && echo "SKIPPED dry run: the cases ran on the CPU, no compute-sanitizer" || echo "FAIL($2) cases"
    return
  fi
  if ! command -v compute-sanitizer >/dev/null; then echo "UNSUPPORTED compute-sanitizer is not on PATH"; return; fi
  if grep -qiE "device not supported|not supported on|error 999|unable to (initialize|attach)" "$log" \
     || ! grep -qE "(ERROR|RACECHECK) SUMMARY" "$log"; then
    echo "UNSUPPORTED the sandbox refused it (no summary; see $1.log)"
    return
  fi
  case $2 in
    0) echo "OK $(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tail -n 1 | sed 's/^=* *//')" ;;
    124 | 137) echo "TIMEOUT" ;;
    *) echo "FAIL($2) $(grep -E "(ERROR|RACECHECK) SUMMARY|FAIL" "$log" | tail -n 1 | sed 's/^=* *//')" ;;
  esac
}

reap_sanitizer() {  # reap_sanitizer TOOL: wait for its background run (to its limit), record its verdict
  local tool="$1" verdict left=$((45 * SCALE - ($(date +%s) - ${BG_T0[$1]:-$(date +%s)})))
  [ "$left" -lt 1 ] && left=1
  wait_bg "$tool" "$left" || { record "$tool" SKIPPED 0 "not started"; return; }
  verdict="$(sanitizer_verdict "$tool" "$BG_RC")"
  [ "$BG_STOPPED" = 1 ] && verdict="TIMEOUT still running at its limit (see $tool.log)"
  record "$tool" "${verdict%% *}" $(($(date +%s) - BG_T0[$tool])) "${verdict#* }"
  echo "=== $tool: $verdict"
}

bench() {  # bench NAME ARGS...: the benchmark, its time budget inside the step's limit
  local name="$1"
  shift
  "$PY" -m fused_poolformer.bench "$@" --time-budget $((STEP_LIMIT * 4 / 5)) \
    --json "$RESULTS/$name.json" --markdown "$RESULTS/$name.md"
  local rc=$?
  yields "$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); ops=r.get('ops',[]); \
print(len(ops), 'op rows,', sum(x.get('status','ok')!='ok' for x in ops), 'failed,', len(r.get('host',[])), 'host rows')" \
    "$RESULTS/$name.json" 2>/dev/null || echo "no rows written")"
  exit $rc
}

ops_triton() {  # ops_triton ARGS...
  if [ "$DRY" = 1 ]; then
    yields "dry run: the Triton interpreter is too slow to time (the smoke ran it)"
    exit "$SKIP_RC"
  fi
  bench ops-triton --parts ops "$@" --impls fused-triton --baseline-json "$RESULTS/ops-core.json"
}

notes() {
  # The recorded kernel versions, then this run (whose copy bandwidth sets the floor).
  local runs=() f
  for f in benchmarks/results/NVIDIA-H200-2026-11-26-ops-nocompile.json \
           benchmarks/results/NVIDIA-H200-2026-11-26-ops-compile.json; do
    [ -f "$f" ] && runs+=(--notes-run "2026-11-26 kernels=$f")
  done
  [ -f "$RESULTS/ops-core.json" ] && runs+=(--notes-run "this run ($STAMP)=$RESULTS/ops-core.json")
  cp benchmarks/results/GPU_NOTES.md "$RESULTS/GPU_NOTES.md"
  "$PY" -m fused_poolformer.bench --gpu-notes "$RESULTS/GPU_NOTES.md" "${runs[@]}" || exit 1
  [ "$DRY" = 0 ] && cp "$RESULTS/GPU_NOTES.md" benchmarks/results/GPU_NOTES.md
  yields "$(grep -o "Copy bandwidth [0-9.]* GB/s[^.]*" "$RESULTS/GPU_NOTES.md" | head -n 1)"
}

gpu_tests() {
  # The tests marked gpu, most telling first (benchmarks/gpu_tests_plugin.py); SIGINT before
  # the step's own limit, so pytest prints its summary and writes the junit XML.  Pins off:
  # the tests check the kernels as users get them.
  local args=(-p benchmarks.gpu_tests_plugin --value-order --test-limit 20 --hypothesis-cap 20
              --results-jsonl "$RESULTS/tests.jsonl" --junitxml="$RESULTS/tests.xml" -v -rfE
              -p no:cacheprovider -m "gpu and not slow")
  [ "$DRY" = 1 ] && args+=(--collect-only -q)
  set -o pipefail
  FUSED_POOLFORMER_TRITON_PINNED=0 timeout -s INT --kill-after=10 $((STEP_LIMIT - 12)) \
    "$PY" -m pytest "${args[@]}" 2>&1 | tee "$RESULTS/tests.log"
  local rc=$?
  yields "$(grep -E "^(=+ .*(passed|failed|error|no tests|selected|collected).* =+|value order:)" "$RESULTS/tests.log" \
            | tail -n 1 | tr -s '=' | sed 's/^ //')"
  [ "$DRY" = 1 ] && [ $rc = 0 ] && exit "$SKIP_RC"
  exit $rc
}

slot_step() {  # slot_step NAME ARGS...: a step another issue fills (ARGS: its benchmark arguments)
  local name="$1"
  shift
  if [ $# -eq 0 ]; then
    record "$name" SLOT 0 "slot: nothing registered yet"
    echo "=== $name: slot, nothing registered yet"
    return
  fi
  run_step "$name" 30 bench "$name" "${COMMON[@]}" "$@"
}

# models_step NAME LAYOUT MAX: lets worker-LAYOUT time its rows (in the main shell: it waits on
# the worker, a child of this shell).
models_step() {
  local name="$1" worker="worker-$2" max="$3" limit t0 status
  if skipped "$name"; then record "$name" SKIPPED 0 "--skip"; echo "=== $name: skipped (--skip)"; return; fi
  if [ -z "${BG_PID[$worker]:-}" ]; then
    record "$name" NOT-RUN 0 "no $worker: $(cat "$RESULTS/.why-no-workers" 2>/dev/null || echo "it already ended")"
    echo "=== $name: no $worker"
    return
  fi
  limit=$(limit_for "$name" "$max")
  [ "$limit" -lt 5 ] && limit=5
  echo "=== $name (at $(elapsed) s, limit ${limit} s): $worker times its rows"
  [ -f "$RESULTS/.ready-$2" ] && echo "$worker ready: $(tr -d '\n' <"$RESULTS/.ready-$2")" \
    || echo "$worker is still warming up: it times what it has warmed, then the rest"
  t0=$(date +%s)
  touch "$RESULTS/.go-$2"
  wait_bg "$worker" "$limit"
  status=$(status_of "$BG_RC")
  [ "$BG_STOPPED" = 1 ] && status=TIMEOUT
  record "$name" "$status" $(($(date +%s) - t0)) "$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); \
m=r['models']; print(len([x for x in m if x.get('train_step_ms')]), 'timed model rows,', \
sum(x.get('status')=='error' for x in m), 'failed,', sum(x.get('status')=='unavailable' for x in m), 'unavailable')" \
    "$RESULTS/models-$2.json" 2>/dev/null || echo "no rows written")"
  echo "=== $name: $status"
}

start_model_worker() {  # start_model_worker LAYOUT: builds, warms and waits for .go-LAYOUT
  local extra=()
  # The dry run traces the compiled variants in the first layout only (two CPU cores).
  [ "$DRY" = 1 ] && [ "$1" != "${MODEL_LAYOUTS[0]}" ] && extra=(--compile-models none)
  start_bg "worker-$1" 900 "$PY" -m fused_poolformer.bench "${COMMON[@]}" --parts models "${MODELS[@]}" "${extra[@]}" \
    --model-layouts "$1" --ready-file "$RESULTS/.ready-$1" --go-file "$RESULTS/.go-$1" --time-budget $((24 * SCALE)) \
    --json "$RESULTS/models-$1.json" --markdown "$RESULTS/models-$1.md" \
    $(kill_args "$([ "$1" = contiguous ] && echo models-core || echo models-cl)")
}

export -f env_report env_step build smoke bench ops_triton notes gpu_tests yields
export DRY RESULTS STAMP ARCH PY BUDGET ARCHIVE CORE SKIP_RC UNSUPPORTED_RC

# ---------------------------------------------------------------------------------------
# The run.

run_step env 20 env_step

# Beside the build (which needs no GPU): what compiles without the extension.
export TORCHINDUCTOR_COMPILE_THREADS=4  # the background compilers share the machine with the build
start_bg warm-ops $((300 * SCALE)) "$PY" -m fused_poolformer.bench "${COMMON[@]}" --warm-compile --parts ops \
  "${OPS[@]}" --impls eager,compile
if [ "$CORE" = 0 ]; then
  if [ "$DRY" = 1 ]; then  # no sm_90 compiler here: check the pins cover every case instead
    start_bg warm-triton $((150 * SCALE)) env -u TRITON_INTERPRET "$PY" -m fused_poolformer.triton.pinned --check
  else
    start_bg warm-triton 150 env -u TRITON_INTERPRET FUSED_POOLFORMER_TRITON_PINNED=0 \
      "$PY" -m fused_poolformer.triton.pinned --warm-cache --processes 6
  fi
fi
# (The dry run's compile backend keeps no cache to warm: there the step only walks its plumbing.)
WARM_MODELS=(--model-layouts "$MODEL_LAYOUT_LIST")
[ "$DRY" = 1 ] && WARM_MODELS=(--latency-models none)
start_bg warm-models $((240 * SCALE)) "$PY" -m fused_poolformer.bench "${COMMON[@]}" --warm-compile --parts models \
  "${MODELS[@]}" --model-impls original+compile "${WARM_MODELS[@]}"

run_step build 150 build
case "${SUMMARY[-1]}" in
  build*" OK "* | build*" SKIPPED "*)
    for layout in "${MODEL_LAYOUTS[@]}"; do start_model_worker "$layout"; done ;;
  *) echo "the build failed (see build.log)" >"$RESULTS/.why-no-workers"; echo "=== the build failed: no model workers" ;;
esac
unset TORCHINDUCTOR_COMPILE_THREADS

# 1. Smoke, with the sanitizers beside it (none of them times anything).
if ! skipped sanitizer; then
  start_bg memcheck $((45 * SCALE)) bash -c "$(sanitizer_command memcheck)"
  start_bg racecheck $((45 * SCALE)) bash -c "$(sanitizer_command racecheck)"
fi
run_step smoke-cuda 40 smoke "$SMOKE_CUDA_BACKEND" "${SMOKE[@]}"
if ! not_in_core smoke-triton; then
  reap_bg warm-triton $((30 * SCALE))
  run_step smoke-triton 45 smoke triton "${SMOKE[@]}"
fi

# 2. Sanitizer verdicts.
if skipped sanitizer; then
  record sanitizer SKIPPED 0 "--skip"; echo "=== sanitizer: skipped (--skip)"
else
  reap_sanitizer memcheck
  reap_sanitizer racecheck
fi

# 3. Op timings: eager, fused-cuda and compile at the four stages, then Triton.
run_step ops-core 80 bench ops-core --parts host,ops "${COMMON[@]}" "${OPS[@]}" --impls "$CORE_IMPLS" \
  "${OPS_INJECT[@]}" $(kill_args ops-core)
reap_bg warm-ops 3  # done by now; a few seconds to exit
slot_step ops-block "${BLOCK_OP_ARGS[@]}"
not_in_core ops-triton || run_step ops-triton 50 ops_triton "${COMMON[@]}" "${OPS[@]}" $(kill_args ops-triton)

# 4. Model rows (the workers have been warming since the build).
reap_bg warm-models 0
models_step models-core contiguous 30
not_in_core models-cl || models_step models-cl channels_last 30

# 5. Bookkeeping, then the GPU tests.
run_step notes 15 notes
not_in_core tests || run_step tests 70 gpu_tests

echo
echo "=== summary ($(elapsed) s; results $RESULTS; archive $ARCHIVE)"
printf '%s\n' "${SUMMARY[@]}" | tee "$RESULTS/summary.txt"
exit $FAILED  # the EXIT trap writes the archive
