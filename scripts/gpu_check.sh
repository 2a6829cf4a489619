#!/usr/bin/env bash
# GPU check in stages, each sized for one call of a lent GPU machine (at most 10 minutes a call, start-up and
# transfers included; 15 minutes of device time a session). Run `quick` first, then `bench`, `tests`,
# `sanitize` as time allows. Every step runs under its own time limit; the limits of a stage add up to at
# most STAGE_BUDGET_S (450 s, well inside 8 minutes), and a step is cut short if the stage's budget runs out.
# After EVERY step the stage's log and JSON summary under $OUT are rewritten, so a call killed at its limit
# still returns what finished.
#
# | stage    | steps (limit, s)                                                     | last run on a GPU          |
# |----------|----------------------------------------------------------------------|----------------------------|
# | quick    | build 150, extension 20, production-shape GPU tests with the         | never run on a GPU yet     |
# |          | graphs-vs-eager check on a 28-layer bf16 model (test_gpu_shapes) 210, | (estimate, not measured:   |
# |          | one roofline row (Qwen2.5-1.5B shapes, batch 8) 70: sum 450          | 3-6 min)                   |
# | bench    | build 110, extension 20, op microbenchmarks 85, roofline table 105,  | never run on a GPU yet     |
# |          | speculative 55, eviction 55: sum 430                                 | (estimate: 5-7 min)        |
# | tests    | build 120, extension 20, every other `-m gpu` test (the kernel test  | never run on a GPU yet     |
# |          | modules on CUDA tensors, engine GPU tests) 300: sum 440              | (estimate: 3-6 min)        |
# | sanitize | build 120, extension 20, compute-sanitizer memcheck 150 and          | never run on a GPU yet     |
# |          | racecheck 150 on scripts/sanitize_ops.py (small shapes): sum 440     | (estimate: 3-5 min)        |
# On a warm machine (an earlier stage built the extension) the build steps are skipped.
# Update the last column with the measured stage time (`total_s` in $OUT/<stage>.json) after each GPU run.
#
#   usage: bash scripts/gpu_check.sh [--dry-run] STAGE     (STAGE: quick, bench, tests, sanitize)
#
# --dry-run (no GPU needed) validates the stage: its steps, their limits against the budget, that the files
# they name exist; it writes the stage's JSON (every step "dry-run") under $OUT and runs nothing else.
# Outputs, per stage, at most 4 files directly under $OUT (default benchmarks/results/gpu-check):
#   <stage>.log           every step's output, appended as it runs
#   <stage>.json          device, date, and per step: limit_s, seconds, rc, status; rewritten after each step
#   <stage>-results.json  merged pytest-benchmark JSON (quick, bench), rewritten after each benchmark step
#   <stage>-results.md    its markdown table (benchmarks/results_table.py)
# Nothing downloads: pip runs with --no-index, no build isolation and no dependencies; models are built from
# configs. Copy the results worth keeping into benchmarks/results/ and the README.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGE_BUDGET_S=${GPU_CHECK_BUDGET_S:-450}  # the override is for tests of this script
KILL_GRACE_S=10

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
stage=${1:-}
case "$stage" in
  quick | bench | tests | sanitize | selftest) ;;  # selftest: trivial steps, no GPU (tests of this script)
  *)
    echo "usage: bash scripts/gpu_check.sh [--dry-run] quick|bench|tests|sanitize" >&2
    exit 2
    ;;
esac

out=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/$stage.log"
summary="$out/$stage.json"
results="$out/$stage-results.json"
table="$out/$stage-results.md"
parts=$(mktemp -d)
trap 'rm -rf "$parts"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1

names=()
limits=()
secs=()
rcs=()
states=()
status=0
start=$SECONDS
device="none"
if [ $dry = 0 ] && [ "$stage" != selftest ]; then
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch" | tee -a "$log" >&2
    exit 2
  fi
  device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
fi

write_summary() {  # the stage's JSON, rewritten whole (then moved into place) after every step
  local tmp="$summary.tmp" i sep="" total=0
  for i in "${!limits[@]}"; do total=$((total + limits[i])); done
  {
    printf '{"stage": "%s", "device": "%s", "date": "%s", "dry_run": %s, "budget_s": %d, ' \
      "$stage" "$device" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$([ $dry = 1 ] && echo true || echo false)" \
      "$STAGE_BUDGET_S"
    printf '"limits_total_s": %d, "total_s": %d, "status": %d, "steps": [' "$total" "$((SECONDS - start))" \
      "$status"
    for i in "${!names[@]}"; do
      printf '%s{"name": "%s", "limit_s": %d, "seconds": %s, "rc": %s, "status": "%s"}' "$sep" \
        "${names[i]}" "${limits[i]}" "${secs[i]}" "${rcs[i]}" "${states[i]}"
      sep=", "
    done
    printf ']}\n'
  } >"$tmp" && mv "$tmp" "$summary"
}

# step NAME LIMIT_S CMD...: run CMD under its limit (and the stage's remaining budget), append its output to
# the log, record the outcome, rewrite the summary. In a dry run, check the step and record it instead.
step() {
  local name=$1 limit=$2
  shift 2
  names+=("$name")
  limits+=("$limit")
  if [ $dry = 1 ]; then
    local arg missing=""
    for arg in "$@"; do
      arg=${arg#--*=}
      case "$arg" in
        *.py | *.sh) [ -e "$arg" ] || missing="$missing $arg" ;;
      esac
    done
    secs+=(0)
    if [ -n "$missing" ]; then
      rcs+=(1)
      states+=("missing:$missing")
      status=1
    else
      rcs+=(0)
      states+=("dry-run")
    fi
    printf '%-22s %4ss  %s\n' "$name" "$limit" "$*"
    write_summary
    return 0
  fi
  local left=$((STAGE_BUDGET_S - (SECONDS - start) - KILL_GRACE_S)) floor=$((limit < 15 ? limit : 15))
  if [ "$left" -lt "$floor" ]; then  # too little left to be worth starting
    secs+=(0)
    rcs+=(null)
    states+=("skipped: stage budget spent")
    echo "== $name: skipped, stage budget spent" | tee -a "$log"
    write_summary
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== [$((SECONDS - start))s] $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS rc
  timeout --signal=INT --kill-after=$KILL_GRACE_S "$limit" "$@" >>"$log" 2>&1
  rc=$?
  secs+=($((SECONDS - t0)))
  rcs+=("$rc")
  if [ $rc = 0 ]; then
    states+=("ok")
  elif [ $rc = 124 ] || [ $rc = 137 ]; then
    states+=("timed out")
    status=1
  else
    states+=("failed")
    status=1
  fi
  echo "-- $name: ${states[-1]} (rc $rc, ${secs[-1]}s)" | tee -a "$log"
  write_summary
}

# bench NAME LIMIT_S PYTEST_ARGS...: a benchmark step; its JSON joins the stage's merged results at once.
bench() {
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" python3 -m pytest -q -p no:cacheprovider --benchmark-enable \
    --benchmark-json="$parts/$name.json" --benchmark-columns=median,min,rounds "$@"
  [ $dry = 1 ] && return 0
  local jsons
  jsons=$(ls "$parts"/*.json 2>/dev/null)
  if [ -n "$jsons" ]; then
    # shellcheck disable=SC2086
    python3 benchmarks/results_table.py $jsons --merge "$results" -o "$table" >>"$log" 2>&1 || status=1
  fi
}

# Build effdecode._C in place unless this machine already has it (a warm machine from an earlier stage).
build() {
  local limit=$1
  if [ $dry = 0 ] && python3 -c "import effdecode._C" 2>/dev/null; then
    step build-skipped 1 true
    return
  fi
  step build "$limit" pip install -e . --no-deps --no-build-isolation --no-index -q
  step extension 20 python3 -c "import effdecode._C, torch; print('effdecode._C ok', torch.__version__)"
}

case "$stage" in
  quick)
    build 150
    step gpu-shapes 210 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_shapes.py
    EFFDECODE_E2E_MODELS=1.5B EFFDECODE_E2E_BATCHES=8 EFFDECODE_E2E_MODES=effdecode \
      EFFDECODE_E2E_COMPILE_MODELS=none EFFDECODE_E2E_NEW_TOKENS=256 \
      bench roofline-row 70 benchmarks/test_e2e_roofline.py
    ;;
  bench)
    build 110
    bench ops 85 benchmarks/test_ops.py --benchmark-group-by=group
    EFFDECODE_E2E_MODELS=0.5B,1.5B,7B EFFDECODE_E2E_MODES=effdecode,effdecode_graphs,hf \
      EFFDECODE_E2E_COMPILE_MODELS=none EFFDECODE_E2E_NEW_TOKENS=256 EFFDECODE_E2E_BUDGET_S=80 \
      bench roofline 105 benchmarks/test_e2e_roofline.py
    bench speculative 55 benchmarks/test_e2e_speculative.py --benchmark-group-by=param:batch_size \
      -k "1] or 16]"
    bench eviction 55 benchmarks/test_e2e_compression.py --benchmark-group-by=param \
      -k "(test_long_generation and (full or rkv)) or (test_eviction_share_of_decode and rkv)"
    ;;
  tests)
    build 120
    step gpu-tests 300 python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests \
      --ignore=tests/test_gpu_shapes.py
    ;;
  sanitize)
    build 120
    if [ $dry = 1 ] || command -v compute-sanitizer >/dev/null; then
      # No caching allocator: an out-of-bounds access inside a cached block would go unseen.
      for tool in memcheck racecheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "$tool" 150 compute-sanitizer --tool "$tool" \
          --error-exitcode 3 python3 scripts/sanitize_ops.py
      done
    else
      names+=(compute-sanitizer) limits+=(0) secs+=(0) rcs+=(null) states+=("not found")
      status=1
      write_summary
    fi
    ;;
  selftest)
    step fast 5 true
    step hangs 3 sleep 60
    step fails 5 false
    step late 60 true
    ;;
esac

write_summary
total=0
for limit in "${limits[@]}"; do total=$((total + limit)); done
if [ "$total" -gt "$STAGE_BUDGET_S" ]; then
  echo "gpu_check: the $stage stage's limits add up to ${total}s, over its ${STAGE_BUDGET_S}s budget" >&2
  status=1
fi
echo "== $stage: status $status in $((SECONDS - start))s (limits ${total}s of ${STAGE_BUDGET_S}s); $summary"
for i in "${!names[@]}"; do
  printf '   %-22s %-28s %5ss of %4ss\n' "${names[i]}" "${states[i]}" "${secs[i]}" "${limits[i]}"
done
exit $status
